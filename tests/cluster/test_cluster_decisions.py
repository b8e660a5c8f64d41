"""The coordinator's decisions on the in-memory store: races and failures in seconds.

Each test sets up a moment that is hard to hit on a real etcd (a lease lost in the middle of a
reconcile, two nodes claiming one shard, a drain while a leader is elected, ...) with hooks
that run inside a store call, and checks the rule the decision exists for. The store is
:class:`cluster.memstore.MemStore` (etcd's revision, lease and compare semantics); the real-
etcd tests (test_fencing_cluster.py, test_cluster.py) stay the ground truth for etcd itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.coordinator import ClusterCoordinator
from cluster.keys import Keys
from cluster.memstore import MemEtcd, MemStore
from cluster.store import (
    Compare,
    Get,
    LeaseLeft,
    Put,
    StoreDown,
    Timing,
    Txn,
)
from mta.coordinator import ClusterOpError
from mta.spool.layout import ShardCountMismatch
from tests.support import wait_until as until
from tests.support.memcluster import MemCluster, mem

TTL = 3.0  # fence_after 2 s: a loop stall under CPU load does not fence by accident
SHARDS = 8
NAME = "decisions"
# Elections that wait out a lease run on uvloop only (the loop a node picks when it is
# installed): the decision under test is the same on either loop, and the timing tests
# (fence deadlines, hung refreshes) and the fast ones here still run on both.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


class Host:
    """A ShardHost that records what it was asked to do, and when."""

    def __init__(self, recorded: int = 0, release_delay: float = 0.0) -> None:
        self.recorded = recorded
        self.release_delay = release_delay
        self.owned: dict[int, int] = {}  # shard -> token
        self.fenced = False
        self.events: list[tuple[float, str, int]] = []  # (monotonic, kind, shard)
        self.tokens: dict[int, list[int]] = {}  # every token each shard was acquired with
        self.on_fence: Callable[[], None] | None = None

    async def acquire_shard(self, shard: int, token: int) -> None:
        self.events.append((time.monotonic(), "acquire", shard))
        self.owned[shard] = token
        self.tokens.setdefault(shard, []).append(token)

    async def release_shard(self, shard: int) -> None:
        self.events.append((time.monotonic(), "release_start", shard))
        await asyncio.sleep(self.release_delay)
        self.owned.pop(shard, None)
        self.events.append((time.monotonic(), "release", shard))

    async def recorded_token(self, shard: int) -> int:
        return self.recorded

    def fence(self, reason: str) -> None:
        self.events.append((time.monotonic(), "fence", -1))
        self.fenced = True
        if self.on_fence is not None:
            self.on_fence()

    def unfence(self) -> None:
        self.events.append((time.monotonic(), "unfence", -1))
        self.fenced = False

    def endpoints(self) -> dict[str, str]:
        return {"smtp": "127.0.0.1:25", "admin": ""}

    def kinds(self, kind: str) -> list[tuple[float, int]]:
        return [(t, s) for t, k, s in self.events if k == kind]


def serving(c: ClusterCoordinator, host: Host, shards: set[int]) -> Callable[[], bool]:
    return lambda: set(host.owned) == shards and all(c.may_send(s) for s in shards)


class World(MemCluster):
    """One in-memory etcd and the coordinators on it; all stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, NAME, shards=SHARDS, ttl=TTL)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    await w.close()


def is_elect(txn: Txn, keys: Keys) -> bool:
    return any(c.key == keys.leader and c.target == "create" for c in txn.compare)


def reads_token_base(txn: Txn, keys: Keys) -> bool:
    return any(isinstance(op, Get) and op.key == keys.token_base for op in txn.success)


async def test_lease_lost_mid_reconcile_stops_sending_then_reclaims_with_newer_tokens(
        world: World) -> None:
    host = Host()
    c = world.coordinator("n1")
    await c.start(host)
    everything = set(range(SHARDS))
    await until(serving(c, host, everything), 5, "n1 serving every shard")
    before = dict(host.owned)
    store = mem(c)
    answered = asyncio.Event()  # refreshes wait for this: the lease loss is seen by a read
    seen_mid_reconcile: list[bool] = []

    async def lose_lease(_: Any) -> None:
        # Inside the reconcile's read: the lease expires (a stall, as on a loaded machine).
        store.hooks.pop("snapshot")
        assert c._lease is not None
        world.etcd.drop_lease(c._lease)

    async def check_during_election(txn: Txn) -> None:
        if is_elect(txn, world.keys):
            # The read showed no owner key of ours: nothing may be sent from here on.
            seen_mid_reconcile.append(any(c.may_send(s) for s in everything))
            answered.set()

    async def held_refresh(_: Any) -> None:
        await answered.wait()

    store.hooks.update(snapshot=lose_lease, commit=check_during_election, refresh=held_refresh)
    c._kick.set()
    await until(lambda: bool(seen_mid_reconcile), 5, "the election after the lease loss")
    # (The election fails on the dead lease; the next reconcile tries again, as often.)
    assert not any(seen_mid_reconcile), "may_send said yes with its owner key gone"
    store.hooks.clear()
    await until(lambda: host.fenced, 5, "the fence (etcd reports the lease gone)")
    await until(lambda: not host.fenced, 5, "the rejoin")
    await until(serving(c, host, everything), 5, "n1 serving every shard again")
    fenced_at = host.kinds("fence")[0][0]
    for shard in everything:
        released = [t for t, s in host.kinds("release") if s == shard and t > fenced_at]
        acquired = [t for t, s in host.kinds("acquire") if s == shard and t > fenced_at]
        assert released and acquired and released[0] < acquired[0], host.events
        assert host.owned[shard] > before[shard]


async def test_of_two_nodes_claiming_one_shard_only_the_live_owner_gets_a_token(
        world: World) -> None:
    a, b = world.coordinator("a"), world.coordinator("b")
    ha, hb = Host(recorded=0), Host(recorded=10**12)
    for c, h in ((a, ha), (b, hb)):
        c._host = h
        await c._join()
    # At once: the owner key's create compare lets exactly one win.
    won = await asyncio.gather(a._claim(5), b._claim(5))
    assert sorted(won) == [False, True], won
    winner = a if won[0] else b
    assert world.owners() == {5: winner.node_id}
    assert set((ha if winner is a else hb).owned) == {5}
    assert not (hb if winner is a else ha).owned
    await winner._release(5, delete_key=True)
    assert world.owners() == {}

    # a wins the key, then stalls before reading the token base; its lease expires, b claims
    # (raising the base for its spool). a must get no token: it would outbid b's on disk.
    async def stall_a(txn: Txn) -> None:
        if reads_token_base(txn, world.keys):
            mem(a).hooks.clear()
            assert a._lease is not None
            world.etcd.drop_lease(a._lease)
            assert await b._claim(5)

    mem(a).hooks["commit"] = stall_a
    assert not await a._claim(5)
    assert 5 not in a._owned
    assert hb.owned[5] > 10**12
    assert world.owners() == {5: "b"}
    assert world.snapshot().token(5) == hb.owned[5]
    assert ha.owned == {}, "the stale claim reached the host"


@ONE_LOOP
async def test_a_drain_set_during_the_election_is_obeyed_by_the_new_leader(
        world: World) -> None:
    hosts = {n: Host() for n in ("n1", "n2", "n3")}
    cs = {n: world.coordinator(n) for n in hosts}
    for n, c in cs.items():
        await c.start(hosts[n])
    await until(lambda: len(world.owners()) == SHARDS
                and set(world.owners().values()) == set(hosts), 10, "three owners")
    assert world.snapshot().leader == "n1"
    drained = asyncio.Event()

    async def drain_first(txn: Txn) -> None:
        if is_elect(txn, world.keys) and not drained.is_set():
            world.etcd.put(world.keys.drain("n2"), b"1")  # mtactl drain n2, right now
            drained.set()

    for n in ("n2", "n3"):
        mem(cs[n]).hooks["commit"] = drain_first
    mem(cs["n1"]).mode = "silent"  # the leader is cut off ...
    assert cs["n1"]._lease is not None
    world.etcd.drop_lease(cs["n1"]._lease)  # ... and its lease runs out
    await until(drained.is_set, 5, "an election")
    await until(lambda: set(world.owners().values()) == {"n3"}
                and len(world.owners()) == SHARDS
                and set(world.snapshot().assignment.values()) == {"n3"}, 10,
                "n3 owns every shard")
    assert world.snapshot().leader in ("n2", "n3")
    assert hosts["n2"].owned == {}
    await until(lambda: hosts["n1"].fenced, 5, "the old leader fenced")
    assert not any(cs["n1"].may_send(s) for s in range(SHARDS))


@ONE_LOOP
async def test_leader_loss_and_reelection_then_the_old_leader_rejoins(world: World) -> None:
    h1, h2 = Host(), Host()
    n1, n2 = world.coordinator("n1"), world.coordinator("n2")
    await n1.start(h1)
    await n2.start(h2)
    await until(lambda: len(world.owners()) == SHARDS
                and set(world.owners().values()) == {"n1", "n2"}, 10, "both own shards")
    taken = dict(h1.owned)
    mem(n1).mode = "silent"
    assert n1._lease is not None
    world.etcd.drop_lease(n1._lease)
    await until(lambda: world.snapshot().leader == "n2" and set(h2.owned) == set(range(SHARDS)),
                10, "n2 leads and owns every shard")
    for s, token in taken.items():
        assert h2.owned[s] > token
    await until(lambda: h1.fenced, n1.fence_after + 2, "n1 fenced by its timer")
    assert not any(n1.may_send(s) for s in range(SHARDS))
    mem(n1).mode = "up"
    await until(lambda: not h1.fenced and bool(h1.owned)
                and set(world.owners().values()) == {"n1", "n2"}
                and world.snapshot().converged(SHARDS), 10, "n1 back, cluster converged")
    assert world.snapshot().leader == "n2"
    assert all(n1.may_send(s) for s in h1.owned)


async def test_a_fenced_node_never_says_it_may_send(world: World) -> None:
    host = Host(release_delay=0.2)
    c = world.coordinator("n1")
    await c.start(host)
    everything = set(range(SHARDS))
    await until(serving(c, host, everything), 5, "serving")
    said_yes: list[int] = []
    samples = [0]

    async def sample() -> None:
        while host.fenced:
            said_yes.extend(s for s in everything if c.may_send(s))
            samples[0] += 1
            await asyncio.sleep(0)

    sampler: list[asyncio.Task[None]] = []
    host.on_fence = lambda: sampler.append(asyncio.ensure_future(sample()))
    # Reads stall (a slow etcd): the view still shows our owner keys when the next refresh
    # hears that the lease is gone. Fenced is what says no then.
    reads = asyncio.Event()

    async def stale_reads(_: Any) -> None:
        await reads.wait()

    mem(c).hooks["snapshot"] = stale_reads
    assert c._lease is not None
    world.etcd.drop_lease(c._lease)
    await until(lambda: bool(sampler), 5, "the fence")
    await asyncio.wait_for(sampler[0], 10)
    mem(c).hooks.clear()
    reads.set()
    assert samples[0] > 10, samples
    assert said_yes == [], f"may_send said yes while fenced: {sorted(set(said_yes))}"
    fenced_at = host.kinds("fence")[0][0]
    unfenced_at = host.kinds("unfence")[0][0]
    assert not [t for t, _ in host.kinds("acquire") if fenced_at < t < unfenced_at]
    await until(serving(c, host, everything), 5, "serving again")


async def test_stop_claiming_during_a_claim_hands_the_key_back(world: World) -> None:
    h1, h2 = Host(), Host()
    n1, n2 = world.coordinator("n1"), world.coordinator("n2")
    await n1.start(h1)
    await until(serving(n1, h1, set(range(SHARDS))), 5, "n1 serving")
    claimed: list[int] = []

    async def stop_mid_claim(txn: Txn) -> None:
        owner_keys = [c.key for c in txn.compare if c.target == "create" and c.expect == 0
                      and c.key.startswith(world.keys.prefix + b"owner/")]
        if owner_keys:
            claimed.append(int(owner_keys[0].rsplit(b"/", 1)[1]))
            n2.stop_claiming()  # SIGTERM arrived while this claim was on its way

    mem(n2).hooks["commit"] = stop_mid_claim
    starting = asyncio.create_task(n2.start(h2))
    await until(lambda: bool(claimed) and not n2._acquiring, 10, "n2's claims ended")
    await until(lambda: "n2" not in world.owners().values(), 5, "n2's keys handed back")
    assert h2.kinds("acquire") == [], h2.events
    # Nothing later either: the leader's assignment still names n2, it claims nothing.
    reads = mem(n2).calls.count("snapshot")
    n2._kick.set()
    await until(lambda: mem(n2).calls.count("snapshot") > reads and not n2._acquiring, 5,
                "n2 reconciled again")
    assert h2.kinds("acquire") == [] and "n2" not in world.owners().values()
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)


async def test_a_node_with_another_shard_count_never_joins(world: World) -> None:
    h1 = Host()
    n1 = world.coordinator("n1", shards=8)
    await n1.start(h1)
    assert world.snapshot().shard_count == 8
    other = world.coordinator("n2", shards=16)
    with pytest.raises(ShardCountMismatch):
        await other.start(Host())
    assert "grant" not in mem(other).calls  # never joined, so never assigned a shard
    assert set(world.snapshot().members) == {"n1"}
    other._host = None  # nothing to stop

    # A cluster from before the key: an assignment past our count is a mismatch too.
    world.etcd.delete(world.keys.shards)
    world.etcd.put(world.keys.assign(11), b"n1")
    small = world.coordinator("n3", shards=8)
    with pytest.raises(ShardCountMismatch):
        await small.start(Host())
    assert world.snapshot().shard_count is None  # not recorded by the node that is wrong
    small._host = None

    world.etcd.put(world.keys.shards, b"garbage")
    odd = world.coordinator("n4", shards=8)
    with pytest.raises(ShardCountMismatch):
        await odd.start(Host())
    odd._host = None


async def test_a_refresh_that_hangs_is_retried_in_time_to_avoid_the_fence(
        world: World) -> None:
    # TTL 2 s: fence 1.2 s after the last refresh was sent. A refresh that hangs (a silent
    # endpoint) must be abandoned soon enough that the retry still lands before the fence.
    ttl = 2.0
    host = Host()
    c = world.coordinator("n1", shards=2, ttl=ttl)
    timing = c.timing
    await c.start(host)
    await until(serving(c, host, {0, 1}), 5, "serving")
    store = mem(c)
    hung: list[float] = []

    async def hang_twice(_: Any) -> None:
        hung.append(time.monotonic())
        if len(hung) == 2:
            store.hooks.clear()
        await asyncio.Event().wait()

    for trial in range(3):
        hung.clear()
        store.hooks["refresh"] = hang_twice
        last = c.last_refresh
        await until(lambda n=last: c.last_refresh > n and len(hung) == 2, 5,
                    f"a refresh after two hung ones (trial {trial})")
        assert not host.fenced, f"fenced after {len(hung)} hung refreshes (trial {trial})"
        assert c.last_refresh - hung[0] < timing.fence_after
    assert all(c.may_send(s) for s in (0, 1))


def test_timing_leaves_room_for_two_refresh_retries_at_every_ttl() -> None:
    for ttl in (1.0, 2.0, 3.0, 5.0, 10.0, 30.0):
        t = Timing(ttl)
        assert t.refresh_timeout <= t.fence_after / 3, ttl
        assert t.refresh_interval + 3 * t.refresh_timeout <= t.fence_after + 1e-9, ttl
        assert t.fence_after < ttl


async def test_memstore_compares_like_etcd() -> None:
    etcd = MemEtcd()
    keys = Keys("m")
    store = MemStore(etcd, keys, Timing(3.0))
    lease = await store.grant(3)
    res = await store.commit(Txn((), ()))
    assert res.succeeded and etcd.revision == 1  # no writes: no new revision
    key = keys.owner(1)
    ok = await store.commit(Txn((Compare.absent(key),), (Put(key, b"a", lease), Get(key))))
    assert ok.succeeded and ok.gets[0] is not None and ok.gets[0].create_revision == 2
    again = await store.commit(Txn((Compare.absent(key),), (Put(key, b"b", lease),)))
    assert not again.succeeded and etcd.get(key) is not None
    assert (await store.commit(Txn((Compare.equals(keys.leader, b""),)))).succeeded is False
    etcd.advance(3.5)  # the lease expires with its key
    assert etcd.get(key) is None
    with pytest.raises(StoreDown):
        await store.commit(Txn((), (Put(key, b"a", lease),)))
    assert await store.refresh(lease) == 0


async def test_a_member_that_stopped_refreshing_is_listed_as_lease_expiring(
        world: World) -> None:
    """A killed (or paused, or cut off) node stays a member until its lease runs out; the
    members list says "lease expiring" for it meanwhile, never that it is up."""
    a, b = world.coordinator("a"), world.coordinator("b")
    await a.start(Host())
    await b.start(Host())

    async def listed() -> dict[str, float | None]:
        return {m.node: m.lease_expiring for m in await a.members(leases=True)}

    def refreshed(c: ClusterCoordinator) -> Callable[[], bool]:
        assert c._lease is not None
        lease = c._lease
        return lambda: world.etcd.leases[lease].expires > world.etcd.clock() + TTL - 0.5

    assert await listed() == {"a": None, "b": None}
    # Without leases=True (peer fan-out, every cluster-wide admin answer) no lease is asked.
    mem(a).calls.clear()
    assert {m.node: m.lease_expiring for m in await a.members()} == {"a": None, "b": None}
    assert "lease_left" not in mem(a).calls
    mem(b).mode = "silent"  # b's refreshes no longer reach the store
    world.etcd.advance(TTL / 6)  # one refresh interval: nobody is expiring yet
    await until(refreshed(a), 5, "a refreshed its lease")
    assert await listed() == {"a": None, "b": None}
    # Most of the TTL without a refresh (etcd says whole seconds left, floored): b has most
    # likely died.
    world.etcd.advance(TTL * 2 / 3)
    await until(refreshed(a), 5, "a refreshed its lease")
    now = await listed()
    assert now["a"] is None  # the node asked refreshes; it is never "expiring"
    assert now["b"] == 0, now
    world.etcd.advance(TTL / 6)  # b's lease has run out: b is no longer a member
    assert await listed() == {"a": None}


class HeldReleases(Host):
    """A Host whose releases wait until ``hold`` is set (deliveries still in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = asyncio.Event()

    async def release_shard(self, shard: int) -> None:
        self.events.append((time.monotonic(), "release_start", shard))
        await self.hold.wait()
        self.owned.pop(shard, None)
        self.events.append((time.monotonic(), "release", shard))


async def test_a_shard_being_released_may_not_be_sent_from(world: World) -> None:
    h1, h2 = HeldReleases(), Host()
    n1, n2 = world.coordinator("n1"), world.coordinator("n2")
    await n1.start(h1)
    everything = set(range(SHARDS))
    await until(serving(n1, h1, everything), 5, "n1 serving every shard")
    joining = asyncio.create_task(n2.start(h2))  # the leader moves shards to n2
    try:
        await until(lambda: bool(h1.kinds("release_start")), 10, "n1 releasing a shard")
        releasing = {s for _, s in h1.kinds("release_start")}
        # The shard is still owned (its key, its claim) while deliveries finish: no new ones.
        assert releasing <= set(n1._owned)
        assert not any(n1.may_send(s) for s in releasing), "may_send said yes mid-release"
        assert all(n1.may_send(s) for s in everything - releasing)
    finally:
        h1.hold.set()
    await joining
    await until(lambda: bool(h2.owned) and world.snapshot().converged(SHARDS), 10,
                "n2 owns the shards it was given")


def test_lease_left_counts_the_second_etcd_floors_away() -> None:
    # etcd says whole seconds left, floored: 3 s left of 6 may be 3.9 s, not yet expiring.
    assert not LeaseLeft(left=3, granted=6).expiring
    assert LeaseLeft(left=2, granted=6).expiring
    assert not LeaseLeft(left=1, granted=2).expiring
    assert LeaseLeft(left=0, granted=2).expiring


async def test_an_undrain_that_changes_nothing_is_refused(world: World) -> None:
    c = world.coordinator("n1")
    await c.start(Host())
    with pytest.raises(ClusterOpError) as live:
        await c.set_draining("n1", False)  # live, not draining
    assert live.value.status == 409, live.value
    with pytest.raises(ClusterOpError) as unknown:
        await c.set_draining("n9", False)  # a mistyped name
    assert unknown.value.status == 404, unknown.value
    assert world.snapshot().draining == set()


async def test_the_fence_deadline_counts_from_when_the_refresh_was_sent(
        world: World) -> None:
    host = Host()
    c = world.coordinator("n1", shards=2)
    await c.start(host)
    await until(serving(c, host, {0, 1}), 5, "serving")
    delay = c.timing.refresh_timeout * 0.7  # a slow answer, still in time
    sent: list[float] = []

    async def slow_then_silent(_: Any) -> None:
        sent.append(time.monotonic())
        if len(sent) == 1:
            await asyncio.sleep(delay)  # etcd's answer takes this long
        else:
            await asyncio.Event().wait()  # no later refresh gets through

    mem(c).hooks["refresh"] = slow_then_silent
    await until(lambda: bool(host.kinds("fence")), c.fence_after + 5, "the fence")
    mem(c).hooks.clear()
    fenced_at = host.kinds("fence")[0][0]
    # From the send: the answer's delay must not push the fence past what etcd allows.
    assert fenced_at - sent[0] < c.fence_after + delay, (fenced_at - sent[0], delay)
    assert c.last_refresh <= sent[0]


async def test_taking_every_shard_is_logged_as_one_summary_line(world: World) -> None:
    """A node taking its shards writes one info line naming them, not one line per shard."""
    from structlog.testing import capture_logs

    host = Host()
    c = world.coordinator("n1")
    with capture_logs() as logs:
        await c.start(host)
        await until(serving(c, host, set(range(SHARDS))), 5, "n1 serving every shard")
        c._changes.flush()  # the summary is written once the changes settle; now, here
    # (cluster.shards_recorded, once per new cluster, records the shard count, not shards.)
    infos = [e for e in logs if e["log_level"] == "info" and "shard" in e["event"]
             and e["event"] != "cluster.shards_recorded"]
    assert [e["event"] for e in infos] == ["cluster.shards_changed"], infos
    assert infos[0]["acquired"] == list(range(SHARDS))
    assert (infos[0]["released"], infos[0]["owned"]) == ([], SHARDS)
