"""The contract between a node and its cluster.

``mta`` defines what it needs here and never imports ``cluster``; ``cluster.EtcdCoordinator``
implements the same protocol on etcd. Standalone nodes use :class:`LocalCoordinator`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import mta
from mta.replication.insync import SyncRecord

__all__ = [
    "ClusterOpError",
    "Coordinator",
    "LocalCoordinator",
    "Member",
    "Replication",
    "RuntimeSettings",
    "ShardHost",
    "ShardInfo",
    "apply_changes",
]


class ClusterOpError(Exception):
    """A cluster operation cannot be done (standalone node, unknown node, store down).

    ``hint`` says what the operator can do about it; ``status`` is the HTTP status to answer.
    """

    def __init__(self, message: str, hint: str = "", status: int = 409) -> None:
        super().__init__(message)
        self.hint = hint
        self.status = status


@dataclass(frozen=True)
class Member:
    """One node of the cluster as the coordination store sees it."""

    node: str
    smtp: str  # host:port of the SMTP listener
    admin: str  # base URL of the admin API
    leader: bool
    draining: bool
    shards: int  # shards it owns right now
    version: str
    started: float
    # Seconds its lease has left when it has not been refreshed for a while (the node has
    # most likely died, its keys and shards go when this runs out); None while it refreshes.
    lease_expiring: float | None = None


@dataclass(frozen=True)
class ShardInfo:
    """Who a shard is assigned to, who owns it now, and the owner's fencing token."""

    shard: int
    assigned: str | None
    owner: str | None
    token: int
    # Replicated spool only ([spool] replicas > 1): the followers the leader placed
    # (replicas/<shard>) and the in-sync set (the members of sync/<shard>; None: no record).
    followers: tuple[str, ...] = ()
    in_sync: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RuntimeSettings:
    """Settings an operator changes without a restart; cluster-wide in a cluster."""

    # Keys (see mta.delivery.runtime): "example.com", "*.example.com" (its subdomains),
    # "site:<[delivery.sites] key>" (mail routed to that site).
    throttles: dict[str, float] = field(default_factory=dict)  # key -> msgs/s
    suspended: frozenset[str] = frozenset()  # keys whose mail is held


@dataclass(frozen=True)
class Replication:
    """How a shard handed to the host is replicated ([spool] replicas > 1)."""

    record: SyncRecord  # sync/<shard> as the claim wrote it: this node owns it under its token
    followers: tuple[str, ...]  # replicas/<shard>: the nodes the leader placed copies on


class ShardHost(Protocol):
    """What a coordinator drives on its node. Implemented by :class:`mta.node.Node`."""

    async def acquire_shard(self, shard: int, token: int,
                            replication: Replication | None = None) -> None:
        """Open ``shard`` for writing under fencing ``token`` and start working on it
        (replicated as ``replication`` says, when given).

        Must recover the shard from the spool before returning; raises if it cannot.
        """

    def copy_ids(self) -> dict[int, str]:
        """The id of this node's copy of each shard (made at start for every shard): a claim
        of a replicated shard is allowed only when the in-sync record names this copy."""

    async def release_shard(self, shard: int) -> None:
        """Stop new work on ``shard``, settle in-flight work (bounded), close it."""

    async def recorded_token(self, shard: int) -> int:
        """The fencing token the spool holds for ``shard`` (0 if none): a claim must exceed
        it, whatever wrote it (a standalone node, an etcd since rebuilt)."""

    def fence(self, reason: str) -> None:
        """Stop writing and delivering for every owned shard now (lease lost or unknown)."""

    def unfence(self) -> None:
        """Lease is provably held again: writes may resume."""

    def endpoints(self) -> dict[str, str]:
        """How peers and operators reach this node: ``{"smtp": host:port, "admin": url}``."""


class Coordinator(Protocol):
    """Ownership of spool shards and the share of cluster-wide limits for one node.

    Contract: a shard is handed to the host with :meth:`ShardHost.acquire_shard` only after
    this node owns it in the coordination store, with a fencing token larger than any earlier
    owner's; it is taken away with :meth:`ShardHost.release_shard` before anyone else may own
    it, or, if this node cannot know (lease lost), the host is fenced first.
    """

    node_id: str

    async def start(self, host: ShardHost) -> None:
        """Join, and hand the host the shards it owns. Returns once the node may serve."""

    async def stop(self) -> None:
        """Hand every owned shard back (releasing it on the host first) and leave."""

    def stop_claiming(self) -> None:
        """The node has begun to stop: keep serving what it owns, but claim no more shards
        (the shards stopping peers hand back must go to nodes that stay)."""

    def rate_share(self) -> float:
        """Fraction (0..1] of every cluster-wide rate limit this node may use."""

    @property
    def healthy(self) -> bool:
        """True while this node may write and deliver (lease held, or standalone)."""

    def may_send(self, shard: int) -> bool:
        """True only while this node provably holds ``shard`` now: owned, its lease's fence
        deadline (last successful refresh + fence_after, on the monotonic clock) not passed,
        and its fencing token unchanged. Checked just before each delivery attempt sends
        MAIL FROM, so it must be cheap (no I/O) and right even after a process pause."""

    def runtime(self) -> RuntimeSettings:
        """Current runtime throttles and suspended domains."""

    def watch_runtime(self, callback: Callable[[RuntimeSettings], None]) -> None:
        """Call ``callback`` on the event loop whenever the runtime settings change."""

    async def change_runtime(self, throttles: dict[str, float | None] | None = None,
                             suspended: dict[str, bool] | None = None) -> RuntimeSettings:
        """Set (a rate) or clear (None) the named throttles and suspend (True) or resume
        (False) the named domains, leaving every other setting as it is now (cluster-wide in
        a cluster, where two operators changing different keys never undo each other).
        Returns the settings afterwards."""

    @property
    def is_leader(self) -> bool:
        """True while this node is the cluster leader (always, standalone)."""

    async def members(self, *, leases: bool = False) -> list[Member]:
        """Every live node, from a fresh read of the store; raises ClusterOpError if down.
        ``leases``: also ask the store how long each peer's lease has left (one call per
        member, so only where it is shown) to fill ``lease_expiring``."""

    async def shards(self) -> list[ShardInfo]:
        """Assignment and ownership of every shard, from a fresh read of the store."""

    def replication_address(self, node: str) -> tuple[str, int] | None:
        """Where ``node``'s replication listener is (its node key); None if unknown."""

    def followers(self, shard: int) -> tuple[str, ...]:
        """The nodes the leader places ``shard``'s copies on now (replicas/<shard>)."""

    async def change_sync(self, shard: int, old: SyncRecord, new: SyncRecord
                          ) -> SyncRecord | None:
        """Replace the in-sync record of ``shard`` by ``new`` if it is still ``old`` and this
        node still owns the shard (one transaction guarded by both); the record in place
        afterwards, or None if refused or the store is down."""

    async def set_draining(self, node: str, draining: bool) -> None:
        """Move every shard off ``node`` (and keep it off) or put it back in service."""

    async def rebalance(self, timeout: float) -> dict[str, object]:
        """Have the leader recompute the assignment now; wait (bounded) until owners follow
        it. Returns ``{"moved": n, "converged": bool, "seconds": t, "per_node": {...}}``."""


def apply_changes(current: RuntimeSettings, throttles: dict[str, float | None] | None,
                  suspended: dict[str, bool] | None) -> RuntimeSettings:
    """``current`` with the named changes of :meth:`Coordinator.change_runtime` applied."""
    rates = dict(current.throttles)
    for key, rate in (throttles or {}).items():
        if rate is None:
            rates.pop(key, None)
        else:
            rates[key] = rate
    held = set(current.suspended)
    for domain, hold in (suspended or {}).items():
        (held.add if hold else held.discard)(domain)
    return RuntimeSettings(rates, frozenset(held))


_STANDALONE_HINT = "this node runs standalone (no [cluster] etcd): it owns every shard"


class LocalCoordinator:
    """Standalone: this node owns every shard, always."""

    def __init__(self, node_id: str, total_shards: int) -> None:
        self.node_id = node_id
        self.total_shards = total_shards
        self._owned: frozenset[int] = frozenset()
        self._host: ShardHost | None = None
        self._runtime = RuntimeSettings()
        self._watchers: list[Callable[[RuntimeSettings], None]] = []
        self._token = 0
        self.started = time.time()

    async def start(self, host: ShardHost) -> None:
        self._host = host
        # Wall-clock nanoseconds grow across restarts, so a newer run fences an older one
        # (only one standalone process can hold the spool lock anyway); a clock set back, or
        # a spool from a cluster, may hold a larger token, which the claim must still exceed.
        recorded = [await host.recorded_token(s) for s in range(self.total_shards)]
        token = self._token = max(time.time_ns(), max(recorded, default=0) + 1)
        for shard in range(self.total_shards):
            await host.acquire_shard(shard, token)
            self._owned = self._owned | {shard}

    def stop_claiming(self) -> None:
        pass  # a standalone node claims every shard once, at start

    async def stop(self) -> None:
        if self._host is None:
            return
        for shard in sorted(self._owned):
            await self._host.release_shard(shard)
        self._owned = frozenset()

    def rate_share(self) -> float:
        return 1.0

    @property
    def healthy(self) -> bool:
        return True

    def may_send(self, shard: int) -> bool:
        return shard in self._owned

    def runtime(self) -> RuntimeSettings:
        return self._runtime

    def watch_runtime(self, callback: Callable[[RuntimeSettings], None]) -> None:
        self._watchers.append(callback)

    async def change_runtime(self, throttles: dict[str, float | None] | None = None,
                             suspended: dict[str, bool] | None = None) -> RuntimeSettings:
        self._runtime = settings = apply_changes(self._runtime, throttles, suspended)
        for callback in self._watchers:
            callback(settings)
        return settings

    @property
    def is_leader(self) -> bool:
        return True

    async def members(self, *, leases: bool = False) -> list[Member]:
        assert self._host is not None
        ends = self._host.endpoints()
        return [Member(self.node_id, ends.get("smtp", ""), ends.get("admin", ""), True, False,
                       len(self._owned), mta.__version__, self.started)]

    async def shards(self) -> list[ShardInfo]:
        return [ShardInfo(s, self.node_id, self.node_id, self._token) for s in sorted(self._owned)]

    def replication_address(self, node: str) -> tuple[str, int] | None:
        return None  # standalone: nobody to replicate to

    def followers(self, shard: int) -> tuple[str, ...]:
        return ()

    async def change_sync(self, shard: int, old: SyncRecord, new: SyncRecord
                          ) -> SyncRecord | None:
        return None

    async def set_draining(self, node: str, draining: bool) -> None:
        raise ClusterOpError("drain needs a cluster: a standalone node has no peer to take its "
                             "shards", _STANDALONE_HINT + "; stop it with `systemctl stop` "
                             "(SIGTERM lets sessions finish and keeps the spool)")

    async def rebalance(self, timeout: float) -> dict[str, object]:
        raise ClusterOpError("rebalance needs a cluster", _STANDALONE_HINT)
