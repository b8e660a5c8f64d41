"""Calibration: how fast the load generators go against the null sink, which does no work.
If that is far above what a server reaches, the generator is not what limits the figure.

    python -m benchmarks loadgen [--messages 20000] [--concurrency 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import time

from benchmarks.common import free_port
from benchmarks.harness import Result, common_options, finish, fmt, progress, settle
from benchmarks.loadgen import Load, run_load
from benchmarks.sink import Sink
from benchmarks.smtp_source import run_smtp_source, smtp_source_missing
from benchmarks.targets import workdir


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks loadgen",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--size", default="5")
    common_options(ap, repeat=3)
    args = ap.parse_args()
    clients = ["loadgen"] + ([] if smtp_source_missing() else ["smtp-source"])
    result = Result("loadgen", vars(args))
    with progress(args.repeat * len(clients) * args.messages, "loadgen") as bar:
        for _ in range(args.repeat):
            for client in clients:
                settle(args.settle)
                load = Load(args.messages, args.concurrency, args.procs, args.size)
                port = free_port()
                work = workdir("calib-")
                with Sink(work, port) as sink:
                    t0 = time.time()
                    if client == "smtp-source":
                        run_smtp_source(port, load, bar.update)
                        rate = args.messages / (time.time() - t0)
                    else:
                        rate = run_load(port, load, bar.update).msgs_per_s
                    result.add({"client": client}, {"msgs_per_s": rate,
                                                    "sink_count": sink.count})
                shutil.rmtree(work, ignore_errors=True)
    lines = [f"{g['labels']['client']} into the null sink: "
             f"{fmt(result.summary('msgs_per_s', **g['labels']))} msg/s" for g in result.groups]
    finish(result, lines, args)


if __name__ == "__main__":
    main()
