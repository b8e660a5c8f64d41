"""Submission latency at fixed offered loads (open loop): p50 / p99 / p99.9.

    python -m benchmarks latency [--rates 250,500,1000,1500] [--seconds 10]
                                 [--concurrency 50] [--size 5] [--repeat 3]
                                 [--targets mta,mta-replicated] [--quick]

Messages are scheduled at the offered rate, independent of replies, over a pool of reused
sessions; latency runs from a message's scheduled time to its ``250``, so a stalled server
is charged for the messages that queued behind it (no coordinated omission). ``service``
latency, final dot to 250, is reported beside it. Durable accept, delivery off.

``--targets mta,mta-replicated``: also the replicated spool (issue 16; 2 node processes behind
one port, each its own spool, 250 only once a message is on both disks; goal: p99 <= 30 ms at
an offered 1,000 msg/s).
"""

from __future__ import annotations

import argparse

from benchmarks.harness import (
    Result,
    add_quick,
    common_options,
    finish,
    fmt,
    percentile,
    progress,
    quantiles,
    quick_options,
    settle,
    sweep,
    target_options,
)
from benchmarks.loadgen import Load, run_load
from benchmarks.targets import peers, target


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks latency",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="250,500,1000,1500", help="offered msg/s, comma list")
    ap.add_argument("--seconds", type=float, default=10.0, help="per rate and run")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--size", default="5")
    ap.add_argument("--peer", choices=("auto", "postfix", "none"), default="none")
    target_options(ap)
    common_options(ap, repeat=3)
    add_quick(ap, "1,000/s for 3 s, 1 run")
    args = ap.parse_args()
    quick_options(ap, args, "latency", rates="1000", seconds=3.0, repeat=1, settle=0.5)
    names = peers(args.peer, args.targets)
    rates = sweep(args.rates)
    result = Result("latency", {**vars(args), "targets": names})
    total = args.repeat * len(names) * sum(int(r * args.seconds) for r in rates)
    with progress(total, "latency") as bar:
        for i in range(args.repeat):
            for rate in rates:
                for name in names:
                    load = Load(int(rate * args.seconds), args.concurrency, args.procs,
                                args.size, True, rate=rate)
                    bar.status(f"run {i + 1}/{args.repeat} {name} {rate}/s")
                    settle(args.settle)
                    with target(name, args.concurrency) as handle:
                        res = run_load(handle.port, load, bar.update)
                    lat = res.latencies
                    run = {"offered": rate, "achieved": res.msgs_per_s,
                           "accepted": res.accepted, "refused": res.refused,
                           "errors": res.errors,
                           "p50_ms": percentile(lat, 50) * 1000,
                           "p99_ms": percentile(lat, 99) * 1000,
                           "p999_ms": percentile(lat, 99.9) * 1000,
                           "max_ms": (lat[-1] if lat else float("nan")) * 1000,
                           **handle.facts,
                           "service_p50_ms": percentile(res.service, 50) * 1000,
                           "service_p99_ms": percentile(res.service, 99) * 1000,
                           "cdf_ms": [[v * 1000, f] for v, f in quantiles(lat)]}
                    result.add({"target": name, "offered": rate}, run)
                    bar.say(f"run {i + 1}: {name} at {rate}/s: achieved "
                            f"{run['achieved']:.0f}/s, p50 {run['p50_ms']:.1f} ms, p99 "
                            f"{run['p99_ms']:.1f} ms, p99.9 {run['p999_ms']:.1f} ms")
    lines = [f"latency {g['labels']['target']} at {g['labels']['offered']}/s: p50 "
             f"{fmt(result.summary('p50_ms', **g['labels']), 1)} ms, p99 "
             f"{fmt(result.summary('p99_ms', **g['labels']), 1)} ms, p99.9 "
             f"{fmt(result.summary('p999_ms', **g['labels']), 1)} ms"
             for g in result.groups]
    finish(result, lines, args)


if __name__ == "__main__":
    main()
