"""Failover benchmark: K trials of SIGKILL under load on a 3-node cluster with a real etcd.

    python -m benchmarks.failover --trials 5 [--ttl 2] [--append]

Per trial: start etcd and 3 nodes on a shared spool, load them through SMTP while a slow sink
holds delivery back, SIGKILL one node, and measure
- takeover: from the kill until survivors own every shard (etcd owner keys);
- RTO: from the kill to the first delivery by a survivor of a message the dead node had
  received (from the nodes' accounting logs);
- lost: messages the dead node acknowledged that were never delivered (must be 0);
- duplicates: messages delivered more than once (at-least-once: only those in flight).
"""

from __future__ import annotations

import argparse
import json
import smtplib
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from benchmarks.common import ROOT, add_rows, git_commit, machine
from tests.etcd import EtcdServer
from tests.helpers import NodeProcess, message, node_config
from tests.mailworld import Sink, SinkScript

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


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


def trial(ttl: float, load_seconds: float, sink_delay: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mta-failover-", dir=ROOT / "var"))
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
        stop = threading.Event()

        def load(nid: str, base: int) -> None:
            n = base
            try:
                with smtplib.SMTP("127.0.0.1", nodes[nid].smtp_port, timeout=10) as s:
                    while not stop.is_set():
                        n += 1
                        s.sendmail("app@sender.test", [f"r{n}@dest.test"], message(n, 1500))
                        acked[nid].append(n)
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
        stop.set()
        prefix = f"/mta/{name}/owner/"
        takeover = float("nan")
        while time.monotonic() - kill_at < 60:
            owners = {v for v, _ in etcd.get_prefix(prefix).values()}
            if len(etcd.get_prefix(prefix)) == 64 and victim.encode() not in owners:
                takeover = time.monotonic() - kill_at
                break
            time.sleep(0.05)
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
        received_by_victim = {r["message_id"] for r in _records(work / victim)
                              if r["type"] == "Reception"}
        firsts = [r["time"] for nid in nodes if nid != victim for r in _records(work / nid)
                  if r["type"] == "Delivery" and r["message_id"] in received_by_victim
                  and r["time"] > kill_wall]
        rto = min(firsts) - kill_wall if firsts else float("nan")
        lost = len(all_tags - set(seen))
        dupes = sum(1 for v in seen.values() if v > 1)
        return {"rto": rto, "takeover": takeover, "lost": lost, "dupes": dupes,
                "acked": len(all_tags), "victim_acked": len(acked[victim])}
    finally:
        for node in nodes.values():
            node.kill()
        sink.stop()
        etcd.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--ttl", type=float, default=2.0, help="lease TTL (s)")
    ap.add_argument("--load", type=float, default=3.0, help="seconds of load before the kill")
    ap.add_argument("--sink-delay", type=float, default=0.03,
                    help="seconds the sink holds each DATA (builds a backlog)")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    (ROOT / "var").mkdir(exist_ok=True)
    results = []
    for k in range(args.trials):
        r = trial(args.ttl, args.load, args.sink_delay)
        results.append(r)
        print(f"trial {k + 1}/{args.trials}: takeover {r['takeover']:.2f}s, "
              f"RTO {r['rto']:.2f}s, lost {r['lost']}, "
              f"duplicates {r['dupes']}, acked {r['acked']} ({r['victim_acked']} by the victim)",
              flush=True)
    rtos = sorted(r["rto"] for r in results)
    takeovers = sorted(r["takeover"] for r in results)
    print(f"takeover min {takeovers[0]:.2f}s median {statistics.median(takeovers):.2f}s "
          f"max {takeovers[-1]:.2f}s")
    lost = sum(r["lost"] for r in results)
    dupes = sum(r["dupes"] for r in results)
    print(f"RTO min {rtos[0]:.2f}s median {statistics.median(rtos):.2f}s max {rtos[-1]:.2f}s "
          f"(lease TTL {args.ttl:g}s); lost {lost}; duplicates {dupes}")
    if args.append:
        commit = git_commit()
        add_rows(RESULTS, "failover",
                 f"| {time.strftime('%Y-%m-%d')} | {commit} | {args.trials} | {args.ttl:g} | "
                 f"{statistics.median(takeovers):.2f} | "
                 f"{rtos[0]:.2f} | {statistics.median(rtos):.2f} | {rtos[-1]:.2f} | "
                 f"{lost} | {dupes} | {sum(r['acked'] for r in results)} | "
                 f"{args.sink_delay:g} s | {machine()} |\n")


if __name__ == "__main__":
    main()
