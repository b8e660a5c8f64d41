"""Failover benchmark: K trials of SIGKILL under load on a 3-node cluster with a real etcd.

    python -m benchmarks failover [--trials 5] [--ttl 2] [--after 6]
    python -m benchmarks failover --replicated [--trials 10] [--min-insync 2] [--quick]

Per trial: start etcd and 3 nodes on a shared spool, load them through SMTP while a slow sink
holds delivery back, SIGKILL one node, and measure
- takeover: from the kill until survivors own every shard (etcd owner keys);
- RTO: from the kill to the first delivery by a survivor of a message the dead node had
  received (from the nodes' accounting logs);
- lost: messages the dead node acknowledged that were never delivered (must be 0);
- duplicates: messages delivered more than once (at-least-once: only those in flight);
- ack pause: the longest the survivors went without a 250 after the kill;
- a timeline (acknowledged and delivered per 250 ms, the victim's mail apart) for the plot:
  the survivors keep taking load through the kill.

``--replicated`` (issue 16, failover with disk loss): each node has its own spool directory,
``[spool] replicas = 2`` (``min_insync`` 2 unless told), and the killed node's spool directory
is deleted right after the SIGKILL, so its mail survives only on its followers' copies. RTO is
then from the SIGKILL to the first message of a shard the dead node owned (etcd owner keys just
before the kill) that the sink receives from a survivor (a survivor's accounting log has its
Delivery); also *re-replicated*: until every shard again has 2 in-sync copies on the
survivors, and *refused after kill*: 4xx answers while shards are under-replicated. Saved as
``failover-replicated``, with its timeline in plots/failover-replicated-timeline.png.
Goal: RTO <= lease TTL + 2 s, 0 lost.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import smtplib
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, Result, finish, fmt, progress, strict
from benchmarks.replicated import (
    fully_replicated,
    owners,
    replicated_sections,
    wait_replicated,
)
from benchmarks.targets import workdir
from harness.config import node_config
from harness.etcd import EtcdServer
from harness.mail import message
from harness.node import NodeProcess
from harness.sink import Received, Sink, SinkScript
from mta.envelope import shard_of

NODES = ("n1", "n2", "n3")
SHARDS = 64
PLOT = "failover-replicated-timeline.png"
_QUEUE_ID = re.compile(rb"\(mta\) with \S+ id ([^;\s]+)")


def _tag(n: int) -> bytes:
    return f"X-Test-Id: {n}".encode()


def _records(workdir: Path) -> list[dict]:
    path = workdir / "acct.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # the victim's last line may be cut by the kill
    return out


def _queue_id(m: Received) -> str | None:
    """The queue id our node gave a message (its own Received: line, the first one)."""
    found = _QUEUE_ID.search(m.content[:4096])
    return found.group(1).decode() if found else None


def _timeline(acked_at: dict[str, list[float]], deliveries: list[tuple[float, bool]],
              victim: str, kill_wall: float, step: float = 0.25) -> dict[str, list[float]]:
    """Per ``step`` seconds around the kill: messages acknowledged by the victim and by the
    survivors, and deliveries (seconds from the kill, whether of the victim's mail)."""
    start = min((t for ts in acked_at.values() for t in ts), default=kill_wall) - kill_wall
    end = max((t for t, _ in deliveries), default=0.0)
    n = int((end - start) / step) + 1
    out: dict[str, list[float]] = {k: [0.0] * n for k in (
        "acked_victim", "acked_survivors", "delivered_victim", "delivered_survivors")}
    out["t"] = [start + i * step for i in range(n)]

    def put(key: str, t: float) -> None:
        i = int((t - start) / step)
        if 0 <= i < n:
            out[key][i] += 1 / step

    for nid, ts in acked_at.items():
        for t in ts:
            put("acked_victim" if nid == victim else "acked_survivors", t - kill_wall)
    for t, theirs in deliveries:
        put("delivered_victim" if theirs else "delivered_survivors", t)
    return out


class _Monitor(threading.Thread):
    """Polls etcd from the kill: when the survivors own every shard (takeover) and, with
    replicas, when every shard again has 2 in-sync copies on survivors (re-replicated)."""

    def __init__(self, etcd: EtcdServer, name: str, victim: str, kill_at: float,
                 replicated: bool, timeout: float = 90.0) -> None:
        super().__init__(daemon=True)
        self.etcd, self.name, self.victim, self.kill_at = etcd, name, victim, kill_at
        self.replicated, self.timeout = replicated, timeout
        self.takeover = float("nan")
        self.rereplicated = float("nan")
        self.done = threading.Event()

    def run(self) -> None:
        survivors = set(NODES) - {self.victim}
        while time.monotonic() - self.kill_at < self.timeout and not self.done.is_set():
            try:
                own = owners(self.etcd, self.name)
                if math.isnan(self.takeover) and len(own) == SHARDS \
                        and self.victim not in own.values():
                    self.takeover = time.monotonic() - self.kill_at
                if self.replicated and math.isnan(self.rereplicated) \
                        and fully_replicated(self.etcd, self.name, survivors, SHARDS, 2):
                    self.rereplicated = time.monotonic() - self.kill_at
            except Exception:  # etcd slow under load: poll again
                pass
            if not math.isnan(self.takeover) and (not self.replicated
                                                  or not math.isnan(self.rereplicated)):
                return
            time.sleep(0.05)


def _start(nodes: dict[str, NodeProcess], work: Path, etcd: EtcdServer, sink: Sink,
           name: str, ttl: float, replicated: bool, min_insync: int, log_level: str) -> None:
    """The 3 nodes (into ``nodes``, which the caller kills), started at once: the leader
    splits the shards (and with replicas their copies) between them from the start."""
    for nid in NODES:
        (work / nid).mkdir()
        spool: dict[str, Any] = {"shards": SHARDS}
        cluster: dict[str, Any] = {"etcd": [etcd.endpoint], "name": name, "lease_ttl": ttl}
        if replicated:
            more = replicated_sections(etcd, name, ttl, replicas=2, min_insync=min_insync)
            spool |= more["spool"]
            cluster |= more["cluster"]
        raw = node_config(work / nid / "spool" if replicated else work / "spool",
                          node={"id": nid, "log_level": log_level}, spool=spool,
                          cluster=cluster,
                          delivery={"enabled": True, "smarthost": f"127.0.0.1:{sink.port}",
                                    "max_connections": 2, "retry_initial": "300ms",
                                    "retry_max": "1s",
                                    "accounting_log": str(work / nid / "acct.jsonl")})
        nodes[nid] = NodeProcess(work / nid, raw)
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda node: node.start(timeout=60), nodes.values()))


class _Load:
    """One SMTP client per node sending until :meth:`stop`: what each node acknowledged (and
    when), and when a 4xx answer came."""

    def __init__(self, nodes: dict[str, NodeProcess], sessions: int = 1) -> None:
        self.acked: dict[str, list[int]] = {n: [] for n in nodes}
        self.acked_at: dict[str, list[float]] = {n: [] for n in nodes}
        self.refused_at: list[float] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(
            nid, node.smtp_port, (i * sessions + k) * 1_000_000))
            for i, (nid, node) in enumerate(nodes.items()) for k in range(sessions)]
        for t in self.threads:
            t.start()

    def _run(self, nid: str, port: int, base: int) -> None:
        n = base
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                while not self._stop.is_set():
                    n += 1
                    try:
                        s.sendmail("app@sender.test", [f"r{n}@dest.test"], message(n, 1500))
                    except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused):
                        # 451 from a shard below min_insync copies: the client retries
                        # later, as any MTA client does; the session goes on.
                        self.refused_at.append(time.time())
                        time.sleep(0.01)
                        continue
                    self.acked[nid].append(n)
                    self.acked_at[nid].append(time.time())
        except (smtplib.SMTPException, OSError):
            return

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(15)


def _ack_pause(acked_at: dict[str, list[float]], victim: str, kill_wall: float) -> float:
    """The longest the survivors went without acknowledging anything after the kill (from
    the kill to their first 250, or between two): how long their clients stalled."""
    ts = sorted(t for nid, v in acked_at.items() if nid != victim for t in v if t > kill_wall)
    if not ts:
        return float("nan")
    return max(b - a for a, b in zip([kill_wall, *ts], ts, strict=False))


def _wait_delivered(sink: Sink, tags: set[bytes], timeout: float = 120.0) -> Counter[bytes]:
    """Wait until the sink holds every message of ``tags``; how often it got each."""
    deadline = time.monotonic() + timeout
    while True:
        seen = Counter(line for m in list(sink.messages) for line in m.content.split(b"\r\n")
                       if line.startswith(b"X-Test-Id: "))
        if tags <= set(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def trial(ttl: float, load_seconds: float, sink_delay: float, after: float,
          replicated: bool = False, min_insync: int = 2, sessions: int = 1,
          keep: bool = False, log_level: str = "warning") -> dict[str, Any]:
    work = workdir("mta-failover-")
    etcd = EtcdServer(work / "etcd").start()
    sink = Sink("127.0.0.1", 0, SinkScript(data_delay=sink_delay))
    sink.start()
    name = f"b{uuid.uuid4().hex[:6]}"
    nodes: dict[str, NodeProcess] = {}
    try:
        _start(nodes, work, etcd, sink, name, ttl, replicated, min_insync, log_level)
        if replicated:
            wait_replicated(etcd, name, set(NODES), SHARDS, copies=2)
        time.sleep(ttl + 1)  # let the cluster settle
        load = _Load(nodes, sessions)
        time.sleep(load_seconds)
        victim = "n2"
        owned = {s for s, o in owners(etcd, name).items() if o == victim}
        kill_wall = time.time()
        kill_at = time.monotonic()
        nodes[victim].kill()
        if replicated:
            shutil.rmtree(work / victim / "spool")  # the disk is gone with the node
        monitor = _Monitor(etcd, name, victim, kill_at, replicated)
        monitor.start()
        # The survivors keep accepting: sending must not stop while the shards move.
        time.sleep(max(0.0, after - (time.monotonic() - kill_at)))
        load.stop()
        all_tags = {_tag(n) for v in load.acked.values() for n in v}
        seen = _wait_delivered(sink, all_tags)
        time.sleep(0.5)  # accounting logs flush every 200 ms
        monitor.join(max(0.0, monitor.timeout - (time.monotonic() - kill_at)))
        monitor.done.set()
        records = {nid: _records(work / nid) for nid in nodes}
        run: dict[str, Any] = {
            "takeover": monitor.takeover, "lost": len(all_tags - set(seen)),
            "dupes": sum(1 for v in seen.values() if v > 1), "acked": len(all_tags),
            "victim_acked": len(load.acked[victim]),
            "acked_after_kill": sum(1 for nid in nodes if nid != victim
                                    for t in load.acked_at[nid] if t > kill_wall),
            "ack_pause": _ack_pause(load.acked_at, victim, kill_wall)}
        if replicated:
            run |= _replicated_figures(sink.messages, records, victim, owned, kill_wall,
                                       kill_at, sink_delay)
            run |= {"rereplicated": monitor.rereplicated, "victim_shards": len(owned),
                    "refused": len(load.refused_at),
                    "refused_after_kill": sum(1 for t in load.refused_at if t > kill_wall)}
            deliveries = run.pop("deliveries")
        else:
            received_by_victim = {r["message_id"] for r in records[victim]
                                  if r["type"] == "Reception"}
            firsts = [r["time"] for nid in nodes if nid != victim for r in records[nid]
                      if r["type"] == "Delivery" and r["message_id"] in received_by_victim
                      and r["time"] > kill_wall]
            run["rto"] = min(firsts) - kill_wall if firsts else float("nan")
            deliveries = [(r["time"] - kill_wall, r["message_id"] in received_by_victim)
                          for rs in records.values() for r in rs if r["type"] == "Delivery"]
        run["timeline"] = _timeline(load.acked_at, deliveries, victim, kill_wall)
        return run
    finally:
        for node in nodes.values():
            node.kill()
        sink.stop()
        etcd.kill()
        if keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _replicated_figures(messages: list[Received], records: dict[str, list[dict]], victim: str,
                        owned: set[int], kill_wall: float, kill_at: float, sink_delay: float
                        ) -> dict[str, Any]:
    """RTO with disk loss: from the kill to the sink receiving, from a survivor, the first
    message of a shard the victim owned. "From a survivor": a survivor's accounting log has
    its Delivery, and it arrived after any DATA the victim had in flight could have ended
    (the sink holds each for ``sink_delay``). ``rto_acct``: the same from the survivor's
    accounting line. Deliveries (seconds from the kill, of the victim's shards?) go to the
    timeline."""
    by_survivor = {r["message_id"]: r["time"] for nid, rs in records.items() if nid != victim
                   for r in rs if r["type"] == "Delivery"}
    deliveries = []
    firsts = []
    copies: Counter[str] = Counter()
    for m in list(messages):
        qid = _queue_id(m)
        theirs = qid is not None and shard_of(qid) in owned
        deliveries.append((m.at - kill_at, theirs))
        if qid is not None:
            copies[qid] += 1
        if theirs and qid in by_survivor and m.at > kill_at + sink_delay + 0.1:
            firsts.append(m.at - kill_at)
    acct = [t - kill_wall for qid, t in by_survivor.items()
            if shard_of(qid) in owned and t > kill_wall]
    return {"rto": min(firsts, default=float("nan")),
            "rto_acct": min(acct, default=float("nan")),
            "victim_mail_by_survivors": len(acct), "deliveries": deliveries,
            # Messages delivered twice whose shard the victim did not own: none expected (a
            # survivor's own shards never change hands).
            "dupes_other_shards": sum(1 for qid, n in copies.items()
                                      if n > 1 and shard_of(qid) not in owned)}


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """The replicated failover's timeline, drawn as the shared-spool one (report.py), into
    ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from benchmarks.report import _plot_failover

    fig = _plot_failover(plt, {"failover": [data]})
    if fig is None:
        return None
    p = data["params"]
    fig.axes[0].set_title(f"Failover with disk loss, replicated spool ({data['commit']}, "
                          f"lease TTL {p['ttl']:g} s, min_insync {p['min_insync']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks failover",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--ttl", type=float, default=2.0, help="lease TTL (s)")
    ap.add_argument("--load", type=float, default=3.0, help="seconds of load before the kill")
    ap.add_argument("--after", type=float, default=6.0,
                    help="seconds the survivors keep taking load after the kill")
    ap.add_argument("--sink-delay", type=float, default=0.03,
                    help="seconds the sink holds each DATA (builds a backlog)")
    ap.add_argument("--replicated", action="store_true",
                    help="each node its own spool, replicas = 2; the killed node's spool "
                         "directory is deleted (disk loss)")
    ap.add_argument("--min-insync", type=int, default=2,
                    help="with --replicated: copies a message is on before 250 (1 or 2)")
    ap.add_argument("--sessions", type=int, default=1,
                    help="SMTP sessions per node the load keeps busy")
    ap.add_argument("--keep", action="store_true",
                    help="keep each trial's directory under var/ (node logs, accounting)")
    ap.add_argument("--log-level", default="warning", help="the nodes' (info: to debug)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 trials, 2 s of load, 5 s after the kill; implies "
                         "--no-save (the plot goes to var/)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    if args.quick:
        for key, value in (("trials", 2), ("load", 2.0), ("after", 5.0)):
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
        args.no_save = True
    scenario = "failover-replicated" if args.replicated else "failover"
    params = vars(args) if args.replicated else {
        k: v for k, v in vars(args).items()
        if k not in ("replicated", "min_insync", "quick", "keep", "log_level")
        and (k != "sessions" or v != 1)}
    result = Result(scenario, params)
    labels: dict[str, Any] = {"ttl": args.ttl}
    if args.replicated:
        labels |= {"replicas": 2, "min_insync": args.min_insync}
    with progress(args.trials, scenario, unit="trial") as bar:
        for k in range(args.trials):
            r = trial(args.ttl, args.load, args.sink_delay, args.after, args.replicated,
                      args.min_insync, args.sessions, args.keep, args.log_level)
            result.add(labels, r)
            bar.update(1)
            more = ""
            if args.replicated:
                more = (f", RTO by accounting {r['rto_acct']:.2f}s, "
                        f"re-replicated {r['rereplicated']:.2f}s, duplicates outside its "
                        f"shards {r['dupes_other_shards']}, {r['victim_shards']} "
                        f"shards lost their disk, refused {r['refused_after_kill']} after the "
                        f"kill ({r['refused']} in all)")
            bar.say(f"trial {k + 1}/{args.trials}: takeover {r['takeover']:.2f}s, "
                    f"RTO {r['rto']:.2f}s, lost {r['lost']}, duplicates {r['dupes']}, "
                    f"survivors' longest pause in 250s {r['ack_pause']:.2f}s, "
                    f"acked {r['acked']} ({r['victim_acked']} by the victim, "
                    f"{r['acked_after_kill']} by survivors after the kill){more}")
    runs = result.runs()
    what = ("failover with disk loss (replicas 2, min_insync "
            f"{args.min_insync}, " if args.replicated else "failover (")
    lines = [f"{what}lease TTL {args.ttl:g} s, {args.trials} trials): takeover "
             f"{fmt(result.summary('takeover'), 2)} s, RTO {fmt(result.summary('rto'), 2)} s, "
             f"lost {sum(r['lost'] for r in runs)}, duplicates {sum(r['dupes'] for r in runs)}"]
    if args.replicated:
        rtos = [r["rto"] for r in runs]
        goal = args.ttl + 2
        worst = max(rtos) if rtos else float("nan")
        lines.append(f"RTO per trial (s): {', '.join(f'{v:.2f}' for v in rtos)}; max "
                     f"{worst:.2f} vs goal {goal:g} (TTL + 2 s): "
                     f"{'met' if worst <= goal else 'MISSED'}; re-replicated "
                     f"{fmt(result.summary('rereplicated'), 2)} s")
        result.series["goal_rto_s"] = goal
    finish(result, lines, args)
    if args.replicated:
        where = (ROOT / "benchmarks" / "plots" if not args.no_save else ROOT / "var") / PLOT
        data = strict({**result.to_json(), "file": ""})
        if (path := plot(data, where)) is not None:
            print(f"timeline plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
