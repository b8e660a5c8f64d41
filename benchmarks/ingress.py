"""Durable ingress benchmark: N messages of S KB over C sessions into a real node.

    python -m benchmarks.ingress --messages 20000 --size 5 --concurrency 50 [--no-reuse]

Starts an ``mta`` node (subprocess, real spool on disk, fsync on), drives it with a pipelining
SMTP load generator spread over several processes, and reports msgs/s, submission latency
(end of DATA to the 250) p50/p99, and the node's group-commit batch size. ``--append`` adds a
row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import (
    ROOT,
    add_rows,
    free_port,
    git_commit,
    launch_node,
    machine,
    run_load,
    stop_node,
)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def run_bench(messages: int, size_kb: float, concurrency: int, reuse: bool, procs: int,
              shards: int, log_level: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mta-bench-", dir=str(ROOT / "var")
                                 if (ROOT / "var").exists() else None))
    smtp_port, admin_port = free_port(), free_port()
    node, log = launch_node(
        work, smtp_port, admin_port, concurrency, log_level,
        f'[spool]\npath = "{work / "spool"}"\nshards = {shards}\n'
        # Durable accept only; benchmarks/relay.py measures accept + delivery together.
        f'[delivery]\nenabled = false\naccounting_log = "{work / "acct.jsonl"}"\n')
    try:
        results, start_at = run_load(smtp_port, messages, concurrency, procs, size_kb, reuse)
        elapsed = time.time() - start_at
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
    finally:
        stop_node(node, log)
    ok = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    batches = _metric(metrics, "mta_spool_batch_records_count")
    records = _metric(metrics, "mta_spool_batch_records_sum")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "accepted": ok,
        "seconds": elapsed,
        "msgs_per_s": ok / elapsed,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "batch": records / batches if batches else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=float, default=5.0, help="message size in KB")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--no-reuse", action="store_true", help="one connection per message")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    ap.add_argument("--append", action="store_true", help="append a row to RESULTS.md")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    runs = [run_bench(args.messages, args.size, args.concurrency, not args.no_reuse, args.procs,
                      args.shards, args.log_level) for _ in range(args.repeat)]
    runs.sort(key=lambda r: r["msgs_per_s"])
    res = runs[len(runs) // 2]
    mode = "no reuse" if args.no_reuse else "reuse"
    spread = f"{runs[0]['msgs_per_s']:.0f}-{runs[-1]['msgs_per_s']:.0f}"
    print(f"ingress {mode}: {res['accepted']:.0f} x {args.size:g} KB over {args.concurrency} "
          f"sessions: median {res['msgs_per_s']:.0f} msg/s (min-max {spread} over "
          f"{len(runs)} runs); p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms; "
          f"batch {res['batch']:.1f} records/fsync")
    if args.append:
        commit = git_commit()
        row = (f"| {time.strftime('%Y-%m-%d')} | {commit} | {mode} | {res['accepted']:.0f} | "
               f"{args.size:g} KB | {args.concurrency} | {res['msgs_per_s']:.0f} ({spread}) | "
               f"{res['p50_ms']:.2f} | {res['p99_ms']:.2f} | {res['batch']:.1f} | "
               f"{machine()} | {args.note} |\n")
        add_rows(RESULTS, "ingress", row)


if __name__ == "__main__":
    main()
