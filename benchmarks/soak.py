"""Soak: a cluster under steady load while a chaos loop kills things; then reconcile.

    python -m benchmarks.soak --minutes 10 [--nodes 3] [--ttl 2] [--seed N] [--append]
    python -m benchmarks.soak --minutes 10 --replicas 2 [--min-insync 1] [--append]

Three node processes (real etcd) take mail from one load thread each and deliver it to a
loopback sink (which defers some recipients once, so retries happen too). Every few seconds
the chaos loop does one of: SIGKILL a node (restarted a moment later), SIGTERM a node
(graceful handoff, restarted), SIGSTOP a node for up to two lease TTLs, or SIGKILL etcd for a
while (restarted on the same data). At the end everything is brought back, the load stops,
the cluster drains, and the accounting logs of all nodes are reconciled:

- every message a client got a 250 for has exactly one Reception;
- every Reception has exactly one final record (Delivery, Bounce, Expiration) per recipient;
- the sink received every recipient the logs say was delivered, and every recipient of
  every acknowledged message (*lost* counts those it never got).

By default the nodes share one spool directory. With ``--replicas 2`` each node has its own
spool (``[spool] replicas``, the replication channel on a loopback port with a random
secret) and the chaos also *wipes* a node: SIGKILL, delete its spool directory (the disk is
gone; its accounting log lives beside the spool, not in it, as on a host whose spool volume
died), restart it empty a while later. Before every action the loop waits until the cluster
is fully in sync again (every shard owned, and on ``replicas`` copies that are live members
of its ``sync/<shard>`` record under their current copy id), so no action can take a shard's
last copy by definition; it reports how long each re-sync took. A message whose 250 never
came may have a Reception and no final record there: its bytes were on the dead owner's disk
only and were cut (or wiped), which is what the missing 250 told the client. So, replicated,
the final-record check covers every recipient of every acknowledged message, and a recipient
with two final records passes only when the sink got it twice too (the DONE was on the dead
owner's disk only, the next owner delivered again: at-least-once).

Not part of the test suite (it runs for minutes); ``--append`` adds the result to
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import secrets
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

from benchmarks.common import add_rows
from benchmarks.harness import ROOT, commit_info
from harness.config import node_config
from harness.etcd import EtcdServer
from harness.mail import message
from harness.node import NodeProcess
from harness.sink import AnyAddress, Sink, SinkScript

FINAL = ("Delivery", "Bounce", "Expiration", "AdminBounce")
RELIABILITY = ROOT / "docs" / "reliability.md"
SHARDS = 64
TOKEN = "t0ken"  # harness.config.node_config's admin token


def recipients_of(n: int) -> list[str]:
    """The recipients of load message ``n`` (one or two domains)."""
    return [f"r{n}-{k}@{dom}" for k, dom in enumerate(("one.test", "two.test")[:1 + n % 2])]


class Soak:
    """The cluster, the load and the chaos of one run."""

    def __init__(self, nodes: int, ttl: float, seed: int, replicas: int = 1,
                 min_insync: int | None = None, replica_timeout: float | None = None) -> None:
        self.rnd = random.Random(seed)
        self.ttl = ttl
        self.replicas = replicas
        self.work = Path(tempfile.mkdtemp(prefix="mta-soak-", dir=ROOT / "var"))
        print(f"  work directory (node logs, accounting logs): {self.work}", flush=True)
        self.etcd = EtcdServer(self.work / "etcd").start()
        deferred: set[str] = set()
        lock = threading.Lock()

        def rcpt(address: str, _attempt: int) -> str | None:
            # One recipient in twenty is deferred once: retries are part of the soak.
            with lock:
                if hash(address) % 20 == 0 and address not in deferred:
                    deferred.add(address)
                    return "451 4.7.1 Greylisted, try again"
            return None

        self.sink = Sink("127.0.0.1", 0, SinkScript(rcpt=AnyAddress(rcpt)))
        self.sink.start()
        self.name = f"soak{uuid.uuid4().hex[:6]}"
        self.prefix = f"/mta/{self.name}/"
        self.nodes: dict[str, NodeProcess] = {}
        secret = secrets.token_hex(32)
        for i in range(nodes):
            node_id = f"s{i + 1}"
            work = self.work / node_id
            work.mkdir()
            spool: dict[str, Any] = {"shards": SHARDS}
            cluster: dict[str, Any] = {"etcd": [self.etcd.endpoint], "name": self.name,
                                       "lease_ttl": ttl}
            if replicas > 1:
                # Below the lease TTL (the config insists): the owner drops a silent follower
                # before its own lease can run out.
                spool |= {"replicas": replicas,
                          "replica_timeout": replica_timeout or round(ttl / 2, 3)}
                if min_insync is not None:
                    spool["min_insync"] = min_insync
                cluster |= {"replication_listen": "127.0.0.1:0", "secret": secret}
            raw = node_config(
                self.spool_of(node_id), node={"id": node_id, "log_level": "info"},
                spool=spool,
                smtp={"command_timeout": "30s", "data_timeout": "30s"},
                cluster=cluster,
                # The accounting log beside the spool, never in it: a wipe loses the disk
                # holding the spool, not the log (which a log shipper has read meanwhile).
                delivery={"enabled": True, "smarthost": f"127.0.0.1:{self.sink.port}",
                          "retry_initial": "500ms", "retry_max": "2s",
                          "connect_timeout": "5s", "command_timeout": "20s",
                          "data_timeout": "20s", "accounting_log": str(work / "acct.jsonl")})
            self.nodes[node_id] = NodeProcess(work, raw).start(timeout=60)
        self.acked: dict[str, int] = {}
        self.acked_lock = threading.Lock()
        self.stop_load = threading.Event()
        self.faults: Counter[str] = Counter()
        self.counter = 0
        self.resyncs: list[dict[str, Any]] = []  # replicated: each action's time to re-sync
        self.incidents: list[str] = []  # what went wrong beside the figures (stop hung...)

    def spool_of(self, node_id: str) -> Path:
        """A node's spool: its own when replicated, else the one they share."""
        return self.work / node_id / "spool" if self.replicas > 1 else self.work / "spool"

    # --- load ------------------------------------------------------------------------------

    def _next(self) -> int:
        with self.acked_lock:
            self.counter += 1
            return self.counter

    def load(self, node_id: str) -> None:
        while not self.stop_load.is_set():
            try:
                port = self.nodes[node_id].smtp_port
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                    smtp.ehlo("soak.test")
                    while not self.stop_load.is_set():
                        n = self._next()
                        smtp.mail("app@sender.test")
                        for r in recipients_of(n):
                            smtp.rcpt(r)
                        code, reply = smtp.data(message(n, 1500))
                        if code == 250:
                            with self.acked_lock:
                                self.acked[reply.decode().rsplit(" ", 1)[1]] = n
                        else:
                            time.sleep(0.05)  # 451 (a read-only shard): not so fast
                        time.sleep(0.005)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.2)  # killed, stopped, fenced: reconnect

    # --- chaos -----------------------------------------------------------------------------

    def _restart(self, node: NodeProcess) -> None:
        for _ in range(5):
            try:
                node.start(timeout=60)
                return
            except RuntimeError:
                node.kill()  # exited, or never greeted: never leave one running
                time.sleep(1)
        raise RuntimeError(f"node would not restart:\n{node.log()[-3000:]}")

    def chaos_step(self) -> tuple[str, str]:
        actions = ["kill_node", "kill_node", "stop_node", "pause_node", "kill_etcd"]
        if self.replicas > 1:
            actions += ["wipe_node", "wipe_node"]
        action = self.rnd.choice(actions)
        node = self.nodes[self.rnd.choice(sorted(self.nodes))]
        target = "etcd" if action == "kill_etcd" else node.workdir.name
        self.faults[action] += 1
        print(f"  chaos: {action} {target}", flush=True)
        if action == "kill_node":
            node.kill()
            time.sleep(self.rnd.uniform(0.5, 2 * self.ttl))
            self._restart(node)
        elif action == "wipe_node":
            node.kill()
            shutil.rmtree(self.spool_of(target))  # the disk is gone with the node
            # Long enough, often, for its shards to move to their followers first.
            time.sleep(self.rnd.uniform(0.5, 3 * self.ttl))
            self._restart(node)
        elif action == "stop_node":
            node.signal(signal.SIGTERM)
            try:
                node.wait(90)
            except subprocess.TimeoutExpired:
                self.incidents.append(f"{target}: SIGTERM did not end it within 90 s")
                node.kill()
            time.sleep(self.rnd.uniform(0.5, 2))
            self._restart(node)
        elif action == "pause_node":
            node.signal(signal.SIGSTOP)
            time.sleep(self.rnd.uniform(0.5, 2 * self.ttl))
            node.signal(signal.SIGCONT)
        else:
            self.etcd.kill()
            time.sleep(self.rnd.uniform(1, 3 * self.ttl + 5))
            self.etcd.start()
        return action, target

    # --- in sync (replicated) --------------------------------------------------------------

    def sync_state(self) -> tuple[bool, str]:
        """Is every node up, every shard owned and on ``replicas`` promotable copies (live
        members of ``sync/<shard>`` whose copy id is the one the node publishes now)?"""
        try:
            keys = self.etcd.get_prefix(self.prefix)
        except Exception as exc:  # etcd down or restarting: not in sync, whatever the error
            return False, f"etcd: {type(exc).__name__}"
        live: dict[str, dict[str, Any]] = {}
        records: dict[int, dict[str, Any]] = {}
        owners: dict[int, str] = {}
        for key, (value, _rev) in keys.items():
            kind, _, arg = key[len(self.prefix):].partition("/")
            if kind == "nodes":
                live[arg] = msgpack.unpackb(value)
            elif kind == "sync":
                records[int(arg)] = json.loads(value)
            elif kind == "owner":
                owners[int(arg)] = value.decode()
        # A node key left by a killed process lives until its lease ends: only the running
        # process's own key counts.
        live = {n: info for n, info in live.items()
                if n in self.nodes and self.nodes[n].proc is not None
                and info.get("pid") == self.nodes[n].proc.pid}
        short = 0
        for shard in range(SHARDS):
            members = records.get(shard, {}).get("members", {})
            copies = sum(1 for node, copy in members.items()
                         if node in live and _copy_of(live[node], shard) == copy)
            short += copies < self.replicas
        ok = (len(live) == len(self.nodes) and len(owners) == SHARDS
              and set(owners.values()) <= set(live) and not short)
        return ok, (f"{len(live)}/{len(self.nodes)} nodes, {len(owners)}/{SHARDS} owned, "
                    f"{short} shards under {self.replicas} copies")

    def wait_in_sync(self, timeout: float) -> tuple[float | None, str]:
        """Seconds until the cluster is fully in sync and stays so for a lease TTL and a
        second (a paused node's or a dead etcd's leases may still run out and move shards),
        counted to when that began; None: not within ``timeout``."""
        t0 = time.monotonic()
        since: float | None = None
        what = ""
        while time.monotonic() - t0 < timeout:
            ok, what = self.sync_state()
            now = time.monotonic()
            if not ok:
                since = None
            elif since is None:
                since = now
            elif now - since >= self.ttl + 1:
                return since - t0, what
            time.sleep(0.25)
        return None, what

    # --- reconcile -------------------------------------------------------------------------

    def records(self) -> tuple[list[dict[str, Any]], int]:
        out, bad = [], 0
        for node in self.nodes.values():
            path = node.workdir / "acct.jsonl"
            if path.exists():
                for line in path.read_text().splitlines():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        bad += 1
        return out, bad

    def sink_got(self) -> Counter[tuple[bytes, str]]:
        """How often the sink took each (X-Test-Id, recipient)."""
        got: Counter[tuple[bytes, str]] = Counter()
        for m in list(self.sink.messages):
            if b"X-Test-Id: " not in m.content:
                continue  # a DSN
            tag = m.content.split(b"X-Test-Id: ")[1].split(b"\r\n")[0]
            for rcpt in m.recipients:
                got[(tag, rcpt)] += 1
        return got

    def queued(self) -> int | None:
        """Messages still queued on all nodes (None: a node did not answer)."""
        total = 0
        for node in self.nodes.values():
            req = urllib.request.Request(
                f"http://127.0.0.1:{node.admin_port}/api/v1/queue?local=1",
                headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    total += int(json.load(resp)["total"])
            except (OSError, ValueError, KeyError):
                return None
        return total

    def settled(self) -> bool:
        recs, _ = self.records()
        finals = {(r["message_id"], r["recipient"]) for r in recs if r["type"] in FINAL}
        if self.replicas == 1:
            return all((r["message_id"], x) in finals for r in recs if r["type"] == "Reception"
                       for x in r["recipients"])
        # Replicated: a Reception whose message was cut never gets a final record; done is
        # every acknowledged recipient final and at the sink, and nothing left queued.
        got = self.sink_got()
        with self.acked_lock:
            acked = dict(self.acked)
        return (all((mid, r) in finals and got[(str(n).encode(), r)]
                    for mid, n in acked.items() for r in recipients_of(n))
                and self.queued() == 0)

    def reconcile(self) -> dict[str, Any]:
        recs, bad_lines = self.records()
        replayed = [r for r in recs if r.get("replayed")]
        plain = [r for r in recs if not r.get("replayed")]
        # A line marked replayed was re-emitted by a new owner that could not tell whether
        # the dead one had written it: it counts only when no other copy of it exists.
        receptions = Counter(r["message_id"] for r in plain if r["type"] == "Reception")
        finals = Counter((r["message_id"], r["recipient"]) for r in plain
                         if r["type"] in FINAL)
        replayed_dupes = 0
        for r in replayed:
            if r["type"] == "Reception":
                replayed_dupes += r["message_id"] in receptions
                receptions[r["message_id"]] = max(receptions[r["message_id"]], 1)
            elif r["type"] in FINAL:
                key = (r["message_id"], r["recipient"])
                replayed_dupes += key in finals
                finals[key] = max(finals[key], 1)
        rec_lines = {r["message_id"]: r for r in recs if r["type"] == "Reception"}
        expected = {(mid, x) for mid, r in rec_lines.items() for x in r["recipients"]}
        delivered = {(r["message_id"], r["recipient"]) for r in recs
                     if r["type"] == "Delivery"}
        by_mid_n = dict(self.acked)
        sink_got = self.sink_got()
        missing_at_sink = [(mid, r) for mid, r in delivered
                           if mid in by_mid_n
                           and (str(by_mid_n[mid]).encode(), r) not in sink_got]
        acked_rcpts = {(mid, r): str(n).encode() for mid, n in by_mid_n.items()
                       for r in recipients_of(n)}
        lost = {k for k, tag in acked_rcpts.items() if not sink_got[(tag, k[1])]}
        twice = {k for k, v in finals.items() if v > 1}
        out = {
            "acknowledged": len(self.acked),
            "lost": len(lost),
            "lost_messages": len({mid for mid, _r in lost}),
            "receptions": len(receptions),
            "acked_without_reception": len(set(self.acked) - set(receptions)),
            "received_twice": sum(1 for v in receptions.values() if v > 1),
            "recipients": len(expected),
            "without_final": len(expected - set(finals)),
            "acked_without_final": len(set(acked_rcpts) - set(finals)),
            "final_without_reception": len(set(finals) - expected),
            "final_twice": len(twice),
            # Two final records and the sink got it once (or not at all): a record too many.
            "final_twice_not_redelivered": sum(
                1 for k in twice if k in acked_rcpts and sink_got[(acked_rcpts[k], k[1])] < 2),
            "replayed_lines": len(replayed),
            "replayed_duplicates": replayed_dupes,
            "delivered_missing_at_sink": len(missing_at_sink),
            "sink_duplicates": sum(v - 1 for v in sink_got.values() if v > 1),
            "unparsable_lines": bad_lines,
            "bounced": sum(1 for r in recs if r["type"] == "Bounce"),
            "expired": sum(1 for r in recs if r["type"] == "Expiration"),
        }
        if lost:
            out["lost_sample"] = sorted(f"{mid} {r}" for mid, r in lost)[:10]
        if self.replicas > 1:
            # Receptions of messages never acknowledged whose bytes died with their owner's
            # disk (or were cut from its copy on its return): no final record, by design.
            out["unacked_without_final"] = len({k for k in expected - set(finals)
                                                if k[0] not in by_mid_n})
        return out

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
        self.sink.stop()
        self.etcd.stop()


def _copy_of(info: dict[str, Any], shard: int) -> str | None:
    copies = info.get("copies")
    return copies.get(str(shard)) if isinstance(copies, dict) else None


def _watchdog(soak: Soak, seconds: float) -> threading.Timer:
    """Past ``seconds`` the run is hung: print every thread's stack, kill what it started,
    exit 3 (a soak never hangs; a hang is a finding)."""

    def fire() -> None:
        print(f"soak: no result after {seconds:.0f} s: hung; stacks follow", flush=True)
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        try:
            soak.close()
        finally:
            os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def run(minutes: float, nodes: int, ttl: float, seed: int, replicas: int = 1,
        min_insync: int | None = None, replica_timeout: float | None = None,
        resync_timeout: float = 180.0) -> dict[str, Any]:
    soak = Soak(nodes, ttl, seed, replicas, min_insync, replica_timeout)
    started = time.monotonic()
    watchdog = _watchdog(soak, minutes * 60 + 2 * resync_timeout + 900)
    threads = [threading.Thread(target=soak.load, args=(n,), daemon=True) for n in soak.nodes]
    try:
        if replicas > 1:
            took, what = soak.wait_in_sync(resync_timeout)
            print(f"  in sync at start: {what} "
                  f"({'never' if took is None else f'{took:.1f} s'})", flush=True)
            if took is None:
                soak.incidents.append(f"never in sync at start: {what}")
        for t in threads:
            t.start()
        deadline = started + minutes * 60
        while time.monotonic() < deadline and not soak.incidents:
            time.sleep(soak.rnd.uniform(3, 10))
            action, target = soak.chaos_step()
            if replicas > 1:
                # The next action waits for every shard to be on all its copies again: one
                # taken while a shard has a single copy could lose it by definition.
                took, what = soak.wait_in_sync(resync_timeout)
                soak.resyncs.append({"action": action, "target": target,
                                     "seconds": None if took is None else round(took, 2)})
                when = (f"NOT within {resync_timeout:g} s" if took is None
                        else f"after {took:.1f} s")
                print(f"  re-sync: {what}, {when}", flush=True)
                if took is None:
                    soak.incidents.append(f"not in sync {resync_timeout:g} s after {action} "
                                          f"{target}: {what}")
            print(f"  t={time.monotonic() - started:.0f}s acked={len(soak.acked)} "
                  f"sink={len(soak.sink.messages)}", flush=True)
        soak.stop_load.set()
        for t in threads:
            t.join(30)
        settle_deadline = time.monotonic() + 300
        while time.monotonic() < settle_deadline and not soak.settled():
            time.sleep(2)
        result = soak.reconcile()
        result.update(seconds=round(time.monotonic() - started), seed=seed, nodes=nodes,
                      ttl=ttl, faults=dict(soak.faults), settled=soak.settled(),
                      replicas=replicas, incidents=soak.incidents)
        if replicas > 1:
            times = [r["seconds"] for r in soak.resyncs if r["seconds"] is not None]
            result.update(
                min_insync=min_insync or replicas, queued_at_end=soak.queued(),
                wipes=soak.faults["wipe_node"],
                resync_median=round(statistics.median(times), 1) if times else None,
                resync_max=max(times) if times else None,
                resync_wipe_max=max((r["seconds"] for r in soak.resyncs
                                     if r["action"] == "wipe_node"
                                     and r["seconds"] is not None), default=None),
                resyncs=soak.resyncs)
            final_ok = (not result["acked_without_final"]
                        and not result["final_twice_not_redelivered"])
        else:
            final_ok = not result["without_final"] and not result["final_twice"]
        result["ok"] = (result["settled"] and final_ok and not soak.incidents
                        and not result["lost"]
                        and not result["acked_without_reception"]
                        and not result["received_twice"]
                        and not result["final_without_reception"]
                        and not result["delivered_missing_at_sink"]
                        and not result["unparsable_lines"])
        return result
    finally:
        watchdog.cancel()
        soak.stop_load.set()
        soak.close()


def append(result: dict[str, Any]) -> None:
    faults = ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items()))
    nodes = str(result["nodes"])
    without_final = result["without_final"]
    if result.get("replicas", 1) > 1:
        # Replicated, the column counts acknowledged recipients: an unacknowledged message
        # cut with its owner's copy has a Reception and, by design, no final record.
        without_final = result["acked_without_final"]
        nodes += (f", own spools, replicas {result['replicas']} (min_insync "
                  f"{result['min_insync']}); re-sync median {result['resync_median']} s, "
                  f"max {result['resync_max']} s; lost {result['lost']}; "
                  f"{result['unacked_without_final']} unacknowledged recipients cut")
    row = (f"| {time.strftime('%Y-%m-%d')} | {commit_info()['commit']} | {result['seconds']} s | "
           f"{nodes} | {faults} | {result['acknowledged']} | "
           f"{result['recipients']} | {without_final} | {result['final_twice']} | "
           f"{result['delivered_missing_at_sink']} | {result['sink_duplicates']} | "
           f"{'pass' if result['ok'] else 'FAIL'} |\n")
    add_rows(RELIABILITY, "soak", row)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--replicas", type=int, default=1,
                        help="copies of each shard, each node its own spool (1: one shared "
                             "spool); above 1 the chaos also wipes a node's spool")
    parser.add_argument("--min-insync", type=int, default=None,
                        help="copies before a 250 (default: replicas)")
    parser.add_argument("--replica-timeout", type=float, default=None,
                        help="seconds a silent follower stays in sync (default: ttl / 2)")
    parser.add_argument("--resync-timeout", type=float, default=180.0,
                        help="seconds the chaos waits for the cluster to be in sync again "
                             "before giving up (the run then fails)")
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    if args.replicas > 1 and args.replicas > args.nodes:
        parser.error("--replicas cannot exceed --nodes")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    mode = (f", replicas {args.replicas} (own spools, wipes)" if args.replicas > 1
            else ", shared spool")
    print(f"soak: {args.minutes} min, {args.nodes} nodes, ttl {args.ttl}s{mode}, seed {seed}",
          flush=True)
    result = run(args.minutes, args.nodes, args.ttl, seed, args.replicas, args.min_insync,
                 args.replica_timeout, args.resync_timeout)
    print(json.dumps(result, indent=2))
    if args.append:
        append(result)
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
