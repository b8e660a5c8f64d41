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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
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
        self._last_refresh = 0.0
        self._host: ShardHost | None = None
        self._owned: dict[int, int] = {}  # shard -> fencing token
        self._view = _View()
        self._tasks: list[asyncio.Task[None]] = []
        self._kick = asyncio.Event()
        self._fenced = False
        self._stopping = False
        self._runtime = RuntimeSettings()
        self._watchers: list[Callable[[RuntimeSettings], None]] = []
        self._busy: set[int] = set()  # shards being acquired or released right now
        self.started = time.time()

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

    async def _call(self, fn: Callable[[aetcd.Client], Any]) -> Any:
        client = await self._connect()
        # A hard deadline: wait_for() would wait for a cancelled gRPC call to unwind, and a
        # wedged channel may never do so. Abandon the call instead (cancelled, not awaited).
        call = asyncio.ensure_future(fn(client))
        try:
            done, _ = await asyncio.wait({call}, timeout=max(1.0, self.ttl / 3))
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
                await asyncio.sleep(0.5)
        self._tasks = [asyncio.create_task(self._keepalive(), name="etcd-keepalive"),
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
        self._lease = await self._call(lambda c: c.lease(int(max(1, round(self.ttl)))))
        self._last_refresh = time.monotonic()
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
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for shard in sorted(self._owned):
            await self._release(shard, delete_key=True)
        if self._lease is not None:
            lease = self._lease
            with contextlib.suppress(_EtcdDown):
                await self._call(lambda c: c.revoke_lease(lease.id))
        await self._drop_client()

    # --- Coordinator protocol --------------------------------------------------------------

    def owned_shards(self) -> frozenset[int]:
        return frozenset(self._owned)

    def rate_share(self) -> float:
        return max(len(self._owned), 1) / self.total_shards

    @property
    def healthy(self) -> bool:
        return not self._fenced

    def may_send(self, shard: int) -> bool:
        return not self._fenced and shard in self.owned_shards()

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
        """Refresh the lease (or rejoin when fenced); fence once refreshes are overdue."""
        try:
            if self._fenced:
                await self._rejoin()
                return
            lease = self._lease
            resp = await self._call(lambda c, lease_id=lease.id: c.refresh_lease(lease_id))
            if getattr(resp, "TTL", 1) <= 0:
                raise _EtcdDown("lease expired")
            self._last_refresh = time.monotonic()
        except _EtcdDown as exc:
            if self._fenced:
                log.info("cluster.rejoin_failed", node_id=self.node_id, error=str(exc)[:200])
            elif time.monotonic() - self._last_refresh >= self.fence_after:
                await self._fence(f"lease not refreshed for {self.fence_after:.1f}s: {exc}")
        if not self._fenced and time.monotonic() - self._last_refresh >= self.fence_after:
            await self._fence("lease refresh overdue")

    async def _fence(self, reason: str) -> None:
        if self._fenced:
            return
        self._fenced = True
        assert self._host is not None
        self._host.fence(reason)
        log.warning("cluster.fenced", node_id=self.node_id, reason=reason,
                    shards=len(self._owned))

    async def _rejoin(self) -> None:
        """etcd answers again: drop every shard locally (others may own them by now), take a
        new lease, and let the reconcile loop acquire afresh with new fencing tokens."""
        lease = await self._call(lambda c: c.lease(int(max(1, round(self.ttl)))))
        log.info("cluster.rejoining", node_id=self.node_id, shards=len(self._owned))
        assert self._host is not None
        for shard in sorted(self._owned):
            await self._release(shard, delete_key=False)
        self._lease = lease
        self._last_refresh = time.monotonic()
        await self._register()
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
                log.warning("cluster.bad_key", key=key, error=str(exc))
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
        while True:
            self._kick.clear()
            if not self._fenced:
                try:
                    await self._reconcile()
                except _EtcdDown as exc:
                    log.debug("cluster.reconcile_failed", error=str(exc))
                except Exception:
                    log.exception("cluster.reconcile_error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.ttl / 3)

    async def _reconcile(self) -> None:
        await self._read()
        v = self._view
        if v.leader is None:
            await self._elect()
            await self._read()
            v = self._view
        if v.leader == self.node_id:
            await self._lead()
            if v.rebalance:
                await self._call(lambda c: c.delete(self._key("rebalance")))
            await self._read()
            v = self._view
        # Release what is assigned elsewhere, then take what is ours and free.
        for shard in sorted(self._owned):
            if v.assign.get(shard) != self.node_id and shard not in self._busy:
                await self._release(shard, delete_key=True)
        acquired = set()
        for shard, node in sorted(v.assign.items()):
            if node != self.node_id or shard in self._owned or shard in self._busy:
                continue
            holder = v.owner.get(shard)
            if holder is None:
                if await self._acquire(shard):
                    acquired.add(shard)
            elif holder[0] == self.node_id:
                # A key of ours for a shard we do not hold open (left by a release that
                # could not reach etcd): remove it so the shard can be taken properly.
                await self._delete_owner_key(shard)
        # Our owner key vanished (lease lost and regained, or deleted by hand): we must stop.
        for shard in sorted(self._owned):
            if shard in acquired or shard in self._busy:
                continue
            if v.owner.get(shard, ("", 0))[0] != self.node_id:
                await self._release(shard, delete_key=False)

    async def _elect(self) -> None:
        lease = self._lease
        key = self._key("leader")
        ok, _ = await self._call(lambda c: c.transaction(
            compare=[c.transactions.create(key) == 0],
            success=[c.transactions.put(key, self.node_id.encode(), lease=lease)],
            failure=[]))
        if ok:
            log.info("cluster.elected_leader", node_id=self.node_id)

    async def _lead(self) -> None:
        v = self._view
        live = {n: float(info.get("weight", 1.0)) for n, info in v.nodes.items()
                if n not in v.drain}
        desired = assign(self.total_shards, live)
        changes = {s: n for s, n in desired.items() if v.assign.get(s) != n}
        if not changes:
            return
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

    async def _delete_owner_key(self, shard: int) -> None:
        key = self._key("owner", shard)
        me = self.node_id.encode()
        with contextlib.suppress(_EtcdDown):
            await self._call(lambda c: c.transaction(
                compare=[c.transactions.value(key) == me],
                success=[c.transactions.delete(key)], failure=[]))

    async def _acquire(self, shard: int) -> bool:
        key = self._key("owner", shard)
        lease = self._lease
        self._busy.add(shard)
        try:
            ok, _ = await self._call(lambda c: c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, self.node_id.encode(), lease=lease)],
                failure=[]))
            if not ok:
                return False
            kv = await self._call(lambda c: c.get(key))
            if kv is None or kv.value.decode() != self.node_id:
                return False
            assert self._host is not None
            try:
                token = await self._fencing_token(shard, kv.create_revision)
                if token is None:
                    # Our key went (lease lost while we stalled): someone newer may hold it.
                    log.warning("cluster.claim_lost", shard=shard, node_id=self.node_id)
                    return False
                await self._host.acquire_shard(shard, token)
            except Exception as exc:
                log.error("cluster.acquire_failed", shard=shard, node_id=self.node_id,
                          error=str(exc))
                await self._delete_owner_key(shard)
                return False
            self._owned[shard] = token
            log.info("cluster.shard_acquired", shard=shard, node_id=self.node_id, token=token)
            return True
        finally:
            self._busy.discard(shard)

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

    async def _release(self, shard: int, *, delete_key: bool) -> None:
        self._busy.add(shard)
        try:
            assert self._host is not None
            await self._host.release_shard(shard)
            self._owned.pop(shard, None)
            if delete_key:
                await self._delete_owner_key(shard)
            log.info("cluster.shard_released", shard=shard, node_id=self.node_id)
        finally:
            self._busy.discard(shard)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume an abandoned call's outcome so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


class _EtcdDown(Exception):
    """etcd did not answer (or refused); callers retry or fence."""
