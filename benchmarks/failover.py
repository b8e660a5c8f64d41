"""Failover benchmark: K trials of SIGKILL under load on a 3-node cluster with a real etcd.

    python -m benchmarks failover [--trials 5] [--ttl 2] [--after 6]

Per trial: start etcd and 3 nodes on a shared spool, load them through SMTP while a slow sink
holds delivery back, SIGKILL one node, and measure
- takeover: from the kill until survivors own every shard (etcd owner keys);
- RTO: from the kill to the first delivery by a survivor of a message the dead node had
  received (from the nodes' accounting logs);
- lost: messages the dead node acknowledged that were never delivered (must be 0);
- duplicates: messages delivered more than once (at-least-once: only those in flight);
- a timeline (acknowledged and delivered per 250 ms, the victim's mail apart) for the plot:
  the survivors keep taking load through the kill.
"""

from __future__ import annotations

import argparse
import json
import shutil
import smtplib
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.harness import Result, finish, fmt, progress
from benchmarks.targets import workdir
from harness.config import node_config
from harness.etcd import EtcdServer
from harness.mail import message
from harness.node import NodeProcess
from harness.sink import Sink, SinkScript


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


def _timeline(acked_at: dict[str, list[float]], records: dict[str, list[dict]], victim: str,
              ids_victim: set[str], kill_wall: float, step: float = 0.25
              ) -> dict[str, list[float]]:
    """Per ``step`` seconds around the kill: messages acknowledged by the victim and by the
    survivors, and deliveries of the victim's mail (``ids_victim``) and of the survivors'."""
    start = min((t for ts in acked_at.values() for t in ts), default=kill_wall) - kill_wall
    end = max((r["time"] for rs in records.values() for r in rs if r["type"] == "Delivery"),
              default=kill_wall) - kill_wall
    n = int((end - start) / step) + 1
    out: dict[str, list[float]] = {k: [0.0] * n for k in (
        "acked_victim", "acked_survivors", "delivered_victim", "delivered_survivors")}
    out["t"] = [start + i * step for i in range(n)]

    def put(key: str, t: float) -> None:
        i = int((t - kill_wall - start) / step)
        if 0 <= i < n:
            out[key][i] += 1 / step

    for nid, ts in acked_at.items():
        for t in ts:
            put("acked_victim" if nid == victim else "acked_survivors", t)
    for rs in records.values():
        for r in rs:
            if r["type"] == "Delivery":
                put("delivered_victim" if r["message_id"] in ids_victim
                    else "delivered_survivors", r["time"])
    return out


def trial(ttl: float, load_seconds: float, sink_delay: float, after: float
          ) -> dict[str, Any]:
    work = workdir("mta-failover-")
    etcd = EtcdServer(work / "etcd").start()
    sink = Sink("127.0.0.1", 0, SinkScript(data_delay=sink_delay))
    sink.start()
    name = f"b{uuid.uuid4().hex[:6]}"
    nodes: dict[str, NodeProcess] = {}
    try:
        for nid in ("n1", "n2", "n3"):
            (work / nid).mkdir()
            raw = node_config(work / "spool", node={"id": nid}, spool={"shards": 64},
                              cluster={"etcd": [etcd.endpoint], "name": name, "lease_ttl": ttl},
                              delivery={"enabled": True, "smarthost": f"127.0.0.1:{sink.port}",
                                        "max_connections": 2, "retry_initial": "300ms",
                                        "retry_max": "1s",
                                        "accounting_log": str(work / nid / "acct.jsonl")})
            nodes[nid] = NodeProcess(work / nid, raw).start(timeout=30)
        time.sleep(ttl + 1)  # let the cluster settle
        acked: dict[str, list[int]] = {n: [] for n in nodes}
        acked_at: dict[str, list[float]] = {n: [] for n in nodes}
        stop = threading.Event()

        def load(nid: str, base: int) -> None:
            n = base
            try:
                with smtplib.SMTP("127.0.0.1", nodes[nid].smtp_port, timeout=10) as s:
                    while not stop.is_set():
                        n += 1
                        s.sendmail("app@sender.test", [f"r{n}@dest.test"], message(n, 1500))
                        acked[nid].append(n)
                        acked_at[nid].append(time.time())
            except (smtplib.SMTPException, OSError):
                return

        threads = [threading.Thread(target=load, args=(nid, i * 10_000_000))
                   for i, nid in enumerate(nodes)]
        for t in threads:
            t.start()
        time.sleep(load_seconds)
        victim = "n2"
        kill_wall = time.time()
        kill_at = time.monotonic()
        nodes[victim].kill()
        prefix = f"/mta/{name}/owner/"
        takeover = float("nan")
        while time.monotonic() - kill_at < 60:
            owners = {v for v, _ in etcd.get_prefix(prefix).values()}
            if len(etcd.get_prefix(prefix)) == 64 and victim.encode() not in owners:
                takeover = time.monotonic() - kill_at
                break
            time.sleep(0.05)
        # The survivors keep accepting: sending must not stop while the shards move.
        time.sleep(max(0.0, after - (time.monotonic() - kill_at)))
        stop.set()
        for t in threads:
            t.join(15)
        all_tags = {_tag(n) for v in acked.values() for n in v}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = Counter(line for m in list(sink.messages)
                           for line in m.content.split(b"\r\n")
                           if line.startswith(b"X-Test-Id: "))
            if all_tags <= set(seen):
                break
            time.sleep(0.2)
        time.sleep(0.5)  # accounting logs flush every 200 ms
        records = {nid: _records(work / nid) for nid in nodes}
        received_by_victim = {r["message_id"] for r in records[victim]
                              if r["type"] == "Reception"}
        firsts = [r["time"] for nid in nodes if nid != victim for r in records[nid]
                  if r["type"] == "Delivery" and r["message_id"] in received_by_victim
                  and r["time"] > kill_wall]
        rto = min(firsts) - kill_wall if firsts else float("nan")
        survivors_after = sum(1 for nid in nodes if nid != victim
                              for t in acked_at[nid] if t > kill_wall)
        lost = len(all_tags - set(seen))
        dupes = sum(1 for v in seen.values() if v > 1)
        return {"rto": rto, "takeover": takeover, "lost": lost, "dupes": dupes,
                "acked": len(all_tags), "victim_acked": len(acked[victim]),
                "acked_after_kill": survivors_after,
                "timeline": _timeline(acked_at, records, victim, received_by_victim,
                                      kill_wall)}
    finally:
        for node in nodes.values():
            node.kill()
        sink.stop()
        etcd.kill()
        shutil.rmtree(work, ignore_errors=True)


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
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    result = Result("failover", vars(args))
    with progress(args.trials, "failover", unit="trial") as bar:
        for k in range(args.trials):
            r = trial(args.ttl, args.load, args.sink_delay, args.after)
            result.add({"ttl": args.ttl}, r)
            bar.update(1)
            bar.say(f"trial {k + 1}/{args.trials}: takeover {r['takeover']:.2f}s, "
                    f"RTO {r['rto']:.2f}s, lost {r['lost']}, duplicates {r['dupes']}, "
                    f"acked {r['acked']} ({r['victim_acked']} by the victim, "
                    f"{r['acked_after_kill']} by survivors after the kill)")
    runs = result.runs()
    lines = [f"failover (lease TTL {args.ttl:g} s, {args.trials} trials): takeover "
             f"{fmt(result.summary('takeover'), 2)} s, RTO {fmt(result.summary('rto'), 2)} s, "
             f"lost {sum(r['lost'] for r in runs)}, duplicates {sum(r['dupes'] for r in runs)}"]
    finish(result, lines, args)


if __name__ == "__main__":
    main()
