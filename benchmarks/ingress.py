"""Durable ingress: N messages over C sessions, accepted (``250`` only after fsync), not
delivered; our node and, when installed, a private Postfix in the same run.

    python -m benchmarks ingress [--messages 10000] [--size 5|2-64|mix]
                                 [--concurrency 50 | 1,10,50,100] [--no-reuse] [--repeat 3]
                                 [--targets mta,mta-replicated,postfix] [--quick]

Figures: msg/s (messages answered 250 over wall time from the common start), submission
latency p50/p99 (final dot to 250: includes the group-commit fdatasync) and, for our node,
records per fdatasync. Runs alternate between targets so a machine slowing down hurts both.

``--targets mta-replicated,postfix`` measures the replicated spool (issue 16: 2 node
processes behind one port, each its own spool, every message on both disks before its 250)
against Postfix's unreplicated durable ingress, same client and load; the ratio is printed
and kept as ``ingress-replicated``.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from typing import Any

from benchmarks.dkim_cost import dkim_cost_line, signing_breakdown
from benchmarks.harness import (
    Result,
    Tick,
    add_quick,
    finish,
    fmt,
    load_options,
    percentile,
    progress,
    quick_options,
    settle,
    sweep,
)
from benchmarks.loadgen import Load, fixed_size, run_load
from benchmarks.profile import Profiler
from benchmarks.smtp_source import run_smtp_source
from benchmarks.targets import peers, target


def run_ingress(name: str, load: Load, tick: Tick | None = None, profile: bool = False,
                client: str = "loadgen") -> dict[str, Any]:
    with target(name, load.concurrency) as handle:
        cpu0 = handle.cpu_seconds()
        prof = Profiler(handle.pid, handle.work / "profile.txt") if profile and handle.pid \
            else None
        with prof or nullcontext():
            if client == "smtp-source":
                t0 = time.time()
                accepted = run_smtp_source(handle.port, load, tick)
                wall = time.time() - t0
            else:
                res = run_load(handle.port, load, tick)
        cpu = handle.cpu_seconds() - cpu0
        extra: dict[str, Any] = handle.metrics()
        if name.startswith("mta-dkim"):
            extra["signed"] = handle.spool_count()
        if prof is not None and prof.summary:
            extra["profile"] = prof.summary
    # CPU over the run (user + system, from /proc): every thread of our node, every process
    # of Postfix's.
    done = accepted if client == "smtp-source" else res.accepted
    extra.update(node_cpu_s=cpu, node_cpu_us_per_msg=cpu / max(1, done) * 1e6)
    if client == "smtp-source":
        # It reports no latencies; msg/s counts from its start to its exit, MB/s from the
        # payload size it was given (it adds its own few headers).
        return {"accepted": accepted, "seconds": wall, "msgs_per_s": accepted / wall,
                "mb_per_s": accepted * fixed_size(load.size) / wall / 1e6, **extra}
    return {"accepted": res.accepted, "refused": res.refused, "errors": res.errors,
            "seconds": res.seconds, "msgs_per_s": res.msgs_per_s,
            "mb_per_s": res.bytes / res.seconds / 1e6,
            "p50_ms": percentile(res.service, 50) * 1000,
            "p99_ms": percentile(res.service, 99) * 1000, **extra}


def ratio_lines(result: Result, metric: str, what: str, **labels: Any) -> list[str]:
    """``ours / postfix`` per configuration and per target of ours (``mta`` as ``what``,
    ``mta-replicated`` as ``what-replicated``, ``mta-dkim`` as ``what-dkim``), kept in the
    result's series for the report."""
    lines = []
    ratios = result.series.setdefault("ratios", [])
    for group in result.groups:
        lab = group["labels"]
        tgt = lab.get("target")
        if tgt not in ("mta", "mta-replicated", "mta-dkim", "mta-events", "mta-x2",
                       "mta-dkim-x2") or any(
                lab.get(k) != v
                                                       for k, v in labels.items()):
            continue
        other = {**lab, "target": "postfix"}
        theirs = result.summary(metric, **other)
        if not theirs["n"]:
            continue
        ours = result.summary(metric, **lab)
        ratio = ours["median"] / theirs["median"] if theirs["median"] else float("inf")
        where = ", ".join(f"{k} {v}" for k, v in lab.items() if k != "target")
        name = what if tgt == "mta" else f"{what}-{tgt.removeprefix('mta-')}"
        ratios.append({"what": name, "labels": lab, "ratio": ratio})
        lines.append(f"{name} {where}: {tgt} {ours['median']:.0f} / postfix "
                     f"{theirs['median']:.0f} = {ratio:.2f}x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks ingress",
                                 description=__doc__.split("\n\n")[0])
    load_options(ap, messages=10000, targets=True)
    ap.add_argument("--client", choices=("loadgen", "smtp-source"), default="loadgen",
                    help="smtp-source: Postfix's C client (cheaper; fixed size, no latency)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy our node during each run; the top functions go in the JSON")
    add_quick(ap, "2,000 messages, 1 run")
    args = ap.parse_args()
    quick_options(ap, args, "ingress", messages=2000, repeat=1, settle=0.5)
    names = peers(args.peer, args.targets)
    concs = sweep(args.concurrency)
    result = Result("ingress", {**vars(args), "targets": names})
    if {"mta-dkim", "mta-dkim-x2"} & set(names):
        # What signing one message costs alone (this process, one thread), before the load.
        cost = result.series["dkim_sign_cost"] = signing_breakdown(size=args.size)
        print(dkim_cost_line(cost), flush=True)
    total = args.repeat * len(concs) * len(names) * args.messages
    with progress(total, "ingress") as bar:
        for i in range(args.repeat):
            for c in concs:
                for name in names:
                    load = Load(args.messages, c, args.procs, args.size, not args.no_reuse)
                    bar.status(f"run {i + 1}/{args.repeat} {name} c={c}")
                    settle(args.settle)
                    run = run_ingress(name, load, bar.update, args.profile, args.client)
                    if "profile" in run:
                        # The latest run's, and whose it is.
                        result.series.update(profile=run.pop("profile"), profile_target=name)
                    result.add({"target": name, "concurrency": c}, run)
                    if name.startswith("mta-dkim") and run["signed"] < run["accepted"]:
                        raise SystemExit(f"{name}: {run['signed']} signatures in the spool "
                                         f"for {run['accepted']} messages accepted: not a "
                                         "signing figure")
                    bar.say(f"run {i + 1}: {name} c={c}: {run['msgs_per_s']:.0f} msg/s, "
                            f"p50 {run.get('p50_ms', float('nan')):.1f} ms, "
                            f"p99 {run.get('p99_ms', float('nan')):.1f} ms"
                            + (f", {run['batch']:.1f} records/fsync" if "batch" in run else "")
                            + (f", refused {run['refused']}" if run.get("refused") else "")
                            + (f", {run['signed']} stored signed" if "signed" in run else "")
                            + (f", busiest node {run['busiest_node_share']:.0%} of the mail"
                               if "busiest_node_share" in run else "")
                            + (f", shards owned {run['owned_min']:.0f}-{run['owned_max']:.0f}"
                               if "owned_min" in run else ""))
    lines = []
    for g in result.groups:
        lab = g["labels"]
        lines.append(
            f"ingress {lab['target']} c={lab['concurrency']}: "
            f"{fmt(result.summary('msgs_per_s', **lab))} msg/s, "
            f"p50 {fmt(result.summary('p50_ms', **lab), 1)} ms, "
            f"p99 {fmt(result.summary('p99_ms', **lab), 1)} ms, "
            f"node CPU {fmt(result.summary('node_cpu_us_per_msg', **lab))} us/msg")
    lines += ratio_lines(result, "msgs_per_s", "ingress")
    finish(result, lines, args)


if __name__ == "__main__":
    main()
