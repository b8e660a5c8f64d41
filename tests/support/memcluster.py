"""Coordinators on the in-memory store (cluster.memstore): decisions tested in seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.coordinator import ClusterCoordinator
from cluster.keys import Keys
from cluster.memstore import MemEtcd, MemStore
from cluster.store import Snapshot, Timing, decode
from harness.config import make_config
from mta.coordinator import Replication
from mta.replication.insync import SyncRecord

__all__ = ["SHARDS", "TTL", "CopyHost", "MemCluster", "ReplicatedMem", "mem",
           "settled_replicated"]

TTL = 3.0  # fence_after 2 s: a loop stall under CPU load does not fence by accident
SHARDS = 8
NAME = "replicated"


def mem(c: ClusterCoordinator) -> MemStore:
    """The in-memory store client of ``c`` (to set its mode or hooks)."""
    assert isinstance(c.store, MemStore)
    return c.store


class MemCluster:
    """One in-memory etcd and the coordinators on it; :meth:`close` stops them all."""

    def __init__(self, tmp_path: Path, name: str, *, shards: int, ttl: float) -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.shards = shards
        self.ttl = ttl
        self.etcd = MemEtcd()
        self.keys = Keys(name)
        self.coordinators: list[ClusterCoordinator] = []

    def coordinator(self, node: str, shards: int | None = None, ttl: float | None = None,
                    replicas: int = 1) -> ClusterCoordinator:
        """A coordinator for ``node`` (not started); ``replicas`` > 1 configures the
        replicated spool's keys too."""
        ttl = self.ttl if ttl is None else ttl
        cluster: dict[str, Any] = {"etcd": ["127.0.0.1:2379"], "name": self.name,
                                   "lease_ttl": ttl}
        spool: dict[str, Any] = {"shards": self.shards if shards is None else shards}
        if replicas > 1:
            cluster.update(replication_listen="127.0.0.1:0", secret="s" * 32)
            spool["replicas"] = replicas
        cfg = make_config(self.tmp_path / node, node={"id": node}, spool=spool,
                          cluster=cluster)
        c = ClusterCoordinator(
            cfg, lambda deadline: MemStore(self.etcd, self.keys, Timing(ttl), deadline))
        self.coordinators.append(c)
        return c

    def snapshot(self) -> Snapshot:
        """The store now, as a coordinator reads it."""
        revision, entries = self.etcd.range(self.keys.prefix)
        return decode(self.keys, revision, entries)

    def owners(self) -> dict[int, str]:
        return {s: o.node for s, o in self.snapshot().owners.items()}

    async def close(self) -> None:
        for c in self.coordinators:
            mem(c).mode = "up"
            mem(c).hooks.clear()
            if c._host is not None:
                await asyncio.wait_for(c.stop(), 30)


class CopyHost:
    """A ShardHost with copy ids that records each acquisition and its replication."""

    def __init__(self, node: str, port: int = 7000, zone: str = "",
                 copies: dict[int, str] | None = None) -> None:
        self.node = node
        self.port = port
        self.zone = zone
        self.copies = copies if copies is not None else {
            s: f"{node}-copy{s}" for s in range(SHARDS)}
        self.owned: dict[int, int] = {}
        self.acquired: list[tuple[int, int, Replication | None]] = []
        self.fenced = False

    async def acquire_shard(self, shard: int, token: int,
                            replication: Replication | None = None) -> None:
        self.acquired.append((shard, token, replication))
        self.owned[shard] = token

    def copy_ids(self) -> dict[int, str]:
        return dict(self.copies)

    async def release_shard(self, shard: int) -> None:
        self.owned.pop(shard, None)

    async def recorded_token(self, shard: int) -> int:
        return 0

    def fence(self, reason: str) -> None:
        self.fenced = True

    def unfence(self) -> None:
        self.fenced = False

    def endpoints(self) -> dict[str, Any]:
        return {"smtp": "127.0.0.1:25", "admin": "", "replication": f"127.0.0.1:{self.port}",
                "zone": self.zone, "copies": {str(s): c for s, c in self.copies.items()}}


class ReplicatedMem(MemCluster):
    """The in-memory cluster, with replicated-spool helpers."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, NAME, shards=SHARDS, ttl=TTL)

    def coordinator(self, node: str, shards: int | None = None, ttl: float | None = None,
                    replicas: int = 2) -> ClusterCoordinator:
        return super().coordinator(node, shards, ttl, replicas)

    def kill(self, c: ClusterCoordinator) -> None:
        """``c``'s node is cut off and its lease runs out: its keys go."""
        mem(c).mode = "silent"
        assert c._lease is not None
        self.etcd.drop_lease(c._lease)

    def put_sync(self, shard: int, record: SyncRecord) -> None:
        self.etcd.put(self.keys.sync(shard), record.encode())


def settled_replicated(world: MemCluster, cs: list[ClusterCoordinator]) -> Callable[[], bool]:
    """Every shard owned by the node it is assigned to, under the record that names it, and
    no claim or release running."""
    def check() -> bool:
        v = world.snapshot()
        return (v.converged(SHARDS) and not any(c._busy for c in cs)
                and all((r := v.sync.get(s)) is not None and r.owner == o.node
                        for s, o in v.owners.items()))
    return check
