"""Side by side with Postfix, in one run, on this machine: durable ingress and relay.

    python -m benchmarks.compare [--messages 10000] [--size 5] [--concurrency 50]
                                 [--repeat 3] [--append]

The same load generator (pipelining, connection reuse, ``--procs`` processes) drives our node
and a private Postfix instance (benchmarks/postfix.py: own directories and loopback port).
Runs alternate between the two so that a machine slowing down hurts both alike.

- ingress: durable accept only (our delivery off; Postfix's queue manager off), msg/s from the
  first message to the last 250, and submission latency (final dot to 250);
- relay: accept and deliver everything to the same loopback sink; msg/s until the sink holds
  every accepted message.

Without Postfix it says so and how to install it; it never prints a made-up figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, add_rows, free_port, git_commit, machine, run_load
from benchmarks.ingress import run_bench
from benchmarks.postfix import PrivatePostfix, postfix_missing
from benchmarks.relay import _sink_main, run_relay

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _latency(results: list[tuple[int, list[float]]]) -> tuple[float, float]:
    lat = sorted(x for r in results for x in r[1])
    if not lat:
        return 0.0, 0.0
    return statistics.median(lat) * 1000, lat[max(0, int(len(lat) * 0.99) - 1)] * 1000


def postfix_ingress(messages: int, size_kb: float, concurrency: int, procs: int
                    ) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="pf-ingress-", dir=ROOT / "var"))
    port = free_port()
    try:
        with PrivatePostfix(work, port) as pf:
            results, start_at = run_load(port, messages, concurrency, procs, size_kb, True)
            elapsed = time.time() - start_at
            queued = pf.queued()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = sum(r[0] for r in results)
    p50, p99 = _latency(results)
    return {"accepted": ok, "queued": queued, "msgs_per_s": ok / elapsed, "p50_ms": p50,
            "p99_ms": p99}


def postfix_relay(messages: int, size_kb: float, concurrency: int, procs: int
                  ) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="pf-relay-", dir=ROOT / "var"))
    port, sink_port = free_port(), free_port()
    counter = mp.Value("q", 0)
    ready = mp.Event()
    sink = mp.Process(target=_sink_main, args=("127.0.0.1", sink_port, counter, ready),
                      daemon=True)
    sink.start()
    ready.wait(10)
    try:
        with PrivatePostfix(work, port, relay=("127.0.0.1", sink_port)):
            results, start_at = run_load(port, messages, concurrency, procs, size_kb, True)
            accepted = sum(r[0] for r in results)
            deadline = time.time() + 300
            while counter.value < accepted and time.time() < deadline:
                time.sleep(0.01)
            elapsed = time.time() - start_at
    finally:
        sink.kill()
        shutil.rmtree(work, ignore_errors=True)
    return {"accepted": accepted, "delivered": counter.value,
            "msgs_per_s": counter.value / elapsed}


def _median(runs: list[dict[str, float]]) -> tuple[dict[str, float], str]:
    runs = sorted(runs, key=lambda r: r["msgs_per_s"])
    return runs[len(runs) // 2], f"{runs[0]['msgs_per_s']:.0f}-{runs[-1]['msgs_per_s']:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=float, default=5.0, help="message size in KB")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    if (why := postfix_missing()) is not None:
        print(f"compare: {why}", file=sys.stderr)
        raise SystemExit(2)
    (ROOT / "var").mkdir(exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in
                                                ("mta_in", "pf_in", "mta_relay", "pf_relay")}
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}", flush=True)
        runs["pf_in"].append(postfix_ingress(args.messages, args.size, args.concurrency,
                                             args.procs))
        runs["mta_in"].append(run_bench(args.messages, args.size, args.concurrency, True,
                                        args.procs, 64, "info"))
        runs["pf_relay"].append(postfix_relay(args.messages, args.size, args.concurrency,
                                              args.procs))
        runs["mta_relay"].append(run_relay(args.messages, args.size, args.concurrency,
                                           args.procs, "smarthost", 20))
    med = {k: _median(v) for k, v in runs.items()}
    lines = []
    for what, ours, theirs in (("ingress", "mta_in", "pf_in"), ("relay", "mta_relay",
                                                                   "pf_relay")):
        (m, ms), (p, ps) = med[ours], med[theirs]
        ratio = m["msgs_per_s"] / p["msgs_per_s"] if p["msgs_per_s"] else float("inf")
        lines.append((what, m, ms, p, ps, ratio))
        extra = (f"; p50/p99 mta {m['p50_ms']:.1f}/{m['p99_ms']:.1f} ms, postfix "
                 f"{p['p50_ms']:.1f}/{p['p99_ms']:.1f} ms" if what == "ingress" else "")
        print(f"{what}: mta {m['msgs_per_s']:.0f} msg/s ({ms}), postfix "
              f"{p['msgs_per_s']:.0f} msg/s ({ps}): {ratio:.2f}x{extra}")
    if args.append:
        _append(args, lines)


def _append(args: Any, lines: list[Any]) -> None:
    commit = git_commit()
    rows = "".join(
        f"| {time.strftime('%Y-%m-%d')} | {commit} | {what} | {args.messages} x "
        f"{args.size:g} KB, {args.concurrency} sessions | {m['msgs_per_s']:.0f} ({ms}) | "
        f"{p['msgs_per_s']:.0f} ({ps}) | {ratio:.2f}x | {machine()} |\n"
        for what, m, ms, p, ps, ratio in lines)
    add_rows(RESULTS, "compare", rows)


if __name__ == "__main__":
    main()
