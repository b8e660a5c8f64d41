"""``python -m benchmarks SCENARIO [options]``: one entry point for every benchmark.

``python -m benchmarks SCENARIO --help`` lists a scenario's options. Every scenario runs its
measurement several times (``--repeat``/``--trials``) with a progress bar, prints min / median /
max, saves a JSON result under benchmarks/results/ and regenerates benchmarks/RESULTS.md and its
plots (``--no-save``: print only). Soak writes docs/reliability.md.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

from benchmarks.harness import commit_info

SCENARIOS = {
    "ingress": "durable accept: msg/s and submission latency (vs Postfix when installed; "
               "--targets mta-replicated,postfix: the replicated spool)",
    "relay": "accept and deliver to a loopback sink, every 250 checked (vs Postfix too)",
    "compare": "ingress then relay, both against a private Postfix instance",
    "latency": "p50 / p99 / p99.9 at fixed offered loads (open loop)",
    "scale": "1 vs N node processes sharing the SMTP port",
    "recovery": "restart time and RSS per queued message (100k, 1M)",
    "backlog": "RSS per queued message while undeliverable mail piles up",
    "failover": "SIGKILL a node of a 3-node cluster under load, with a timeline "
                "(--replicated: with disk loss)",
    "replicated": "issue 16's three: replicated ingress vs Postfix, p99 at 1,000/s, "
                  "failover with disk loss",
    "tenants": "one tenant's 20,000-message backlog at a paced site, then another's 100: "
               "when the second's mail arrives (vs one tenant name for both)",
    "soak": "chaos under load, then reconcile the accounting logs",
    "partition": "network partitions and pauses in namespaces (root): fencing, takeover",
    "loadgen": "calibration: the load generators against a null sink",
    "report": "rebuild RESULTS.md and the plots from benchmarks/results/*.json",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        print(__doc__.strip().split("\n\n")[0] + "\n")
        for name, what in SCENARIOS.items():
            print(f"  {name:<10} {what}")
        raise SystemExit(0 if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else 2)
    scenario = sys.argv[1]
    info = commit_info()
    dirty = " (uncommitted changes)" if info["dirty"] else ""
    print(f"benchmarks {scenario}: commit {info['commit']}{dirty}, "
          f"Python {platform.python_version()}, {os.cpu_count()} cores, {platform.platform()}",
          flush=True)
    sys.argv = [f"python -m benchmarks {scenario}", *sys.argv[2:]]
    module = {"loadgen": "loadgen_check"}.get(scenario, scenario)
    importlib.import_module(f"benchmarks.{module}").main()


if __name__ == "__main__":
    main()
