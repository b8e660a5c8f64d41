"""An in-memory :class:`cluster.store.Store` for fast, deterministic tests of the decisions.

:class:`MemEtcd` is the shared state, with etcd's semantics where the coordinator relies on
them: one revision per write transaction, create and mod revisions per key, compares as etcd
evaluates them (a missing key has create and mod revision 0 and no value), keys attached to
leases that expire on a clock the test controls, and a put on a lease that is gone refused.
:class:`MemStore` is one node's client of it, with the same call deadlines as
:class:`cluster.store.EtcdStore`, and faults a test can inject: a refusing or silent store,
and hooks that run inside a call (to stall it, or to change the world mid-call).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from cluster.keys import Keys
from cluster.store import (
    Compare,
    Deadline,
    Delete,
    Entry,
    Get,
    LeaseLeft,
    Op,
    Put,
    Snapshot,
    StoreDown,
    Timing,
    Txn,
    TxnResult,
    budget,
    decode,
)

__all__ = ["ManualClock", "MemEtcd", "MemStore"]

Hook = Callable[[Any], Awaitable[None]]


class ManualClock:
    """A clock that moves only when told: leases expire exactly when the test says."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class _Key:
    value: bytes
    create: int
    mod: int
    lease: int | None


@dataclass
class _Lease:
    ttl: int
    expires: float


class MemEtcd:
    """The shared store: keys, revisions, leases on ``clock``."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or ManualClock()
        self.revision = 1  # an empty etcd is at revision 1
        self.kv: dict[bytes, _Key] = {}
        self.leases: dict[int, _Lease] = {}
        self._next_lease = 0x1000
        self._changed = asyncio.Event()

    def advance(self, seconds: float) -> None:
        """Move a :class:`ManualClock` on, expiring the leases whose time has come."""
        assert isinstance(self.clock, ManualClock)
        self.clock.now += seconds
        self.expire()

    def expire(self) -> None:
        """Drop every lease past its expiry, with its keys (one revision, as etcd does)."""
        now = self.clock()
        for lease in [i for i, x in self.leases.items() if x.expires <= now]:
            self.drop_lease(lease)

    def drop_lease(self, lease: int) -> None:
        """Revoke (or expire) ``lease`` now: its keys go in one revision."""
        self.leases.pop(lease, None)
        gone = [k for k, v in self.kv.items() if v.lease == lease]
        if gone:
            self.revision += 1
            for k in gone:
                del self.kv[k]
            self._notify()

    def get(self, key: bytes) -> Entry | None:
        """``key`` as stored now."""
        v = self.kv.get(key)
        return None if v is None else Entry(key, v.value, v.create, v.mod)

    def put(self, key: bytes, value: bytes) -> None:
        """An operator's (or a test's) plain write."""
        self.commit(Txn((), (Put(key, value),)))

    def delete(self, key: bytes) -> None:
        """An operator's (or a test's) plain delete."""
        self.commit(Txn((), (Delete(key),)))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _holds(self, c: Compare) -> bool:
        v = self.kv.get(c.key)
        if c.target == "value":
            return v is not None and v.value == c.expect
        have = 0 if v is None else (v.create if c.target == "create" else v.mod)
        return have == c.expect

    def commit(self, txn: Txn) -> TxnResult:
        """Run ``txn`` atomically; a put on a lease that does not exist fails it whole."""
        self.expire()
        ok = all(self._holds(c) for c in txn.compare)
        ops = txn.success if ok else txn.failure
        for op in ops:
            if isinstance(op, Put) and op.lease is not None and op.lease not in self.leases:
                raise StoreDown("etcdserver: requested lease not found")
        writes = any(not isinstance(op, Get) for op in ops)
        revision = self.revision + 1 if writes else self.revision
        gets: list[Entry | None] = []
        for op in ops:
            self._apply(op, revision, gets)
        if writes:
            self.revision = revision
            self._notify()
        return TxnResult(ok, tuple(gets))

    def _apply(self, op: Op, revision: int, gets: list[Entry | None]) -> None:
        if isinstance(op, Get):
            gets.append(self.get(op.key))
        elif isinstance(op, Delete):
            self.kv.pop(op.key, None)
        else:
            old = self.kv.get(op.key)
            self.kv[op.key] = _Key(op.value, old.create if old else revision, revision, op.lease)

    def grant(self, ttl: int) -> int:
        """A new lease."""
        self._next_lease += 1
        self.leases[self._next_lease] = _Lease(ttl, self.clock() + ttl)
        return self._next_lease

    def refresh(self, lease: int) -> int:
        """The lease's TTL, restarted; 0 if it is gone."""
        self.expire()
        held = self.leases.get(lease)
        if held is None:
            return 0
        held.expires = self.clock() + held.ttl
        return held.ttl

    def range(self, prefix: bytes) -> tuple[int, list[Entry]]:
        """Every key under ``prefix``, and the revision read at."""
        self.expire()
        return self.revision, [Entry(k, v.value, v.create, v.mod, v.lease or 0)
                               for k, v in sorted(self.kv.items()) if k.startswith(prefix)]

    def lease_left(self, lease: int) -> LeaseLeft | None:
        """What is left of ``lease`` (whole seconds, as etcd says), or None if it is gone."""
        self.expire()
        held = self.leases.get(lease)
        if held is None:
            return None
        return LeaseLeft(float(int(held.expires - self.clock())), float(held.ttl))

    async def changed(self, after: int) -> int:
        """Wait until the revision is past ``after``; the revision then."""
        while self.revision <= after:
            await self._changed.wait()
        return self.revision


Mode = Literal["up", "refuse", "silent"]


class MemStore:
    """One node's client of a :class:`MemEtcd`, with etcd's call deadlines and faults.

    ``mode``: ``"up"``; ``"refuse"`` (every call fails at once, as a reset connection does);
    ``"silent"`` (every call hangs until its deadline, as a black hole does).
    ``hooks[name]`` (name: grant, refresh, revoke, snapshot, commit) is awaited inside the
    call, before it takes effect, with the call's argument: it may stall the call past its
    deadline (the call then fails and never takes effect) or change the world first.
    """

    def __init__(self, etcd: MemEtcd, keys: Keys, timing: Timing,
                 deadline: Deadline = lambda: None) -> None:
        self.etcd = etcd
        self.keys = keys
        self.timing = timing
        self._deadline = deadline
        self.mode: Mode = "up"
        self.hooks: dict[str, Hook] = {}
        self.calls: list[str] = []  # names of the calls made, in order

    async def _call(self, name: str, arg: Any, base: float) -> None:
        """Pass the call's gate: fail, hang, or run its hook, all within its deadline."""
        self.calls.append(name)
        timeout = budget(base, self._deadline)
        if timeout <= 0:
            raise StoreDown("fence deadline passed")
        if self.mode == "refuse":
            raise StoreDown("connection refused")
        hook = self.hooks.get(name)
        gate = asyncio.Event().wait() if self.mode == "silent" else (
            hook(arg) if hook is not None else None)
        if gate is None:
            return
        task = asyncio.ensure_future(gate)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            raise StoreDown("etcd call timed out")
        task.result()

    async def grant(self, ttl: int) -> int:
        await self._call("grant", ttl, self.timing.call_timeout)
        return self.etcd.grant(ttl)

    async def refresh(self, lease: int) -> int | None:
        await self._call("refresh", lease, self.timing.refresh_timeout)
        return self.etcd.refresh(lease)

    async def revoke(self, lease: int, timeout: float) -> None:
        await self._call("revoke", lease, timeout)
        self.etcd.drop_lease(lease)

    async def lease_left(self, lease: int) -> LeaseLeft | None:
        await self._call("lease_left", lease, self.timing.call_timeout)
        return self.etcd.lease_left(lease)

    async def snapshot(self) -> Snapshot:
        await self._call("snapshot", None, self.timing.call_timeout)
        revision, entries = self.etcd.range(self.keys.prefix)
        return decode(self.keys, revision, entries)

    async def commit(self, txn: Txn) -> TxnResult:
        await self._call("commit", txn, self.timing.call_timeout)
        return self.etcd.commit(txn)

    async def changes(self, start: int) -> AsyncIterator[None]:
        seen = start - 1 if start else self.etcd.revision
        while True:
            if self.mode != "up":
                raise StoreDown("watch broken")
            seen = await self.etcd.changed(seen)
            yield

    async def close(self) -> None:
        pass
