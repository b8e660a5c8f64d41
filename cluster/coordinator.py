"""The cluster coordinator's decisions: membership, election, assignment, ownership, fencing.

Written against the :class:`cluster.store.Store` protocol only; :class:`EtcdCoordinator` is
this coordinator on :class:`cluster.store.EtcdStore` (the key layout is :mod:`cluster.keys`).

A reconcile loop (Patroni style) re-reads the whole prefix every lease_ttl/3 and acts; a
prefix watch only makes it react sooner, so correctness never depends on a watch. The fencing
token of a shard is ``token_base`` plus the revision at which this node created its owner key.
Revisions grow, and the base is only ever raised, so tokens only grow; the base is raised when
the spool already holds a token at least as large as the claim would get: a spool written by a
standalone node (wall-clock tokens) or under an etcd that has since been rebuilt (revisions
start again from 1). Without it such a spool could never be claimed again.

Self-fencing is a timer on the event loop's monotonic clock, armed at the moment each
successful lease refresh was *sent* plus ``fence_after``: etcd counts the TTL from when it
processed the refresh, which is later, so the fence always comes before etcd can give our keys
away, whether or not any store call ever returns. Every store call is abandoned before that
deadline, so a hung call holds nothing up; a refresh is abandoned much sooner, so that a
retry on the next endpoint still fits before the fence (see :class:`cluster.store.Timing`).
``may_send`` reads the same deadline from the clock, so a process that resumes from a pause
says no before the timer callback has had a chance to run.

Shards are acquired and released in background tasks: releases (each waiting for in-flight
deliveries) run all at once, and acquiring a dead node's shards never waits behind them. A
shard being released is not acquired again until its release has ended; once ``stop()``
begins, no acquisition starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import structlog

import mta
from cluster.keys import Keys
from cluster.placement import Node, add_handoff_targets, place_followers, promotable_assignment
from cluster.rendezvous import assign, score
from cluster.store import (
    Deadline,
    Entry,
    EtcdStore,
    LeaseLeft,
    Owner,
    Snapshot,
    Store,
    StoreDown,
    Timing,
    Transactions,
    Txn,
    decode_replicas,
    decode_sync,
)
from mta.config import Config
from mta.coordinator import (
    ClusterOpError,
    Member,
    Replication,
    RuntimeSettings,
    ShardHost,
    ShardInfo,
)
from mta.logs import describe
from mta.replication.insync import SyncRecord, promotable, takeover_record
from mta.spool.layout import ShardCountMismatch
from mta.tasks import cancel_and_wait

__all__ = ["ClusterCoordinator", "EtcdCoordinator", "parse_hostport", "promotable_members"]

log = structlog.get_logger("cluster")

# How long stop() and a rejoin wait, in all, for the shards' releases: they run at once, and
# the host bounds each one (in-flight deliveries get about 10 s), so one deadline covers all.
_RELEASE_DEADLINE = 15.0
# Claims in parallel: a dead node's shards are recovered from the spool at the same time, not
# one after another, while a few store round trips per claim stay in flight at most.
_ACQUIRE_CONCURRENCY = 8
# How long stop() waits for its background loops once cancelled.
_LOOP_GRACE = 5.0
# After a failed refresh, try again this soon (on the next endpoint): the refresh deadline
# already took its time, and the fence deadline is what is left.
_REFRESH_RETRY = 0.05
# What a node publishes in its node key besides smtp and admin, with a replicated spool only
# (with one copy the node key stays as it always was): its replication listener
# ("host:port"), its zone, and the id of its copy of each shard ({"<shard>": id}).
_REPLICATION_INFO = ("replication", "zone", "copies")

Connect = Callable[[Deadline], Store]


class ClusterCoordinator:
    """The Coordinator of a node in a cluster, on whatever :class:`Store` ``connect`` makes
    (it is given the deadline every store call must end by)."""

    def __init__(self, cfg: Config, connect: Connect) -> None:
        self.cfg = cfg
        self.node_id = cfg.node.id
        self.total_shards = cfg.spool.shards
        self.replicas = cfg.spool.replicas
        self.timing = Timing(cfg.cluster.lease_ttl)
        self.ttl = self.timing.ttl
        self.fence_after = self.timing.fence_after
        self.store = connect(self._call_deadline)
        self.txns = Transactions(self.store.keys)
        self._lease: int | None = None
        # Monotonic time at which the last successful refresh (or grant) of the lease was
        # sent, and the fence deadline that follows from it.
        self._last_refresh = 0.0
        self._fence_deadline = 0.0
        self._fence_timer: asyncio.TimerHandle | None = None
        self._refresh_failed = False
        self._host: ShardHost | None = None
        self._owned: dict[int, int] = {}  # shard -> fencing token
        self._changes = _ShardChanges(self.node_id, lambda: len(self._owned))
        # shard -> create revision of our owner key: the token is token_base + this, so the
        # token changes exactly when the key does (only through a release and a new claim).
        self._claims: dict[int, int] = {}
        # shard -> create revision of our owner key while the host acquires it: its owner side
        # may change the in-sync record (change_sync) before the claim is complete.
        self._taking: dict[int, int] = {}
        self._waiting: list[int] = []  # shards with no live promotable copy, as last logged
        self._view = Snapshot()
        self._tasks: list[asyncio.Task[None]] = []
        self._keepalive_task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self._fenced = False
        self._stopping = False
        self._claims_closed = False  # the node began to stop: hold what we own, claim nothing
        self._stopped = False
        self._runtime = RuntimeSettings()
        self._watchers: list[Callable[[RuntimeSettings], None]] = []
        self._busy: set[int] = set()  # shards being acquired or released right now
        self._acquiring: dict[int, asyncio.Task[bool]] = {}
        self._releasing: dict[int, asyncio.Task[None]] = {}
        self._acquire_slots = asyncio.Semaphore(_ACQUIRE_CONCURRENCY)
        self.started = time.time()

    @property
    def last_refresh(self) -> float:
        """Monotonic time the last successful lease refresh (or grant) was sent."""
        return self._last_refresh

    @property
    def fence_deadline(self) -> float:
        """Monotonic time at which this node fences itself unless a refresh succeeds first."""
        return self._fence_deadline

    def _call_deadline(self) -> float | None:
        """While we hold a lease, no store call may outlive the moment it stops being
        provably ours."""
        if self._fenced or self._lease is None:
            return None
        return self._fence_deadline

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, host: ShardHost) -> None:
        """Join (retrying while the store is down, for a while), start the loops, and return
        once the first assignment including us has been acted on."""
        self._host = host
        deadline = time.monotonic() + max(10.0, self.ttl * 3)
        while True:
            try:
                # Before joining: a node with another count must never be assigned a shard.
                await self._agree_shard_count()
                await self._join()
                break
            except StoreDown as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot reach etcd at {self.cfg.cluster.etcd}: "
                                       f"{describe(exc)}") from None
                self._lease = None  # a grant whose registration failed: left to expire
                await asyncio.sleep(0.5)
        # Armed once joined: a fence while still retrying the join would fence a host that
        # has nothing yet. If the join was slow enough, it fires at once (and we rejoin).
        self._arm_fence_timer()
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")
        self._tasks = [self._keepalive_task,
                       asyncio.create_task(self._reconcile_loop(), name="etcd-reconcile"),
                       asyncio.create_task(self._watch_loop(), name="etcd-watch")]
        for _ in range(int(self.ttl * 20)):
            if self._serving():
                break
            await asyncio.sleep(0.05)

    def _serving(self) -> bool:
        """The assignment is known and every shard it gives us (unowned by others) is ours."""
        v = self._view
        return bool(v.assignment) and all(
            s in self._owned for s, n in v.assignment.items()
            if n == self.node_id and v.owners.get(s, Owner(n, 0)).node == n)

    async def _agree_shard_count(self) -> None:
        """Record the cluster's shard count (first node, create-revision-0 txn) or check ours
        against it; raises :class:`ShardCountMismatch`. A cluster from before the key gets
        our count, unless the leader has assigned a shard that count would leave out."""
        where = (f"cluster {self.cfg.cluster.name!r} (etcd key "
                 f"{self.store.keys.shards.decode()}; delete it only if the whole cluster "
                 "and its spool are new)")
        v = await self.store.snapshot()
        if v.shard_count is None:
            top = max(v.assignment, default=-1)
            if top >= self.total_shards:
                raise ShardCountMismatch(self.total_shards, top + 1,
                                         f"cluster {self.cfg.cluster.name!r} (it assigns "
                                         f"shard {top})", at_least=True)
            if (await self.store.commit(self.txns.record_shard_count(self.total_shards))
                    ).succeeded:
                log.info("cluster.shards_recorded", node_id=self.node_id,
                         shards=self.total_shards)
                return
            v = await self.store.snapshot()  # another node was first
        if v.shard_count != self.total_shards:
            raise ShardCountMismatch(self.total_shards, v.shard_count or 0, where)

    async def _join(self) -> None:
        sent = time.monotonic()  # etcd starts the TTL when it grants, after this
        self._lease = await self.store.grant(self.timing.grant_ttl)
        self._refreshed(sent, arm=False)
        await self._register()

    async def _register(self) -> None:
        assert self._host is not None and self._lease is not None
        ends = self._host.endpoints()
        info = {"addr": ends.get("smtp", ""), "admin": ends.get("admin", ""),
                "version": mta.__version__, "started": self.started, "pid": os.getpid(),
                "weight": 1.0}
        if self.replicas > 1:
            info.update({k: ends[k] for k in _REPLICATION_INFO if k in ends})
        await self.store.commit(self.txns.register(self.node_id, info, self._lease))

    async def stop(self) -> None:
        """Hand every shard over at once: release locally, then revoke the lease so the
        leader reassigns without waiting for the TTL."""
        if self._stopped:
            return
        self._stopped = True
        # From here on no acquisition starts: a stopping node must not take over the shards
        # its stopping peers give back (it would only have to hand them on again).
        self._stopping = True
        await self._cancel_loops(*(t for t in self._tasks if t is not self._keepalive_task))
        # The keepalive keeps running while we release: the lease must outlive the releases
        # (or the timer fences us). Claims in flight stop at their next step; whatever they
        # got is released with the rest.
        deadline = time.monotonic() + _RELEASE_DEADLINE
        await _wait_all(list(self._acquiring.values()), deadline)
        released = await self._release_all(delete_key=True, deadline=deadline)
        self._changes.flush()
        await self._cancel_loops(self._keepalive_task)
        if not released and self._host is not None:
            # Revoking hands the shards to peers at once: nothing may write them after that.
            self._fence_now("stopping with releases still running")
        if self._lease is not None:
            with contextlib.suppress(StoreDown):
                await self.store.revoke(self._lease, self.ttl / 3)
        self._cancel_fence_timer()
        await self.store.close()

    async def _cancel_loops(self, *tasks: asyncio.Task[None] | None) -> None:
        for task in await cancel_and_wait(*tasks, timeout=_LOOP_GRACE):
            log.warning("cluster.task_stuck", node_id=self.node_id, task=task.get_name())

    # --- Coordinator protocol --------------------------------------------------------------

    def rate_share(self) -> float:
        """This node's share of cluster-wide rates: the share of the shards it owns."""
        return max(len(self._owned), 1) / self.total_shards

    @property
    def healthy(self) -> bool:
        """Lease provably held."""
        return not self._fenced and time.monotonic() < self._fence_deadline

    def may_send(self, shard: int) -> bool:
        """No I/O: dictionary lookups and one clock read, right after a process pause too."""
        revision = self._claims.get(shard)
        if revision is None or self._fenced or shard in self._releasing:
            return False
        # The clock, not the timer: after a pause the callback may not have run yet.
        if time.monotonic() >= self._fence_deadline:
            return False
        # Token unchanged: a view read after our claim that shows another owner key (someone
        # else's, or a newer one) means the shard is no longer provably ours.
        v = self._view
        return v.revision <= revision or v.owners.get(shard) == Owner(self.node_id, revision)

    @property
    def is_leader(self) -> bool:
        """This node is the elected leader (and not fenced)."""
        return self._view.leader == self.node_id and not self._fenced

    def runtime(self) -> RuntimeSettings:
        """Runtime settings as last read."""
        return self._runtime

    def watch_runtime(self, callback: Callable[[RuntimeSettings], None]) -> None:
        """Call ``callback`` whenever a read shows other runtime settings."""
        self._watchers.append(callback)

    async def change_runtime(self, throttles: dict[str, float | None] | None = None,
                             suspended: dict[str, bool] | None = None) -> RuntimeSettings:
        """One key per change under config/, so changes to other keys are never undone."""
        txn = self.txns.runtime(throttles or {}, suspended or {})
        await self._operator_write(txn)
        await self._fresh()
        return self._runtime

    async def _operator_write(self, txn: Txn) -> None:
        """An operator's write (an empty one is skipped); ClusterOpError if it fails."""
        try:
            if txn.success:
                await self.store.commit(txn)
        except StoreDown as exc:
            raise ClusterOpError(f"etcd write failed: {describe(exc)}", "retry", 503) from None

    async def _fresh(self) -> Snapshot:
        try:
            return await self._read()
        except StoreDown as exc:
            raise ClusterOpError(f"etcd not reachable from {self.node_id}: {describe(exc)}",
                                 "check the etcd cluster (etcdctl endpoint health)", 503
                                 ) from None

    async def members(self, *, leases: bool = False) -> list[Member]:
        """Every live node, from a fresh read (with ``leases``, the expiring ones marked)."""
        v = await self._fresh()
        owned = v.owned_per_node()
        expiring = await self._expiring_leases(v) if leases else {}
        return [Member(node, str(info.get("addr", "")), str(info.get("admin", "")),
                       v.leader == node, node in v.draining, owned.get(node, 0),
                       str(info.get("version", "")), float(info.get("started", 0.0)),
                       expiring.get(node))
                for node, info in sorted(v.members.items())]

    async def _expiring_leases(self, v: Snapshot) -> dict[str, float]:
        """The members whose lease has not been refreshed for a while, and its time left: a
        killed node stays listed until its lease runs out, and must not look "up"."""
        async def left(node: str, lease: int) -> tuple[str, LeaseLeft | None]:
            if node == self.node_id:
                return node, None
            try:
                return node, await self.store.lease_left(lease)
            except StoreDown:
                return node, None

        found = await asyncio.gather(*(left(n, lease) for n, lease in v.member_leases.items()))
        return {node: info.left for node, info in found
                if info is not None and info.expiring}

    async def shards(self) -> list[ShardInfo]:
        """Assignment, owner and token of every shard, from a fresh read."""
        v = await self._fresh()
        # Ours exactly; a peer's as claimed unless the base was raised since.
        return [ShardInfo(s, v.assignment.get(s),
                          o.node if (o := v.owners.get(s)) is not None else None,
                          self._owned.get(s, v.token(s)), tuple(v.replicas.get(s, ())),
                          tuple(sorted(r.members)) if (r := v.sync.get(s)) is not None
                          else None)
                for s in range(self.total_shards)]

    def replication_address(self, node: str) -> tuple[str, int] | None:
        """``node``'s replication listener, as its node key in the latest view says."""
        info = self._view.members.get(node)
        return parse_hostport(info.get("replication")) if info is not None else None

    def followers(self, shard: int) -> tuple[str, ...]:
        """The followers the leader placed for ``shard`` (``replicas/<shard>``), as the latest
        view shows them: no I/O."""
        return self._view.replicas.get(shard, ())

    async def change_sync(self, shard: int, old: SyncRecord, new: SyncRecord
                          ) -> SyncRecord | None:
        """One transaction guarded by our owner key and by ``old`` being the record in place;
        ``new`` if it committed, None if refused or the store did not answer (never raises:
        the owner then acknowledges nothing it would need the change for)."""
        revision = self._claims.get(shard, self._taking.get(shard))
        if revision is None or self._fenced:
            return None
        txn = self.txns.write_sync(shard, self.node_id, revision, old.encode(), new)
        try:
            res = await self.store.commit(txn)
        except StoreDown as exc:
            # The call may have committed before the answer was lost: read what is there.
            log.info("cluster.sync_change_failed", node_id=self.node_id, shard=shard,
                     error=describe(exc)[:200])
            return await self._sync_in_place(shard, old, new)
        except Exception as exc:  # the owner side must get an answer, whatever happened
            log.exception("cluster.sync_change_error", node_id=self.node_id, shard=shard,
                          error=describe(exc))
            return await self._sync_in_place(shard, old, new)
        if not res.succeeded:
            log.warning("cluster.sync_change_refused", node_id=self.node_id, shard=shard,
                        why="our owner key or the record changed")
            return await self._sync_in_place(shard, old, new)
        log.info("cluster.sync_changed", node_id=self.node_id, shard=shard,
                 members=sorted(new.members))
        return new

    async def _sync_in_place(self, shard: int, old: SyncRecord, new: SyncRecord
                             ) -> SyncRecord | None:
        """After a change that failed or was refused: the record etcd holds, if it is still
        this term's (None: ``old``, or another owner's). Read until etcd answers: until
        then the change counts as in flight, so the owner requires the acks of the old
        members and the new ones, whichever record etcd ends up holding (adopting the old
        one after a change that did commit would leave a member it no longer waits for)."""
        while not self._stopping and not self._fenced and (
                self._claims.get(shard, self._taking.get(shard)) is not None):
            try:
                v = await self._read()
            except StoreDown:
                await asyncio.sleep(min(1.0, self.ttl / 6))
                continue
            record = v.sync.get(shard)
            if record is None or record == old or (record.token, record.owner) != (
                    old.token, old.owner):
                return None
            log.info("cluster.sync_record_reread", node_id=self.node_id, shard=shard,
                     members=sorted(record.members), committed=record == new)
            return record
        return None

    async def set_draining(self, node: str, draining: bool) -> None:
        """Mark ``node`` drained (its shards move away) or back in service."""
        v = await self._fresh()
        if draining and node not in v.members:
            raise ClusterOpError(f"no live node {node!r} in cluster {self.cfg.cluster.name!r}",
                                 "`mtactl nodes` lists the live nodes", 404)
        if not draining and node not in v.draining:
            # An undrain that changes nothing is most often a mistyped node id.
            hint = "`mtactl nodes` lists the nodes and which of them drain"
            if node in v.members:
                raise ClusterOpError(f"{node} is not draining", hint, 409)
            raise ClusterOpError(f"no node {node!r} in cluster {self.cfg.cluster.name!r} "
                                 "and none of that name is draining", hint, 404)
        if draining and not (set(v.members) - v.draining - {node}):
            raise ClusterOpError(f"refusing to drain {node}: no other node would be left to "
                                 "own the shards", "start another node first, or undrain one")
        await self._operator_write(self.txns.drain(node, draining))
        self._kick.set()

    async def rebalance(self, timeout: float) -> dict[str, object]:
        """Ask the leader (through the ``rebalance`` key) to recompute the assignment, then
        wait until every shard is owned by the node it is assigned to."""
        before = dict((await self._fresh()).assignment)
        await self._operator_write(self.txns.request_rebalance(self.node_id))
        self._kick.set()
        start = time.monotonic()
        while True:
            v = await self._fresh()
            converged = v.converged(self.total_shards)
            if converged or time.monotonic() - start > timeout:
                break
            await asyncio.sleep(0.2)
        return {"moved": sum(1 for s, n in v.assignment.items() if before.get(s) != n),
                "converged": converged, "seconds": round(time.monotonic() - start, 2),
                "per_node": v.owned_per_node(), "leader": v.leader,
                "unowned": self.total_shards - len(v.owners)}

    # --- keepalive and self-fencing --------------------------------------------------------

    async def _keepalive(self) -> None:
        while True:
            if self._fenced:
                pause = min(self.ttl / 3, 0.5)
            else:
                pause = _REFRESH_RETRY if self._refresh_failed else self.timing.refresh_interval
            await asyncio.sleep(pause)
            try:
                await self._keepalive_step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end the loop that lets us rejoin
                log.exception("cluster.keepalive_error", node_id=self.node_id,
                              error=describe(exc))

    async def _keepalive_step(self) -> None:
        """Refresh the lease, or rejoin when fenced. Fencing is the timer's job, not this
        loop's: a call here may take until the deadline, and the timer fires regardless."""
        if self._fenced:
            try:
                await self._rejoin()
            except StoreDown as exc:
                log.info("cluster.rejoin_failed", node_id=self.node_id, error=describe(exc)[:200])
            return
        lease = self._lease
        assert lease is not None
        # The TTL restarts when etcd processes the refresh, which is after we send it: the
        # send time is the latest moment the new expiry is provably after.
        sent = time.monotonic()
        try:
            ttl = await self.store.refresh(lease)
        except StoreDown as exc:
            self._refresh_failed = True
            log.debug("cluster.refresh_failed", node_id=self.node_id, error=describe(exc)[:200],
                      fence_in=round(self._fence_deadline - time.monotonic(), 3))
            return
        # An answer without a TTL (the stream ended) is no refresh: retry at once.
        self._refresh_failed = ttl is None
        if self._fenced or lease != self._lease or ttl is None:
            return  # an answer after the fence is too late: we rejoin instead
        if ttl <= 0:
            # etcd says the lease is gone (expired, revoked): so are our keys.
            self._fence_now("etcd reports our lease expired")
            return
        self._refreshed(sent)

    def _refreshed(self, sent: float, *, arm: bool = True) -> None:
        """A refresh (or grant) sent at ``sent`` succeeded: move the fence deadline."""
        self._last_refresh = sent
        self._fence_deadline = sent + self.fence_after
        if arm:
            self._arm_fence_timer()

    def _arm_fence_timer(self) -> None:
        if self._fence_timer is not None:
            self._fence_timer.cancel()
        loop = asyncio.get_running_loop()
        # The deadline is on time.monotonic(); call_at wants the loop's clock (uvloop's is
        # its own, cached per iteration): convert through the time left.
        left = self._fence_deadline - time.monotonic()
        self._fence_timer = loop.call_at(loop.time() + left, self._on_fence_deadline)

    def _cancel_fence_timer(self) -> None:
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None

    def _on_fence_deadline(self) -> None:
        self._fence_timer = None
        if self._fenced or self._host is None:
            return
        if time.monotonic() < self._fence_deadline:
            # Early by a loop clock's granularity (uvloop counts milliseconds): not yet.
            self._arm_fence_timer()
            return
        self._fence_now(f"lease not refreshed for {self.fence_after:.2f}s")

    def _fence_now(self, reason: str) -> None:
        if self._fenced:
            return
        self._fenced = True
        assert self._host is not None
        self._host.fence(reason)
        log.warning("cluster.fenced", node_id=self.node_id, reason=reason,
                    shards=len(self._owned),
                    since_refresh=round(time.monotonic() - self._last_refresh, 3))

    async def _rejoin(self) -> None:
        """The store answers again: drop every shard locally (others may own them by now),
        take a new lease, and let the reconcile loop acquire afresh with new fencing tokens."""
        if self._stopping:
            return  # a stopping node does not come back
        assert self._host is not None
        # Releases first, all at once: the new lease's clock must not run while they do, and
        # no claim made under the old lease may land after the host is unfenced.
        deadline = time.monotonic() + _RELEASE_DEADLINE
        if not await _wait_all(list(self._acquiring.values()), deadline):
            return
        if not await self._release_all(delete_key=False, deadline=deadline):
            return  # still releasing: stay fenced, the next step waits again
        sent = time.monotonic()
        lease = await self.store.grant(self.timing.grant_ttl)
        log.info("cluster.rejoining", node_id=self.node_id)
        # Our keys under the old lease (if it still lives) are left to expire: revoking it
        # would drop nodes/<us> too and have the leader move our shards away and back.
        self._lease = lease
        self._refreshed(sent)
        self._refresh_failed = False
        await self._register()
        if time.monotonic() >= self._fence_deadline or self._stopping:
            return  # too slow to trust: the next step starts over
        self._fenced = False
        self._host.unfence()
        log.info("cluster.rejoined", node_id=self.node_id)
        self._kick.set()

    # --- view ------------------------------------------------------------------------------

    async def _read(self) -> Snapshot:
        v = self._view = await self.store.snapshot()
        if v.runtime != self._runtime:
            self._runtime = v.runtime
            for callback in self._watchers:
                callback(v.runtime)
        return v

    async def _watch_loop(self) -> None:
        # Only a trigger: any change under the prefix wakes the reconcile loop at once.
        while True:
            try:
                start = self._view.revision + 1 if self._view.revision else 0
                async for _ in self.store.changes(start):
                    self._kick.set()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being stopped
                await asyncio.sleep(0.2)  # the gRPC stream was cancelled under us: re-watch
            except Exception:  # compaction, disconnect: the reconcile loop re-reads anyway
                await asyncio.sleep(0.2)

    # --- reconcile -------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            self._kick.clear()
            if not self._fenced and not self._stopping:
                try:
                    await self._reconcile()
                except StoreDown as exc:
                    log.debug("cluster.reconcile_failed", node_id=self.node_id,
                              error=describe(exc))
                except Exception as exc:
                    log.exception("cluster.reconcile_error", node_id=self.node_id,
                                  error=describe(exc))
            # Not wait_for(): on 3.11 it can swallow our cancellation when the kick comes at
            # the same moment, and stop() would then wait for this loop for ever.
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({kicked}, timeout=self.ttl / 3)
            finally:
                kicked.cancel()

    async def _reconcile(self) -> None:
        v = await self._read()
        if v.leader is None:
            await self._elect()
            v = await self._read()
        if v.leader == self.node_id:
            v = await self._lead(v)
        if self._stopping or self._fenced:
            return
        # Neither claims nor releases are awaited here: a release waits for in-flight
        # deliveries (seconds), and a dead node's shards must not wait behind it. Claims are
        # started first; a shard being released (busy) is not claimed until its release ends.
        self._start_claims(v)
        self._start_releases(v)
        await self._drop_stray_keys(v)

    async def _lead(self, v: Snapshot) -> Snapshot:
        """Bring the assignment in line with the members; the view it was last checked on."""
        rebalance = v.rebalance
        # Until the assignment fits the view we act on: the read after writing it may show a
        # node gone meanwhile, and claiming a shard by the assignment made before would mean
        # handing it on at once (behind that shard's release).
        for _ in range(3):
            if not await self._write_assignment(v):
                break
            v = await self._read()
            if v.leader != self.node_id:
                break
        if rebalance:
            await self.store.commit(self.txns.clear_rebalance())
        return v

    def _start_claims(self, v: Snapshot) -> None:
        # An assignment naming a node that is gone is about to be redone by the leader: claim
        # nothing by it yet (the leader's write wakes us up again at once).
        if self._redo_pending(v):
            return
        for shard, node in sorted(v.assignment.items()):
            if (node == self.node_id and shard not in self._owned
                    and shard not in self._busy and shard not in v.owners):
                self._spawn(shard, self._acquire(shard), self._acquiring)

    def _redo_pending(self, v: Snapshot) -> bool:
        """Does the assignment name a gone node the leader will replace? Replicated, a shard
        with no live promotable copy keeps its gone owner in the assignment for as long as
        it waits: that one is not about to change, and must not hold every claim up."""
        gone = {s for s, n in v.assignment.items() if n not in v.members}
        if gone and self.replicas > 1:
            members, live = promotable_members(v), set(v.members)
            gone = {s for s in gone if s not in members or not live.isdisjoint(members[s])}
        return bool(gone)

    def _start_releases(self, v: Snapshot) -> None:
        for shard in sorted(self._owned):
            if shard in self._busy:
                continue
            if v.assignment.get(shard) != self.node_id:
                self._spawn(shard, self._release(shard, delete_key=True), self._releasing)
            elif self._key_lost(v, shard):
                # Our owner key vanished or was replaced (lease lost and regained, deleted
                # by hand) in a view newer than our claim: we must stop.
                self._spawn(shard, self._release(shard, delete_key=False), self._releasing)

    def _key_lost(self, v: Snapshot, shard: int) -> bool:
        claim = self._claims.get(shard, 0)
        return v.revision > claim and v.owners.get(shard) != Owner(self.node_id, claim)

    async def _drop_stray_keys(self, v: Snapshot) -> None:
        for shard, owner in sorted(v.owners.items()):
            if owner.node == self.node_id and shard not in self._owned and shard not in self._busy:
                # A key of ours for a shard we do not hold open (left by a release that could
                # not reach the store, or by our previous lease): remove it so the shard can
                # be taken properly, by us or by the node it is assigned to now.
                await self._delete_owner_key(shard, owner.revision)

    def _spawn(self, shard: int, work: Coroutine[Any, Any, Any],
               into: dict[int, Any]) -> None:
        """Run a claim or a release of ``shard`` in the background; busy until it ends."""
        self._busy.add(shard)
        task = asyncio.create_task(work, name=f"shard-{shard}")
        into[shard] = task

        def done(_: asyncio.Task[Any], shard: int = shard) -> None:
            self._busy.discard(shard)
            if into.get(shard) is task:
                del into[shard]
            if into is self._releasing:
                self._kick.set()  # released: it may be ours to claim again now

        task.add_done_callback(done)

    async def _elect(self) -> None:
        if self._lease is None:
            return
        if (await self.store.commit(self.txns.elect(self.node_id, self._lease))).succeeded:
            log.info("cluster.elected_leader", node_id=self.node_id)

    async def _write_assignment(self, v: Snapshot) -> bool:
        """Write the assignment ``v`` calls for (and, replicated, the followers); True if it
        differed from ``v``'s."""
        live = v.weights()
        desired = assign(self.total_shards, live)
        followers: dict[int, list[str]] = {}
        if self.replicas > 1:
            balanced = desired
            desired = self._promotable(v, balanced, live)
            followers = self._followers(v, desired, balanced)
        changes = {s: n for s, n in desired.items() if v.assignment.get(s) != n}
        if not changes and not followers:
            return False
        txn = self.txns.assign(self.node_id, changes, followers)
        if (await self.store.commit(txn)).succeeded:
            if changes:
                log.info("cluster.assigned", node_id=self.node_id, moved=len(changes),
                         nodes=sorted(live))
            if followers:
                log.info("cluster.replicas_placed", node_id=self.node_id,
                         shards=sorted(followers))
        return True

    def _promotable(self, v: Snapshot, desired: dict[int, str],
                    weights: dict[str, float]) -> dict[int, str]:
        """``desired`` changed so that a replicated shard only goes to a live member of its
        in-sync set whose copy is still the one the record names."""
        members = promotable_members(v)
        live = set(v.members)
        self._note_waiting(sorted(s for s, names in members.items() if live.isdisjoint(names)))
        return promotable_assignment(desired, v.assignment, members, live, weights)

    def _note_waiting(self, shards: list[int]) -> None:
        """One line each time the shards with no live promotable copy change (not one per
        reconcile): they wait, unowned, until a member comes back or an operator forces."""
        if shards == self._waiting:
            return
        self._waiting = shards
        if shards:
            log.warning("cluster.shard_waiting_for_copy", node_id=self.node_id, shards=shards,
                        why="no live member of the in-sync set holds the copy it names")
        else:
            log.info("cluster.shard_waiting_for_copy", node_id=self.node_id, shards=shards)

    def _followers(self, v: Snapshot, desired: Mapping[int, str],
                   balanced: Mapping[int, str]) -> dict[int, list[str]]:
        """The follower placements that differ from ``replicas/`` as ``v`` shows them."""
        nodes = {n: Node(w, str(v.members[n].get("zone", "") or ""))
                 for n, w in v.weights().items()}
        placed = place_followers(desired, nodes, self.replicas, v.replicas)
        _top_up(placed, desired, nodes, self.replicas - 1, v.replicas)
        holders = {s: o.node for s, o in v.owners.items()}
        add_handoff_targets(placed, desired, balanced, holders, nodes)
        return {s: f for s, f in placed.items() if tuple(f) != v.replicas.get(s, ())}

    async def _delete_owner_key(self, shard: int, revision: int | None = None) -> None:
        """Delete our owner key of ``shard`` (only the one created at ``revision``, if given)."""
        with contextlib.suppress(StoreDown):
            await self.store.commit(self.txns.release(shard, self.node_id, revision))

    def _may_claim(self) -> bool:
        return not self._stopping and not self._claims_closed and not self._fenced

    def stop_claiming(self) -> None:
        """The node began to stop: hold what it owns, claim nothing more."""
        self._claims_closed = True

    async def _acquire(self, shard: int) -> bool:
        """Claim ``shard`` (a background task; the caller marked it busy). Gives up at any
        step once the node stops or is fenced: a stopping node claims nothing."""
        async with self._acquire_slots:
            if not self._may_claim():
                return False
            try:
                return await self._claim(shard)
            except StoreDown as exc:
                log.debug("cluster.acquire_failed", shard=shard, node_id=self.node_id,
                          error=describe(exc)[:200])
                return False
            except Exception as exc:  # a bug must not pass silently in a background task
                log.exception("cluster.acquire_error", shard=shard, node_id=self.node_id,
                              error=describe(exc))
                return False

    async def _claim(self, shard: int) -> bool:
        lease = self._lease
        if lease is None:
            return False
        res = await self.store.commit(self.txns.claim(shard, self.node_id, lease))
        entry = res.gets[0] if res.succeeded and res.gets else None
        if entry is None or entry.value.decode() != self.node_id:
            return False
        return await self._take(shard, entry.create_revision)

    async def _take(self, shard: int, revision: int) -> bool:
        """Hand ``shard``, whose owner key we created at ``revision``, to the host."""
        assert self._host is not None
        try:
            token = await self._fencing_token(shard, revision)
            if token is None:
                # Our key went (lease lost while we stalled): someone newer may hold it.
                log.warning("cluster.claim_lost", shard=shard, node_id=self.node_id)
                return False
            if not self._may_claim():
                # Stopping (or fenced) since the claim began: hand the key back untouched.
                await self._delete_owner_key(shard, revision)
                return False
            if self.replicas > 1:
                if not await self._take_replicated(shard, revision, token):
                    await self._delete_owner_key(shard, revision)
                    return False
            else:
                await self._host.acquire_shard(shard, token)
        except Exception as exc:
            log.error("cluster.acquire_failed", shard=shard, node_id=self.node_id,
                      error=describe(exc))
            await self._delete_owner_key(shard, revision)
            return False
        finally:
            self._taking.pop(shard, None)
        # Held from here, even if stop() began meanwhile: stop() waits for this claim and
        # releases the shard with the rest.
        self._owned[shard] = token
        self._claims[shard] = revision
        log.debug("cluster.shard_acquired", shard=shard, node_id=self.node_id, token=token)
        self._changes.note("acquired", shard)
        return True

    async def _take_replicated(self, shard: int, revision: int, token: int) -> bool:
        """Take the in-sync record over (only a member holding the copy it names may), then
        hand the shard to the host with it; False if refused (the caller gives the key up)."""
        assert self._host is not None
        res = await self.store.commit(self.txns.read_replication(shard, self.node_id, revision))
        if not res.succeeded:
            log.warning("cluster.claim_lost", shard=shard, node_id=self.node_id)
            return False
        sync, placed = res.gets
        record = decode_sync(sync.value, shard) if sync is not None else None
        copy_id = self._host.copy_ids().get(shard)
        if copy_id is None or not promotable(record, self.node_id, copy_id):
            # Taking it would lose acknowledged mail: only a member's copy has all of it.
            log.warning("cluster.not_promotable", shard=shard, node_id=self.node_id,
                        copy_id=copy_id,
                        members=dict(record.members) if record is not None else None)
            return False
        new = takeover_record(record, self.node_id, copy_id, token, live=self._view.members)
        # Guarded by the record we read: a change that committed since (a shrink) means who
        # is promotable may have changed, and the claim starts over from a fresh read.
        wrote = await self.store.commit(self.txns.write_sync(
            shard, self.node_id, revision, sync.value if sync is not None else None, new))
        if not wrote.succeeded:
            log.warning("cluster.takeover_refused", shard=shard, node_id=self.node_id,
                        why="the in-sync record or our owner key changed since we read it")
            return False
        self._taking[shard] = revision
        await self._host.acquire_shard(shard, token, Replication(new, _followers_of(placed, shard)))
        return True

    async def _fencing_token(self, shard: int, revision: int) -> int | None:
        """``token_base + revision``, first raising the base (compare-and-swap, upwards only)
        when the spool holds a token it would not exceed; None if our owner key is gone.

        Every read and raise of the base is guarded by our owner key still being the one
        created at ``revision``: a node that lost the key while stalled must not learn (or
        set) a base newer than the one its successor claimed with, or its stale claim could
        outbid the live owner's on disk.
        """
        assert self._host is not None
        recorded = await self._host.recorded_token(shard)
        while True:
            res = await self.store.commit(
                self.txns.read_token_base(shard, self.node_id, revision))
            if not res.succeeded:
                return None
            entry = res.gets[0] if res.gets else None
            base = int(entry.value) if entry is not None else 0
            if base + revision > recorded:
                return base + revision
            need = recorded - revision + 1
            expect = entry.mod_revision if entry is not None else 0
            raised = await self.store.commit(
                self.txns.raise_token_base(shard, self.node_id, revision, expect, need))
            if raised.succeeded:
                log.warning("cluster.token_base_raised", node_id=self.node_id, shard=shard,
                            recorded=recorded, base=need,
                            why="the spool holds tokens from a standalone node or an "
                                "earlier etcd")
            # Otherwise another node raised it first, or our key is gone: the guarded read
            # above tells which.

    async def _release_all(self, *, delete_key: bool, deadline: float) -> bool:
        """Release every owned shard at once (and wait for releases already running), under
        one deadline for all; True once none is owned."""
        for shard in sorted(self._owned):
            if shard not in self._releasing:
                self._spawn(shard, self._release(shard, delete_key=delete_key),
                            self._releasing)
        if not await _wait_all(list(self._releasing.values()), deadline):
            log.warning("cluster.release_overrun", node_id=self.node_id,
                        shards=sorted(self._releasing))
            return False
        return not self._owned

    async def _release(self, shard: int, *, delete_key: bool) -> None:
        """Release ``shard`` on the host (a background task; the caller marked it busy, and
        may_send says no from now on), then give its owner key up."""
        assert self._host is not None
        revision = self._claims.get(shard)
        try:
            await self._host.release_shard(shard)
        except Exception as exc:
            # Still held as far as we know: the next reconcile tries again.
            log.exception("cluster.release_failed", shard=shard, node_id=self.node_id,
                          error=describe(exc))
            return
        self._owned.pop(shard, None)
        self._claims.pop(shard, None)
        if delete_key:
            # Only after the host let go: before that, the next owner could write beside us.
            await self._delete_owner_key(shard, revision)
        log.debug("cluster.shard_released", shard=shard, node_id=self.node_id)
        self._changes.note("released", shard)


def promotable_members(v: Snapshot) -> dict[int, list[str]]:
    """Per shard with an in-sync record, the members that may own it: those whose node key
    reports the copy the record names (a node back with a replaced disk reports another id,
    and its copy lacks what was acknowledged). Dead members are kept: liveness is the
    caller's."""
    out: dict[int, list[str]] = {}
    for shard, record in v.sync.items():
        out[shard] = [node for node, copy in sorted(record.members.items())
                      if _reported_copy(v, node, shard) == copy]
    return out


def _top_up(placed: dict[int, list[str]], owners: Mapping[int, str], nodes: Mapping[str, Node],
            want: int, previous: Mapping[int, tuple[str, ...]]) -> None:
    """Give every shard its ``want`` followers where nodes allow, past place_followers'
    per-node bound. That bound is an even share of all copies, so while owners are uneven
    (a first node owns every shard, and nothing moves to a node that holds no promotable
    copy) it leaves shards with no follower; such a shard could then never become
    promotable anywhere else and would stay on its node for ever. Other zones first, then
    a node that has a copy already, the least loaded, the rendezvous order."""
    load = dict.fromkeys(nodes, 0)
    for followers in placed.values():
        for n in followers:
            load[n] = load.get(n, 0) + 1
    for shard, followers in sorted(placed.items()):
        owner = owners.get(shard)
        zones = {nodes[n].zone for n in (owner, *followers) if n in nodes}
        kept = set(previous.get(shard, ()))
        while len(followers) < want:
            candidates = [n for n in nodes if n != owner and n not in followers]
            if not candidates:
                break
            best = min(candidates, key=lambda n: (
                bool(nodes[n].zone) and nodes[n].zone in zones, n not in kept, load[n],
                -score(n, shard, nodes[n].weight)))
            followers.append(best)
            zones.add(nodes[best].zone)
            load[best] += 1


def _reported_copy(v: Snapshot, node: str, shard: int) -> str | None:
    info = v.members.get(node)
    copies = info.get("copies") if info is not None else None
    if not isinstance(copies, Mapping):
        return None
    copy = copies.get(str(shard), copies.get(shard))
    return copy if isinstance(copy, str) else None


def _followers_of(entry: Entry | None, shard: int) -> tuple[str, ...]:
    """The followers in a ``replicas/<shard>`` entry; none when absent or unreadable (the
    leader rewrites an unreadable one on its next pass)."""
    if entry is None:
        return ()
    try:
        return decode_replicas(entry.value)
    except ValueError as exc:
        log.warning("cluster.bad_key", key=f"replicas/{shard}", error=describe(exc))
        return ()


def parse_hostport(value: object) -> tuple[str, int] | None:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``; None if it is neither."""
    if not isinstance(value, str):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        return None  # an IPv6 address without brackets: where its port starts is a guess
    return (host, int(port)) if host else None


class _ShardChanges:
    """Shards acquired and released, logged as one summary line once they settle: a node
    taking 64 shards at start writes one line, not 64."""

    SETTLE = 0.5  # seconds without a change before the summary is written

    def __init__(self, node_id: str, owned: Callable[[], int]) -> None:
        self.node_id = node_id
        self._owned = owned
        self._seen: dict[str, list[int]] = {"acquired": [], "released": []}
        self._timer: asyncio.TimerHandle | None = None

    def note(self, kind: str, shard: int) -> None:
        self._seen[kind].append(shard)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.SETTLE, self.flush)

    def flush(self) -> None:
        """Write the summary of what changed since the last one (nothing if nothing did)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        acquired, released = sorted(self._seen["acquired"]), sorted(self._seen["released"])
        if acquired or released:
            log.info("cluster.shards_changed", node_id=self.node_id, acquired=acquired,
                     released=released, owned=self._owned())
        self._seen = {"acquired": [], "released": []}


class EtcdCoordinator(ClusterCoordinator):
    """The Coordinator of a node in an etcd-coordinated cluster."""

    def __init__(self, cfg: Config) -> None:
        keys = Keys(cfg.cluster.name)
        timing = Timing(cfg.cluster.lease_ttl)
        super().__init__(cfg, lambda deadline: EtcdStore.for_cluster(cfg.cluster, keys, timing,
                                                                     deadline))


async def _wait_all(tasks: list[asyncio.Task[Any]], deadline: float) -> bool:
    """Wait (without cancelling them) until every task ended or ``deadline``; True if all
    ended."""
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    return not pending
