"""Coordinators on the in-memory store (cluster.memstore): decisions tested in seconds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cluster.coordinator import ClusterCoordinator
from cluster.keys import Keys
from cluster.memstore import MemEtcd, MemStore
from cluster.store import Snapshot, Timing, decode
from harness.config import make_config

__all__ = ["MemCluster", "mem"]


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
