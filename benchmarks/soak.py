"""Soak: a cluster under steady load while a chaos loop kills things; then reconcile.

    python -m benchmarks.soak --minutes 10 [--nodes 3] [--ttl 2] [--seed N] [--append]

Three node processes (shared spool, real etcd) take mail from one load thread each and
deliver it to a loopback sink (which defers some recipients once, so retries happen too).
Every few seconds the chaos loop does one of: SIGKILL a node (restarted a moment later),
SIGTERM a node (graceful handoff, restarted), SIGSTOP a node for up to two lease TTLs, or
SIGKILL etcd for a while (restarted on the same data). At the end everything is brought back,
the load stops, the cluster drains, and the accounting logs of all nodes are reconciled:

- every message a client got a 250 for has exactly one Reception;
- every Reception has exactly one final record (Delivery, Bounce, Expiration) per recipient;
- the sink received every recipient the logs say was delivered.

Not part of the test suite (it runs for minutes); ``--append`` adds the result to
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import smtplib
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import add_rows
from benchmarks.harness import ROOT, commit_info
from harness.config import node_config
from harness.etcd import EtcdServer
from harness.mail import message
from harness.node import NodeProcess
from harness.sink import AnyAddress, Sink, SinkScript

FINAL = ("Delivery", "Bounce", "Expiration", "AdminBounce")
RELIABILITY = ROOT / "docs" / "reliability.md"


class Soak:
    """The cluster, the load and the chaos of one run."""

    def __init__(self, nodes: int, ttl: float, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.ttl = ttl
        self.work = Path(tempfile.mkdtemp(prefix="mta-soak-", dir=ROOT / "var"))
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
        self.nodes: dict[str, NodeProcess] = {}
        for i in range(nodes):
            node_id = f"s{i + 1}"
            work = self.work / node_id
            work.mkdir()
            raw = node_config(
                self.work / "spool", node={"id": node_id, "log_level": "info"},
                spool={"shards": 64},
                smtp={"command_timeout": "30s", "data_timeout": "30s"},
                cluster={"etcd": [self.etcd.endpoint], "name": self.name, "lease_ttl": ttl},
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
                        rcpts = [f"r{n}-{k}@{dom}" for k, dom in
                                 enumerate(("one.test", "two.test")[:1 + n % 2])]
                        smtp.mail("app@sender.test")
                        for r in rcpts:
                            smtp.rcpt(r)
                        code, reply = smtp.data(message(n, 1500))
                        if code == 250:
                            with self.acked_lock:
                                self.acked[reply.decode().rsplit(" ", 1)[1]] = n
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
                time.sleep(1)
        raise RuntimeError(f"node would not restart:\n{node.log()[-3000:]}")

    def chaos_step(self) -> None:
        action = self.rnd.choice(["kill_node", "kill_node", "stop_node", "pause_node",
                                  "kill_etcd"])
        node = self.nodes[self.rnd.choice(sorted(self.nodes))]
        self.faults[action] += 1
        print(f"  chaos: {action} {node.workdir.name if action != 'kill_etcd' else 'etcd'}",
              flush=True)
        if action == "kill_node":
            node.kill()
            time.sleep(self.rnd.uniform(0.5, 2 * self.ttl))
            self._restart(node)
        elif action == "stop_node":
            node.signal(signal.SIGTERM)
            node.wait(90)
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

    def settled(self) -> bool:
        recs, _ = self.records()
        finals = {(r["message_id"], r["recipient"]) for r in recs if r["type"] in FINAL}
        return all((r["message_id"], x) in finals for r in recs if r["type"] == "Reception"
                   for x in r["recipients"])

    def reconcile(self) -> dict[str, Any]:
        recs, bad_lines = self.records()
        receptions = Counter(r["message_id"] for r in recs if r["type"] == "Reception")
        expected = {(r["message_id"], x) for r in recs if r["type"] == "Reception"
                    for x in r["recipients"]}
        finals = Counter((r["message_id"], r["recipient"]) for r in recs if r["type"] in FINAL)
        delivered = {(r["message_id"], r["recipient"]) for r in recs
                     if r["type"] == "Delivery"}
        by_mid_n = dict(self.acked)
        sink_got: Counter[tuple[bytes, str]] = Counter()
        for m in self.sink.messages:
            if b"X-Test-Id: " not in m.content:
                continue  # a DSN
            tag = m.content.split(b"X-Test-Id: ")[1].split(b"\r\n")[0]
            for rcpt in m.recipients:
                sink_got[(tag, rcpt)] += 1
        missing_at_sink = [(mid, r) for mid, r in delivered
                           if mid in by_mid_n
                           and (str(by_mid_n[mid]).encode(), r) not in sink_got]
        return {
            "acknowledged": len(self.acked),
            "receptions": len(receptions),
            "acked_without_reception": len(set(self.acked) - set(receptions)),
            "received_twice": sum(1 for v in receptions.values() if v > 1),
            "recipients": len(expected),
            "without_final": len(expected - set(finals)),
            "final_without_reception": len(set(finals) - expected),
            "final_twice": sum(1 for v in finals.values() if v > 1),
            "delivered_missing_at_sink": len(missing_at_sink),
            "sink_duplicates": sum(v - 1 for v in sink_got.values() if v > 1),
            "unparsable_lines": bad_lines,
            "bounced": sum(1 for r in recs if r["type"] == "Bounce"),
            "expired": sum(1 for r in recs if r["type"] == "Expiration"),
        }

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
        self.sink.stop()
        self.etcd.stop()


def run(minutes: float, nodes: int, ttl: float, seed: int) -> dict[str, Any]:
    soak = Soak(nodes, ttl, seed)
    started = time.monotonic()
    threads = [threading.Thread(target=soak.load, args=(n,), daemon=True) for n in soak.nodes]
    try:
        for t in threads:
            t.start()
        deadline = started + minutes * 60
        while time.monotonic() < deadline:
            time.sleep(soak.rnd.uniform(3, 10))
            soak.chaos_step()
            print(f"  t={time.monotonic() - started:.0f}s acked={len(soak.acked)} "
                  f"sink={len(soak.sink.messages)}", flush=True)
        soak.stop_load.set()
        for t in threads:
            t.join(30)
        settle_deadline = time.monotonic() + 300
        while time.monotonic() < settle_deadline and not soak.settled():
            time.sleep(1)
        result = soak.reconcile()
        result.update(seconds=round(time.monotonic() - started), seed=seed, nodes=nodes,
                      ttl=ttl, faults=dict(soak.faults), settled=soak.settled())
        result["ok"] = (result["settled"] and not result["acked_without_reception"]
                        and not result["received_twice"] and not result["without_final"]
                        and not result["final_without_reception"]
                        and not result["final_twice"]
                        and not result["delivered_missing_at_sink"]
                        and not result["unparsable_lines"])
        return result
    finally:
        soak.stop_load.set()
        soak.close()


def append(result: dict[str, Any]) -> None:
    faults = ", ".join(f"{k} {v}" for k, v in sorted(result["faults"].items()))
    row = (f"| {time.strftime('%Y-%m-%d')} | {commit_info()['commit']} | {result['seconds']} s | "
           f"{result['nodes']} | {faults} | {result['acknowledged']} | "
           f"{result['recipients']} | {result['without_final']} | {result['final_twice']} | "
           f"{result['delivered_missing_at_sink']} | {result['sink_duplicates']} | "
           f"{'pass' if result['ok'] else 'FAIL'} |\n")
    add_rows(RELIABILITY, "soak", row)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: {args.minutes} min, {args.nodes} nodes, ttl {args.ttl}s, seed {seed}",
          flush=True)
    result = run(args.minutes, args.nodes, args.ttl, seed)
    print(json.dumps(result, indent=2))
    if args.append:
        append(result)
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
