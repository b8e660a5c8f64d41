"""Backlog: the node's memory while undeliverable mail piles up, as RSS per queued message.

    python -m benchmarks backlog [--messages 100000] [--steps 5] [--size 5] [--repeat 3]

A running node (delivery on, real spool) accepts messages over SMTP for a destination that
does not answer (one connection attempt, then an hour's back-off), so every message stays
queued and scheduled. After each step the node's RSS is sampled with the queue depth from its
own metrics; bytes per queued message is the least-squares slope of RSS over depth (the
empty node's RSS is the intercept, not charged to the messages), and the marginal figure the
slope over the second half of the steps, once the bounded hot cache of just-accepted bodies
(64 MiB) is full.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.harness import Result, Tick, common_options, finish, fmt, progress
from benchmarks.loadgen import Load, run_load
from benchmarks.targets import target


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; NaN when x does not vary."""
    try:
        return statistics.linear_regression(*zip(*points, strict=True)).slope
    except statistics.StatisticsError:
        return float("nan")


def run_backlog(messages: int, steps: int, size: str, concurrency: int, tick: Tick
                ) -> dict[str, Any]:
    held = 'retry_initial = "1h"\nmax_inflight = 1\n'
    with target("mta", concurrency, relay=("127.0.0.1", 9), delivery=held,
                log_level="warning") as handle:
        time.sleep(1.0)
        curve = [(0.0, handle.rss_kb() * 1024.0)]
        for _ in range(steps):
            res = run_load(handle.port, Load(messages // steps, concurrency, 2, size),
                           tick)
            if res.errors or res.refused:
                raise RuntimeError(f"backlog: {res.refused} refused, {res.errors} errors")
            time.sleep(1.0)  # let the scheduler index what just arrived
            curve.append((handle.metrics()["live"], handle.rss_kb() * 1024.0))
    return {"queued": curve[-1][0], "rss_empty_mb": curve[0][1] / 2**20,
            "rss_full_mb": curve[-1][1] / 2**20, "bytes_per_msg": slope(curve),
            # Once the 64 MiB hot cache of just-accepted bodies is full, each further message
            # costs only its index and schedule entries: the second half's slope.
            "marginal_bytes_per_msg": slope(curve[len(curve) // 2:]),
            "curve": [[q, r / 2**20] for q, r in curve]}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks backlog",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", default="5")
    ap.add_argument("--concurrency", type=int, default=50)
    common_options(ap, repeat=3)
    args = ap.parse_args()
    result = Result("backlog", vars(args))
    per_run = args.messages // args.steps * args.steps
    with progress(args.repeat * per_run, "backlog") as bar:
        for i in range(args.repeat):
            run = run_backlog(args.messages, args.steps, args.size, args.concurrency,
                              bar.update)
            result.add({"target": "mta"}, run)
            bar.say(f"run {i + 1}: {run['queued']:.0f} queued, RSS {run['rss_empty_mb']:.0f}"
                    f" -> {run['rss_full_mb']:.0f} MB: {run['bytes_per_msg']:.0f} bytes per "
                    f"queued message, {run['marginal_bytes_per_msg']:.0f} marginal")
    lines = [f"backlog: {fmt(result.summary('bytes_per_msg'))} bytes RSS per queued message, "
             f"{fmt(result.summary('marginal_bytes_per_msg'))} marginal ({args.messages} x "
             f"{args.size} KB queued, delivery held)"]
    finish(result, lines, args)


if __name__ == "__main__":
    main()
