"""EtcdCoordinator: membership, leader election and shard ownership on a real etcd.

Keys under ``/mta/<cluster>/``:

| key              | written by            | value                          | lifetime      |
|------------------|-----------------------|--------------------------------|---------------|
| nodes/<id>       | each node             | msgpack {addr, admin, ...}     | node lease    |
| leader           | election txn          | node id                        | leader lease  |
| assign/<shard>   | leader                | node id                        | persistent    |
| owner/<shard>    | owner, create txn     | node id                        | owner lease   |
| drain/<id>       | operator (mtactl)     | b"1"                           | persistent    |
| rebalance        | operator (mtactl)     | requesting node id             | until leader acts |
| config/throttle/<domain or site> | operator | "100/s"                    | persistent    |
| config/suspend/<domain>          | operator | b"1"                       | persistent    |
| token_base       | claiming node, txn    | decimal integer                | only raised   |
| shards           | first node, create txn | decimal shard count           | persistent    |

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
away, whether or not any etcd call ever returns. Every etcd call is abandoned before that
deadline, so a hung call holds nothing up. ``may_send`` reads the same deadline from the clock,
so a process that resumes from a pause says no before the timer callback has had a chance to run.

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
from collections.abc import Callable, Coroutine
from typing import Any

import aetcd
import msgpack
import structlog

import mta
from cluster.rendezvous import assign
from mta.config import Config, parse_rate
from mta.coordinator import ClusterOpError, Member, RuntimeSettings, ShardHost, ShardInfo
from mta.spool.layout import ShardCountMismatch

__all__ = ["EtcdCoordinator"]

log = structlog.get_logger("cluster")

# How long stop() and a rejoin wait, in all, for the shards' releases: they run at once, and
# the host bounds each one (in-flight deliveries get about 10 s), so one deadline covers all.
_RELEASE_DEADLINE = 15.0
# Claims in parallel: a dead node's shards are recovered from the spool at the same time, not
# one after another, while a few etcd round trips per claim stay in flight at most.
_ACQUIRE_CONCURRENCY = 8


class _View:
    """What the last full read of the prefix showed."""

    def __init__(self) -> None:
        self.revision = 0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.leader: str | None = None
        self.assign: dict[int, str] = {}
        self.owner: dict[int, tuple[str, int]] = {}  # shard -> (node, create revision)
        self.token_base = 0
        self.drain: set[str] = set()
        self.throttles: dict[str, float] = {}
        self.suspended: set[str] = set()
        self.rebalance = False


class EtcdCoordinator:
    """The Coordinator of a node in an etcd-coordinated cluster."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.node_id = cfg.node.id
        self.total_shards = cfg.spool.shards
        self.ttl = cfg.cluster.lease_ttl
        # Fence well before etcd could give our keys away: at TTL minus a margin.
        self.fence_after = max(self.ttl * 0.6, self.ttl - max(1.0, self.ttl / 4))
        self.prefix = f"/mta/{cfg.cluster.name}/"
        self._endpoints = [tuple(e.rsplit(":", 1)) for e in cfg.cluster.etcd]
        self._endpoint = 0
        self._client: aetcd.Client | None = None
        self._closing_clients: set[asyncio.Task[None]] = set()
        self._lease: Any = None
        # Monotonic time at which the last successful refresh (or grant) of the lease was
        # sent, and the fence deadline that follows from it.
        self._last_refresh = 0.0
        self._fence_deadline = 0.0
        self._fence_timer: asyncio.TimerHandle | None = None
        self._host: ShardHost | None = None
        self._owned: dict[int, int] = {}  # shard -> fencing token
        # shard -> create revision of our owner key: the token is token_base + this, so the
        # token changes exactly when the key does (only through a release and a new claim).
        self._claims: dict[int, int] = {}
        self._view = _View()
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

    # --- etcd connection with endpoint rotation --------------------------------------------

    def _key(self, *parts: object) -> bytes:
        return (self.prefix + "/".join(str(p) for p in parts)).encode()

    async def _connect(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        host, port = self._endpoints[self._endpoint % len(self._endpoints)]
        client = aetcd.Client(host=host, port=int(port), timeout=max(1, int(self.ttl / 3)))
        self._client = client
        return client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._endpoint += 1  # try the next endpoint next time
        if client is not None:
            # Closing a gRPC channel to a dead peer can hang: never make the caller (the
            # keepalive loop, above all) wait for it.
            task = asyncio.create_task(self._close_quietly(client))
            self._closing_clients.add(task)
            task.add_done_callback(self._closing_clients.discard)

    @staticmethod
    async def _close_quietly(client: aetcd.Client) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 2.0)

    def _call_timeout(self) -> float:
        """Up to TTL/3, and never past the fence deadline while we hold a lease: a call that
        hangs must not outlive the moment the lease stops being provably ours."""
        base = max(0.5, self.ttl / 3)
        if self._fenced or self._lease is None:
            return base
        return min(base, self._fence_deadline - time.monotonic())

    async def _call(self, fn: Callable[[aetcd.Client], Any],
                    timeout: float | None = None) -> Any:
        timeout = self._call_timeout() if timeout is None else timeout
        if timeout <= 0:
            raise _EtcdDown("fence deadline passed")  # the fence timer is about to fire
        client = await self._connect()
        # A hard deadline: wait_for() would wait for a cancelled gRPC call to unwind, and a
        # wedged channel may never do so. Abandon the call instead (cancelled, not awaited).
        call = asyncio.ensure_future(fn(client))
        try:
            done, _ = await asyncio.wait({call}, timeout=timeout)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if not done:
            call.cancel()
            call.add_done_callback(_retrieve)
            await self._drop_client()
            raise _EtcdDown("etcd call timed out")
        try:
            return call.result()
        except (asyncio.CancelledError, Exception) as exc:
            # We were not cancelled (the wait above returned), so a CancelledError here is
            # the gRPC call's own (its channel closed under it): etcd trouble, not shutdown.
            # Re-raising it would silently end the calling loop, and leave a fenced node
            # fenced for good.
            # aetcd lets raw gRPC errors and plain Exceptions through besides its ClientError
            # family: whatever it is, etcd did not answer usefully. Never let it escape into a
            # background loop (a dead keepalive task would leave the node fenced for good).
            await self._drop_client()
            raise _EtcdDown(str(exc) or type(exc).__name__) from None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, host: ShardHost) -> None:
        self._host = host
        deadline = time.monotonic() + max(10.0, self.ttl * 3)
        while True:
            try:
                # Before joining: a node with another count must never be assigned a shard.
                await self._agree_shard_count()
                await self._join()
                break
            except _EtcdDown as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot reach etcd at {self.cfg.cluster.etcd}: {exc}"
                                       ) from None
                self._lease = None  # a grant whose registration failed: left to expire
                await asyncio.sleep(0.5)
        # Armed once joined: a fence while still retrying the join would fence a host that
        # has nothing yet. If the join was slow enough, it fires at once (and we rejoin).
        self._arm_fence_timer()
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")
        self._tasks = [self._keepalive_task,
                       asyncio.create_task(self._reconcile_loop(), name="etcd-reconcile"),
                       asyncio.create_task(self._watch_loop(), name="etcd-watch")]
        # Serve once the first assignment including us (if any) has been acted on.
        for _ in range(int(self.ttl * 20)):
            if self._view.assign and all(
                    s in self._owned for s, n in self._view.assign.items() if n == self.node_id
                    and self._view.owner.get(s, (self.node_id, 0))[0] == self.node_id):
                break
            await asyncio.sleep(0.05)

    async def _agree_shard_count(self) -> None:
        """Record the cluster's shard count (first node, create-revision-0 txn) or check ours
        against it; raises :class:`ShardCountMismatch`. A cluster from before the key gets
        our count, unless the leader has assigned a shard that count would leave out."""
        key = self._key("shards")
        where = (f"cluster {self.cfg.cluster.name!r} (etcd key {key.decode()}; delete it "
                 "only if the whole cluster and its spool are new)")
        kv = await self._call(lambda c: c.get(key))
        if kv is None:
            assigned = await self._call(lambda c: c.get_prefix(self._key("assign", "")))
            top = max((int(n) for a in assigned if (n := a.key.rpartition(b"/")[2]).isdigit()),
                      default=-1)
            if top >= self.total_shards:
                raise ShardCountMismatch(self.total_shards, top + 1,
                                         f"cluster {self.cfg.cluster.name!r} (it assigns "
                                         f"shard {top})", at_least=True)
            mine = str(self.total_shards).encode()
            ok, _ = await self._call(lambda c: c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, mine)], failure=[]))
            if ok:
                log.info("cluster.shards_recorded", node_id=self.node_id,
                         shards=self.total_shards)
                return
            kv = await self._call(lambda c: c.get(key))  # another node was first
        recorded = int(kv.value) if kv is not None and kv.value.isdigit() else 0
        if recorded != self.total_shards:
            raise ShardCountMismatch(self.total_shards, recorded, where)

    async def _join(self) -> None:
        sent = time.monotonic()  # etcd starts the TTL when it grants, after this
        self._lease = await self._call(lambda c: c.lease(int(max(1, round(self.ttl)))))
        self._refreshed(sent, arm=False)
        await self._register()

    async def _register(self) -> None:
        assert self._host is not None
        ends = self._host.endpoints()
        info = msgpack.packb({"addr": ends.get("smtp", ""), "admin": ends.get("admin", ""),
                              "version": mta.__version__, "started": self.started,
                              "pid": os.getpid(), "weight": 1.0})
        lease = self._lease
        await self._call(lambda c: c.put(self._key("nodes", self.node_id), info, lease=lease))

    async def stop(self) -> None:
        """Hand every shard over at once: release locally, then revoke the lease so the
        leader reassigns without waiting for the TTL."""
        if self._stopped:
            return
        self._stopped = True
        # From here on no acquisition starts: a stopping node must not take over the shards
        # its stopping peers give back (it would only have to hand them on again).
        self._stopping = True
        loops = [t for t in self._tasks if t is not self._keepalive_task]
        await _cancel_all(loops, self.node_id)
        # The keepalive keeps running while we release: the lease must outlive the releases
        # (or the timer fences us). Claims in flight stop at their next step; whatever they
        # got is released with the rest.
        deadline = time.monotonic() + _RELEASE_DEADLINE
        await _wait_all(list(self._acquiring.values()), deadline)
        released = await self._release_all(delete_key=True, deadline=deadline)
        if self._keepalive_task is not None:
            await _cancel_all([self._keepalive_task], self.node_id)
        if not released and self._host is not None:
            # Revoking hands the shards to peers at once: nothing may write them after that.
            self._fence_now("stopping with releases still running")
        if self._lease is not None:
            lease = self._lease
            with contextlib.suppress(_EtcdDown):
                await self._call(lambda c: c.revoke_lease(lease.id), timeout=self.ttl / 3)
        self._cancel_fence_timer()
        await self._drop_client()

    # --- Coordinator protocol --------------------------------------------------------------

    def owned_shards(self) -> frozenset[int]:
        return frozenset(self._owned)

    def rate_share(self) -> float:
        return max(len(self._owned), 1) / self.total_shards

    @property
    def healthy(self) -> bool:
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
        return v.revision <= revision or v.owner.get(shard) == (self.node_id, revision)

    @property
    def is_leader(self) -> bool:
        return self._view.leader == self.node_id and not self._fenced

    def runtime(self) -> RuntimeSettings:
        return self._runtime

    def watch_runtime(self, callback: Callable[[RuntimeSettings], None]) -> None:
        self._watchers.append(callback)

    async def change_runtime(self, throttles: dict[str, float | None] | None = None,
                             suspended: dict[str, bool] | None = None) -> RuntimeSettings:
        """One key per change under config/, so changes to other keys are never undone."""
        try:
            for key, rate in (throttles or {}).items():
                k = self._key("config", "throttle", key)
                if rate is None:
                    await self._call(lambda c, k=k: c.delete(k))
                else:
                    await self._call(lambda c, k=k, r=rate: c.put(k, f"{r * 3600:g}/h".encode()))
            for domain, hold in (suspended or {}).items():
                k = self._key("config", "suspend", domain)
                await self._call(lambda c, k=k, h=hold: c.put(k, b"1") if h else c.delete(k))
        except _EtcdDown as exc:
            raise ClusterOpError(f"etcd write failed: {exc}", "retry", 503) from None
        await self._fresh()
        return self._runtime

    async def _fresh(self) -> _View:
        try:
            await self._read()
        except _EtcdDown as exc:
            raise ClusterOpError(f"etcd not reachable from {self.node_id}: {exc}",
                                 "check the etcd cluster (etcdctl endpoint health)", 503
                                 ) from None
        return self._view

    async def members(self) -> list[Member]:
        v = await self._fresh()
        owned: dict[str, int] = {}
        for node, _rev in v.owner.values():
            owned[node] = owned.get(node, 0) + 1
        return [Member(node, str(info.get("addr", "")), str(info.get("admin", "")),
                       v.leader == node, node in v.drain, owned.get(node, 0),
                       str(info.get("version", "")), float(info.get("started", 0.0)))
                for node, info in sorted(v.nodes.items())]

    async def shards(self) -> list[ShardInfo]:
        v = await self._fresh()

        def token(s: int) -> int:
            # Ours exactly; a peer's as claimed unless the base was raised since.
            node, rev = v.owner.get(s, (None, 0))
            return self._owned.get(s, v.token_base + rev if node else 0)

        return [ShardInfo(s, v.assign.get(s), v.owner.get(s, (None, 0))[0], token(s))
                for s in range(self.total_shards)]

    async def set_draining(self, node: str, draining: bool) -> None:
        """Mark ``node`` drained (its shards move away) or back in service."""
        v = await self._fresh()
        if draining and node not in v.nodes:
            raise ClusterOpError(f"no live node {node!r} in cluster {self.cfg.cluster.name!r}",
                                 "`mtactl nodes` lists the live nodes", 404)
        if draining and not (set(v.nodes) - v.drain - {node}):
            raise ClusterOpError(f"refusing to drain {node}: no other node would be left to "
                                 "own the shards", "start another node first, or undrain one")
        try:
            if draining:
                await self._call(lambda c: c.put(self._key("drain", node), b"1"))
            else:
                await self._call(lambda c: c.delete(self._key("drain", node)))
        except _EtcdDown as exc:
            raise ClusterOpError(f"etcd write failed: {exc}", "retry", 503) from None
        self._kick.set()

    async def rebalance(self, timeout: float) -> dict[str, object]:
        """Ask the leader (through the ``rebalance`` key) to recompute the assignment, then
        wait until every shard is owned by the node it is assigned to."""
        before = dict((await self._fresh()).assign)
        try:
            await self._call(lambda c: c.put(self._key("rebalance"), self.node_id.encode()))
        except _EtcdDown as exc:
            raise ClusterOpError(f"etcd write failed: {exc}", "retry", 503) from None
        self._kick.set()
        start = time.monotonic()
        converged = False
        while True:
            v = await self._fresh()
            converged = (not v.rebalance and len(v.assign) == self.total_shards
                         and all(v.owner.get(s, ("", 0))[0] == n for s, n in v.assign.items()))
            if converged or time.monotonic() - start > timeout:
                break
            await asyncio.sleep(0.2)
        per_node: dict[str, int] = {}
        for node, _rev in v.owner.values():
            per_node[node] = per_node.get(node, 0) + 1
        return {"moved": sum(1 for s, n in v.assign.items() if before.get(s) != n),
                "converged": converged, "seconds": round(time.monotonic() - start, 2),
                "per_node": dict(sorted(per_node.items())), "leader": v.leader,
                "unowned": self.total_shards - len(v.owner)}

    # --- keepalive and self-fencing --------------------------------------------------------

    async def _keepalive(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(min(interval, 0.5) if self._fenced else interval / 2)
            try:
                await self._keepalive_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the loop that lets us rejoin
                log.exception("cluster.keepalive_error", node_id=self.node_id)

    async def _keepalive_step(self) -> None:
        """Refresh the lease, or rejoin when fenced. Fencing is the timer's job, not this
        loop's: a call here may take until the deadline, and the timer fires regardless."""
        if self._fenced:
            try:
                await self._rejoin()
            except _EtcdDown as exc:
                log.info("cluster.rejoin_failed", node_id=self.node_id, error=str(exc)[:200])
            return
        lease = self._lease
        # The TTL restarts when etcd processes the refresh, which is after we send it: the
        # send time is the latest moment the new expiry is provably after.
        sent = time.monotonic()
        try:
            resp = await self._call(lambda c, lease_id=lease.id: c.refresh_lease(lease_id))
        except _EtcdDown as exc:
            log.debug("cluster.refresh_failed", node_id=self.node_id, error=str(exc)[:200],
                      fence_in=round(self._fence_deadline - time.monotonic(), 3))
            return
        if self._fenced or lease is not self._lease:
            return  # the answer came after the fence: too late, we rejoin instead
        if resp is None:
            return  # the stream ended without an answer: not a refresh
        if resp.TTL <= 0:
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
        """etcd answers again: drop every shard locally (others may own them by now), take a
        new lease, and let the reconcile loop acquire afresh with new fencing tokens."""
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
        lease = await self._call(lambda c: c.lease(int(max(1, round(self.ttl)))))
        log.info("cluster.rejoining", node_id=self.node_id)
        # Our keys under the old lease (if it still lives) are left to expire: revoking it
        # would drop nodes/<us> too and have the leader move our shards away and back.
        self._lease = lease
        self._refreshed(sent)
        await self._register()
        if time.monotonic() >= self._fence_deadline or self._stopping:
            return  # too slow to trust: the next step starts over
        self._fenced = False
        self._host.unfence()
        log.info("cluster.rejoined", node_id=self.node_id)
        self._kick.set()

    # --- view ------------------------------------------------------------------------------

    async def _read(self) -> None:
        rng = await self._call(lambda c: c.get_prefix(self.prefix.encode()))
        v = _View()
        v.revision = rng.header.revision if hasattr(rng, "header") else 0
        plen = len(self.prefix)
        for kv in rng:
            key = kv.key.decode()[plen:]
            kind, _, rest = key.partition("/")
            try:
                if kind == "nodes":
                    v.nodes[rest] = msgpack.unpackb(kv.value)
                elif key == "leader":
                    v.leader = kv.value.decode()
                elif kind == "assign":
                    v.assign[int(rest)] = kv.value.decode()
                elif kind == "owner":
                    v.owner[int(rest)] = (kv.value.decode(), kv.create_revision)
                elif kind == "drain":
                    v.drain.add(rest)
                elif key == "rebalance":
                    v.rebalance = True
                elif key == "token_base":
                    v.token_base = int(kv.value)
                elif key.startswith("config/throttle/"):
                    v.throttles[key[len("config/throttle/"):]] = parse_rate(kv.value.decode())
                elif key.startswith("config/suspend/"):
                    v.suspended.add(key[len("config/suspend/"):])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("cluster.bad_key", node_id=self.node_id, key=key, error=str(exc))
        self._view = v
        runtime = RuntimeSettings(v.throttles, frozenset(v.suspended))
        if runtime != self._runtime:
            self._runtime = runtime
            for callback in self._watchers:
                callback(runtime)

    async def _watch_loop(self) -> None:
        # Only a trigger: any change under the prefix wakes the reconcile loop at once.
        while True:
            try:
                client = await self._connect()
                start = self._view.revision + 1 if self._view.revision else None
                watch = await client.watch_prefix(self.prefix.encode(), start_revision=start)
                async for _event in watch:
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
                except _EtcdDown as exc:
                    log.debug("cluster.reconcile_failed", node_id=self.node_id, error=str(exc))
                except Exception:
                    log.exception("cluster.reconcile_error", node_id=self.node_id)
            # Not wait_for(): on 3.11 it can swallow our cancellation when the kick comes at
            # the same moment, and stop() would then wait for this loop for ever.
            kicked = asyncio.ensure_future(self._kick.wait())
            try:
                await asyncio.wait({kicked}, timeout=self.ttl / 3)
            finally:
                kicked.cancel()

    async def _reconcile(self) -> None:
        await self._read()
        v = self._view
        if v.leader is None:
            await self._elect()
            await self._read()
            v = self._view
        if v.leader == self.node_id:
            rebalance = v.rebalance
            # Until the assignment fits the view we act on: the read after writing it may
            # show a node gone meanwhile, and claiming a shard by the assignment made before
            # would mean handing it on at once (behind that shard's release).
            for _ in range(3):
                if not await self._lead():
                    break
                await self._read()
                v = self._view
                if v.leader != self.node_id:
                    break
            if rebalance:
                await self._call(lambda c: c.delete(self._key("rebalance")))
        if self._stopping or self._fenced:
            return
        # An assignment naming a node that is gone is about to be redone by the leader: claim
        # nothing by it yet (the leader's write wakes us up again at once).
        current = all(n in v.nodes for n in v.assign.values())
        # Neither claims nor releases are awaited here: a release waits for in-flight
        # deliveries (seconds), and a dead node's shards must not wait behind it. Claims are
        # started first; a shard being released (busy) is not claimed until its release ends.
        for shard, node in sorted(v.assign.items()):
            if (current and node == self.node_id and shard not in self._owned
                    and shard not in self._busy and shard not in v.owner):
                self._spawn(shard, self._acquire(shard), self._acquiring)
        for shard in sorted(self._owned):
            if shard in self._busy:
                continue
            if v.assign.get(shard) != self.node_id:
                self._spawn(shard, self._release(shard, delete_key=True), self._releasing)
            elif (v.revision > self._claims.get(shard, 0)
                  and v.owner.get(shard) != (self.node_id, self._claims.get(shard))):
                # Our owner key vanished or was replaced (lease lost and regained, deleted
                # by hand) in a view newer than our claim: we must stop.
                self._spawn(shard, self._release(shard, delete_key=False), self._releasing)
        for shard, (node, revision) in sorted(v.owner.items()):
            if node == self.node_id and shard not in self._owned and shard not in self._busy:
                # A key of ours for a shard we do not hold open (left by a release that could
                # not reach etcd, or by our previous lease): remove it so the shard can be
                # taken properly, by us or by the node it is assigned to now.
                await self._delete_owner_key(shard, revision)

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
        lease = self._lease
        key = self._key("leader")
        ok, _ = await self._call(lambda c: c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, self.node_id.encode(), lease=lease)],
            failure=[]))
        if ok:
            log.info("cluster.elected_leader", node_id=self.node_id)

    async def _lead(self) -> bool:
        """Write the assignment the view calls for; True if it differed from the view's."""
        v = self._view
        live = {n: float(info.get("weight", 1.0)) for n, info in v.nodes.items()
                if n not in v.drain}
        desired = assign(self.total_shards, live)
        changes = {s: n for s, n in desired.items() if v.assign.get(s) != n}
        if not changes:
            return False
        leader_key = self._key("leader")
        me = self.node_id.encode()
        ok, _ = await self._call(lambda c: c.transaction(
            compare=[c.transactions.value(leader_key) == me],
            success=[c.transactions.put(self._key("assign", s), n.encode())
                     for s, n in changes.items()],
            failure=[]))
        if ok:
            log.info("cluster.assigned", node_id=self.node_id, moved=len(changes),
                     nodes=sorted(live))
        return True

    async def _delete_owner_key(self, shard: int, revision: int | None = None) -> None:
        """Delete our owner key of ``shard`` (only the one created at ``revision``, if given)."""
        key = self._key("owner", shard)
        me = self.node_id.encode()

        def compare(c: aetcd.Client) -> list[Any]:
            same = [c.transactions.value(key) == me]
            if revision is not None:
                same.append(c.transactions.create(key) == revision)
            return same

        with contextlib.suppress(_EtcdDown):
            await self._call(lambda c: c.transaction(
                compare=compare(c), success=[c.transactions.delete(key)], failure=[]))

    def _may_claim(self) -> bool:
        return not self._stopping and not self._claims_closed and not self._fenced

    def stop_claiming(self) -> None:
        self._claims_closed = True

    async def _acquire(self, shard: int) -> bool:
        """Claim ``shard`` (a background task; the caller marked it busy). Gives up at any
        step once the node stops or is fenced: a stopping node claims nothing."""
        async with self._acquire_slots:
            if not self._may_claim():
                return False
            try:
                return await self._claim(shard)
            except _EtcdDown as exc:
                log.debug("cluster.acquire_failed", shard=shard, node_id=self.node_id,
                          error=str(exc)[:200])
                return False
            except Exception:  # a bug must not pass silently in a background task
                log.exception("cluster.acquire_error", shard=shard, node_id=self.node_id)
                return False

    async def _claim(self, shard: int) -> bool:
        key = self._key("owner", shard)
        lease = self._lease
        ok, _ = await self._call(lambda c: c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, self.node_id.encode(), lease=lease)],
            failure=[]))
        if not ok:
            return False
        kv = await self._call(lambda c: c.get(key))
        if kv is None or kv.value.decode() != self.node_id:
            return False
        revision = kv.create_revision
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
            await self._host.acquire_shard(shard, token)
        except Exception as exc:
            log.error("cluster.acquire_failed", shard=shard, node_id=self.node_id,
                      error=str(exc))
            await self._delete_owner_key(shard, revision)
            return False
        # Held from here, even if stop() began meanwhile: stop() waits for this claim and
        # releases the shard with the rest.
        self._owned[shard] = token
        self._claims[shard] = revision
        log.info("cluster.shard_acquired", shard=shard, node_id=self.node_id, token=token)
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
        owner = self._key("owner", shard)
        key = self._key("token_base")
        me = self.node_id.encode()

        def ours(c: aetcd.Client) -> list[Any]:
            return [c.transactions.create(owner) == revision, c.transactions.value(owner) == me]

        while True:
            ok, found = await self._call(lambda c: c.transaction(
                compare=ours(c), success=[c.transactions.get(key)], failure=[]))
            if not ok:
                return None
            entry = found[0][0] if found and found[0] else None
            base = int(entry[0]) if entry is not None else 0
            if base + revision > recorded:
                return base + revision
            need = recorded - revision + 1
            expect = entry[1].mod_revision if entry is not None else 0

            def raise_base(c: aetcd.Client, need: int = need, expect: int = expect) -> Any:
                return c.transaction(
                    compare=[*ours(c), c.transactions.mod(key) == expect],
                    success=[c.transactions.put(key, str(need).encode())], failure=[])

            ok, _ = await self._call(raise_base)
            if ok:
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
        except Exception:
            # Still held as far as we know: the next reconcile tries again.
            log.exception("cluster.release_failed", shard=shard, node_id=self.node_id)
            return
        self._owned.pop(shard, None)
        self._claims.pop(shard, None)
        if delete_key:
            # Only after the host let go: before that, the next owner could write beside us.
            await self._delete_owner_key(shard, revision)
        log.info("cluster.shard_released", shard=shard, node_id=self.node_id)


async def _cancel_all(tasks: list[asyncio.Task[None]], node_id: str, grace: float = 5.0) -> None:
    """Cancel background loops and wait (bounded) until they end; their outcome is theirs.
    asyncio.wait() lets our own cancellation through, unlike awaiting under suppress()."""
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            log.warning("cluster.task_stuck", node_id=node_id, task=task.get_name())


async def _wait_all(tasks: list[asyncio.Task[Any]], deadline: float) -> bool:
    """Wait (without cancelling them) until every task ended or ``deadline``; True if all
    ended."""
    if not tasks:
        return True
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    return not pending


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume an abandoned call's outcome so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


class _EtcdDown(Exception):
    """etcd did not answer (or refused); callers retry or fence."""
