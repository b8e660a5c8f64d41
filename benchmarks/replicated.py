"""The replicated-spool benchmarks of issue 16, one after the other, with the options their
goals name (each also runs alone, see below):

    python -m benchmarks replicated [--quick] [--client loadgen|smtp-source]

1. ``ingress --targets mta,mta-replicated,postfix --repeat 5``: 2 node processes (each its own
   spool, replicas = 2, min_insync = 2, behind one port) vs Postfix's unreplicated durable
   ingress, same client and load, interleaved. Goal: >= 1.5x Postfix.
2. ``latency --targets mta,mta-replicated --rates 500,1000,1500 --seconds 20 --repeat 3``.
   Goal: p99 <= 30 ms at an offered 1,000 msg/s with replication.
3. ``failover --replicated --trials 10``: 3 nodes, replicas 2, SIGKILL one under load and
   delete its spool. Goal: RTO <= lease TTL + 2 s, 0 lost; the timeline plot.

``--quick`` runs each as a smoke run (nothing saved). The rest of this module is what they
share: the config of a node that keeps its own spool and replicates every shard to a peer,
and what etcd says about who owns each shard and which copies are in its in-sync set."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from harness.etcd import EtcdServer

# A benchmark cluster's peer secret: loopback only, thrown away with the cluster.
SECRET = "bench-replication-secret-0123456789abcdef"


def replicated_sections(etcd: EtcdServer, name: str, ttl: float, replicas: int = 2,
                        min_insync: int | None = None) -> dict[str, dict[str, Any]]:
    """The ``[spool]`` and ``[cluster]`` keys (beside ``path`` and ``shards``) of a node
    replicating each shard to ``replicas - 1`` peers; ``min_insync`` copies before ``250``
    (default: ``replicas``). A silent follower leaves the in-sync set after half the lease."""
    spool: dict[str, Any] = {"replicas": replicas, "replica_timeout": f"{ttl / 2:g}s"}
    if min_insync is not None:
        spool["min_insync"] = min_insync
    return {"spool": spool,
            "cluster": {"etcd": [etcd.endpoint], "name": name, "lease_ttl": f"{ttl:g}s",
                        "replication_listen": "127.0.0.1:0", "secret": SECRET}}


def owners(etcd: EtcdServer, name: str) -> dict[int, str]:
    """Each shard's owner (``owner/<shard>``, the key a node holds while it owns it)."""
    prefix = f"/mta/{name}/owner/"
    return {int(k.rsplit("/", 1)[1]): v.decode()
            for k, (v, _rev) in etcd.get_prefix(prefix).items()}


def members(etcd: EtcdServer, name: str) -> dict[int, set[str]]:
    """Each shard's in-sync set (``sync/<shard>``: node ids whose copy counts)."""
    prefix = f"/mta/{name}/sync/"
    return {int(k.rsplit("/", 1)[1]): set(json.loads(v)["members"])
            for k, (v, _rev) in etcd.get_prefix(prefix).items()}


def fully_replicated(etcd: EtcdServer, name: str, nodes: set[str], shards: int,
                     copies: int, owned_by: set[str] | None = None) -> bool:
    """Does every shard have an owner among ``owned_by`` (default ``nodes``) and at least
    ``copies`` members of its in-sync set among ``nodes``?"""
    own = owners(etcd, name)
    if len(own) != shards or not set(own.values()) <= (owned_by or nodes):
        return False
    sync = members(etcd, name)
    return len(sync) == shards and all(len(m & nodes) >= copies for m in sync.values())


def wait_replicated(etcd: EtcdServer, name: str, nodes: set[str], shards: int, copies: int,
                    timeout: float = 90.0, owned_by: set[str] | None = None) -> float:
    """Block until :func:`fully_replicated`; the seconds it took. Before it holds, a shard
    still below ``min_insync`` copies would answer ``451`` and skew the first run."""
    t0 = time.monotonic()
    while not fully_replicated(etcd, name, nodes, shards, copies, owned_by):
        if time.monotonic() - t0 > timeout:
            own, sync = owners(etcd, name), members(etcd, name)
            raise RuntimeError(
                f"the cluster never had every shard on {copies} in-sync copies within "
                f"{timeout:g} s: {len(own)} shards owned, "
                f"{sum(len(m & nodes) >= copies for m in sync.values())} replicated")
        time.sleep(0.2)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks replicated",
                                 description=__doc__.split("``--quick`` runs")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke runs, nothing saved")
    ap.add_argument("--client", choices=("loadgen", "smtp-source"), default="loadgen",
                    help="ingress's client (smtp-source: Postfix's C client, less CPU)")
    args = ap.parse_args()
    from benchmarks import failover, ingress, latency  # each parses its own sys.argv

    for name, module, base, full in (
            ("ingress", ingress, ["--targets", "mta,mta-replicated,postfix",
                                  "--client", args.client], ["--repeat", "5"]),
            ("latency", latency, ["--targets", "mta,mta-replicated"],
             ["--rates", "500,1000,1500", "--seconds", "20", "--repeat", "3"]),
            ("failover", failover, ["--replicated"], ["--trials", "10"])):
        # --quick: each scenario's own smoke defaults instead of the full run's.
        sys.argv = [f"python -m benchmarks {name}", *base,
                    *(["--quick"] if args.quick else full)]
        print(f"== {' '.join(sys.argv)}", flush=True)
        module.main()
