"""Scale: 1 vs 2 (vs N) node processes on one machine sharing the SMTP port (SO_REUSEPORT).

    python -m benchmarks scale [--processes 1,2] [--messages 20000] [--repeat 3]
                               [--client loadgen|smtp-source]

Each process is a standalone node with its own spool (durable accept, delivery off); the
kernel spreads the load generator's connections over them. Target (issue 7): 2 processes
>= 1.7x one process. The load generator runs on the same cores, which caps what extra node
processes can win on a small machine; ``--client smtp-source`` drives the load with Postfix's
C client instead, which costs far less CPU than the Python generator.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from benchmarks.common import cpu_seconds, free_port, launch_node, node_sections, stop_node
from benchmarks.harness import (
    Result,
    Tick,
    finish,
    fmt,
    load_options,
    percentile,
    progress,
    settle,
    sweep,
)
from benchmarks.loadgen import Load, run_load
from benchmarks.smtp_source import run_smtp_source
from benchmarks.targets import workdir


@contextmanager
def nodes(count: int, concurrency: int) -> Iterator[tuple[int, list[int]]]:
    """``count`` standalone nodes sharing one SMTP port; yields the port and their pids."""
    work = workdir("mta-scale-")
    port = free_port()
    pids = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)  # after every node stopped
        for i in range(count):
            node_dir = work / f"n{i}"
            node_dir.mkdir()
            node, log = launch_node(node_dir, port, free_port(), concurrency, "warning",
                                    node_sections(node_dir), smtp_extra="reuse_port = true\n",
                                    node_id=f"scale{i}")
            stack.callback(stop_node, node, log)
            pids.append(node.pid)
        yield port, pids


def run_scale(count: int, load: Load, client: str, tick: Tick) -> dict[str, float]:
    """One run; besides msg/s, the CPU the nodes and the client burnt per message and the
    cores each kept busy, which bound what more node processes can win on this machine."""
    with nodes(count, load.concurrency) as (port, pids):
        node0 = sum(cpu_seconds(p) for p in pids)
        t0, c0 = time.time(), os.times()
        if client == "smtp-source":
            accepted = run_smtp_source(port, load, tick)
            wall = time.time() - t0
            p50 = float("nan")
        else:
            res = run_load(port, load, tick)
            # From the load's common start, as every other scenario (not process spawn).
            accepted, wall = res.accepted, res.seconds
            p50 = percentile(res.service, 50) * 1000
        node = sum(cpu_seconds(p) for p in pids) - node0
        c1 = os.times()  # before the nodes are reaped: only the client's processes count
    client_cpu = (c1.children_user + c1.children_system) - (c0.children_user
                                                             + c0.children_system)
    per = max(1, accepted)
    return {"accepted": accepted, "msgs_per_s": accepted / wall, "p50_ms": p50,
            "node_cpu_us_per_msg": node / per * 1e6,
            "client_cpu_us_per_msg": client_cpu / per * 1e6,
            "node_cores": node / wall, "client_cores": client_cpu / wall}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks scale",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="1,2", help="node process counts, comma list")
    ap.add_argument("--client", choices=("loadgen", "smtp-source"), default="loadgen")
    load_options(ap, messages=20000, peer="none")
    args = ap.parse_args()
    counts = sweep(args.processes)
    conc = sweep(args.concurrency)[0]
    result = Result("scale", vars(args))
    with progress(args.repeat * len(counts) * args.messages, "scale") as bar:
        for i in range(args.repeat):
            for n in counts:  # alternate, so a machine slowing down hurts every count alike
                load = Load(args.messages, conc, args.procs, args.size, not args.no_reuse)
                settle(args.settle)
                run = run_scale(n, load, args.client, bar.update)
                result.add({"processes": n, "client": args.client}, run)
                bar.say(f"run {i + 1}: {n} process(es): {run['msgs_per_s']:.0f} msg/s")
    base = result.summary("msgs_per_s", processes=counts[0])["median"]
    lines = []
    if counts[0] == 1:
        # One node keeps node_cores busy; the client keeps client_cores per that throughput.
        # N nodes cannot beat what the cores left over allow.
        node = result.summary("node_cores", processes=1)["median"]
        client = result.summary("client_cores", processes=1)["median"]
        cores = os.cpu_count() or 1
        ceiling = cores / (node + client)
        result.series["ceiling"] = ceiling
        lines.append(f"one node keeps {node:.2f} cores busy and the client {client:.2f}: on "
                     f"{cores} cores no number of node processes can exceed {ceiling:.2f}x one")
    for n in counts:
        s = result.summary("msgs_per_s", processes=n)
        result.series.setdefault("ratios", []).append(
            {"what": "scale", "labels": {"processes": n, "base": counts[0]},
             "ratio": s["median"] / base})
        lines.append(f"scale {n} process(es): {fmt(s)} msg/s; {s['median'] / base:.2f}x "
                     f"{counts[0]} process(es)")
    finish(result, lines, args)


if __name__ == "__main__":
    main()
