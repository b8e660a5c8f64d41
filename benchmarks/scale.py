"""Scale: 1 vs 2 (vs N) node processes on one machine sharing the SMTP port (SO_REUSEPORT).

    python -m benchmarks.scale [--processes 1,2] [--messages 20000] [--repeat 3] [--append]

Each process is a standalone node with its own spool (durable accept, delivery off); the
kernel spreads the load generator's connections over them. Target (issue 7): 2 processes
>= 1.7x one process. The load generator runs on the same cores, which caps what extra node
processes can win on a small machine: the figure says what this box does, not what the design
could do on more cores.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
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


def run_scale(processes: int, messages: int, size_kb: float, concurrency: int,
              procs: int) -> dict[str, float]:
    (ROOT / "var").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mta-scale-", dir=ROOT / "var"))
    port = free_port()
    nodes = []
    try:
        for i in range(processes):
            node_dir = work / f"n{i}"
            node_dir.mkdir()
            nodes.append(launch_node(
                node_dir, port, free_port(), concurrency, "warning",
                f'[spool]\npath = "{node_dir / "spool"}"\n'
                f'[delivery]\nenabled = false\naccounting_log = "{node_dir / "a.jsonl"}"\n',
                smtp_extra="reuse_port = true\n", node_id=f"scale{i}"))
        results, start_at = run_load(port, messages, concurrency, procs, size_kb, True)
        elapsed = time.time() - start_at
    finally:
        for node, log in nodes:
            stop_node(node, log)
        shutil.rmtree(work, ignore_errors=True)
    ok = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    return {"accepted": ok, "msgs_per_s": ok / elapsed,
            "p50_ms": statistics.median(lat) * 1000 if lat else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts")
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    counts = [int(x) for x in args.processes.split(",")]
    runs: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeat):
        for n in counts:  # alternate, so a machine slowing down hurts every count alike
            runs[n].append(run_scale(n, args.messages, args.size, args.concurrency,
                                     args.procs)["msgs_per_s"])
    base = statistics.median(runs[counts[0]])
    rows = []
    for n in counts:
        med = statistics.median(runs[n])
        print(f"scale: {n} process(es): median {med:.0f} msg/s (min-max {min(runs[n]):.0f}-"
              f"{max(runs[n]):.0f}); {med / base:.2f}x {counts[0]} process(es)")
        rows.append(f"| {time.strftime('%Y-%m-%d')} | {git_commit()} | {n} | {args.messages} x "
                    f"{args.size:g} KB, {args.concurrency} sessions | {med:.0f} "
                    f"({min(runs[n]):.0f}-{max(runs[n]):.0f}) | {med / base:.2f}x | "
                    f"{machine()} |\n")
    if args.append:
        add_rows(RESULTS, "scale", "".join(rows))


if __name__ == "__main__":
    main()
