"""``python -m benchmarks SCENARIO [options]``: one entry point for every benchmark.

Scenarios: ingress, relay, compare (side by side with Postfix), scale, recovery, failover,
soak. ``python -m benchmarks SCENARIO --help`` lists a scenario's options. Every scenario runs
its measurement ``--repeat`` times where that makes sense and reports the median with min-max;
``--append`` writes the figures into benchmarks/RESULTS.md (docs/reliability.md for soak).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

from benchmarks.common import git_commit

SCENARIOS = {
    "ingress": "durable accept: msg/s and submission latency",
    "relay": "accept and deliver to a loopback sink, end to end",
    "compare": "ingress and relay side by side with a private Postfix instance",
    "scale": "1 vs N node processes sharing the SMTP port",
    "recovery": "restart time and RSS per queued message",
    "failover": "SIGKILL a node of a 3-node cluster under load",
    "soak": "chaos under load, then reconcile the accounting logs",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        print(__doc__.strip().split("\n\n")[0] + "\n")
        for name, what in SCENARIOS.items():
            print(f"  {name:<10} {what}")
        raise SystemExit(0 if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else 2)
    scenario = sys.argv[1]
    print(f"benchmarks {scenario}: commit {git_commit()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} cores, {platform.platform()}", flush=True)
    sys.argv = [f"python -m benchmarks {scenario}", *sys.argv[2:]]
    importlib.import_module(f"benchmarks.{scenario}").main()


if __name__ == "__main__":
    main()
