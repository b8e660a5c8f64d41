"""The coordinator's decisions for a replicated spool ([spool] replicas > 1), on the in-memory
store: where copies go, who may take a shard over, and the guarded ``sync/<shard>`` writes.

The hosts here do not replicate: a test grows a shard's in-sync set the way the owner side
does, through the owner's :meth:`ClusterCoordinator.change_sync`. Same harness as
test_cluster_decisions.py (:class:`cluster.memstore.MemStore`, leases on a manual clock, hooks
that run inside a store call).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from cluster.coordinator import ClusterCoordinator, parse_hostport
from cluster.keys import Keys
from cluster.rendezvous import assign
from cluster.store import Entry, Owner, Put, Snapshot, Txn, decode
from mta.coordinator import Replication
from mta.replication.insync import SyncRecord
from tests.support import wait_until as until
from tests.support.memcluster import SHARDS, mem
from tests.support.memcluster import CopyHost as Host
from tests.support.memcluster import ReplicatedMem as World
from tests.support.memcluster import settled_replicated as settled


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    await w.close()


async def grow(world: World, owner: ClusterCoordinator, shard: int, node: str,
               copy: str) -> SyncRecord:
    """What the owner side does once ``node`` has caught up: add it to the in-sync set."""
    old = world.snapshot().sync[shard]
    new = old.with_members({**old.members, node: copy})
    assert await owner.change_sync(shard, old, new) == new
    return new


def owner_of(world: World, cs: dict[str, ClusterCoordinator], shard: int) -> ClusterCoordinator:
    return cs[world.owners()[shard]]


@pytest.mark.parametrize(("replicas", "names"), [(2, ("n1", "n2", "n3")),
                                                 (3, ("n1", "n2", "n3", "n4"))])
async def test_the_leader_places_distinct_followers_other_than_the_owner(
        world: World, replicas: int, names: tuple[str, ...]) -> None:
    hosts = {n: Host(n) for n in names}
    cs = {n: world.coordinator(n, replicas=replicas) for n in names}
    for n in names:
        await cs[n].start(hosts[n])
    # n1 owns every shard (nothing is promotable elsewhere yet): place_followers' even
    # per-node bound alone would leave some shards with fewer followers than that (and a
    # shard with none could never move); every shard gets all of its followers, and the
    # node the balanced assignment gives it besides, until that one has caught up.
    balanced = assign(SHARDS, dict.fromkeys(names, 1.0))

    def placed() -> bool:
        v = world.snapshot()
        return len(v.replicas) == SHARDS and all(
            len(f) >= replicas - 1 and balanced[s] in (*f, v.assignment.get(s))
            for s, f in v.replicas.items())

    await until(placed, 10, "followers placed for every shard")
    await until(settled(world, list(cs.values())), 10, "settled")
    v = world.snapshot()
    for shard in range(SHARDS):
        followers = v.replicas[shard]
        extra = int(balanced[shard] != v.assignment[shard])  # the node it is to move to
        assert len(set(followers)) == len(followers), (shard, followers)
        assert replicas - 1 <= len(followers) <= replicas - 1 + extra, (shard, followers)
        assert balanced[shard] in (*followers, v.assignment[shard]), (shard, followers)
        assert v.assignment[shard] not in followers, (shard, v)
        assert set(followers) <= set(names)
        # The claim wrote the first record: the owner's copy, under its token.
        assert v.sync[shard] == SyncRecord(v.token(shard), v.owners[shard].node,
                                           {v.owners[shard].node: f"{v.owners[shard].node}"
                                                                  f"-copy{shard}"})
    # n1 came first and took every shard; the others hold no copy the records name, so
    # nothing moves to them until they have caught up and joined.
    assert set(world.owners().values()) == {"n1"}
    for shard, token, replication in hosts["n1"].acquired:
        assert replication is not None and replication.record.token == token
        assert replication.record.members == {"n1": f"n1-copy{shard}"}
    # Written only when something changed: the leader has nothing more to write.
    assert v.leader == "n1"
    assert not await cs["n1"]._write_assignment(v)
    raw = world.etcd.get(world.keys.replicas(0))
    assert raw is not None and json.loads(raw.value) == list(v.replicas[0])


async def test_a_dead_owners_shard_goes_only_to_a_live_member_holding_its_copy(
        world: World) -> None:
    names = ("n1", "n2", "n3")
    hosts = {n: Host(n) for n in names}
    cs = {n: world.coordinator(n) for n in names}
    with capture_logs() as logs:
        for n in names:
            await cs[n].start(hosts[n])
        await until(lambda: len(world.snapshot().replicas) == SHARDS, 10, "followers placed")
        await until(settled(world, list(cs.values())), 10, "settled")
        # Each follower catches up and joins (the owner side's grow).
        for shard, followers in sorted(world.snapshot().replicas.items()):
            await grow(world, cs["n1"], shard, followers[0], f"{followers[0]}-copy{shard}")
        # Balanced owners that now hold a promotable copy take their shards over.
        await until(lambda: len(set(world.owners().values())) > 1
                    and settled(world, list(cs.values()))(), 10, "shards moved to members")
        victim = next(n for n in names if n != world.snapshot().leader
                      and n in world.owners().values())
        v = world.snapshot()
        expected = {s: set(r.members) - {victim} for s, r in v.sync.items()
                    if v.owners[s].node == victim}
        assert expected and all(len(m) == 1 for m in expected.values()), v.sync
        world.kill(cs[victim])
        alive = [cs[n] for n in names if n != victim]
        await until(lambda: victim not in world.owners().values()
                    and settled(world, alive)(), 10, f"{victim}'s shards taken over")
    v = world.snapshot()
    for shard, members in expected.items():
        assert {v.owners[shard].node} == members, (shard, members, v.owners[shard])
        record = v.sync[shard]
        assert record.owner == v.owners[shard].node and record.token == v.token(shard)
        assert victim not in record.members  # dead: it rejoins by catching up
    # Every takeover by a node that holds the copy its record names; no claim was refused
    # (the leader never assigned a shard to a node that may not take it).
    for n, host in hosts.items():
        for shard, token, replication in host.acquired:
            assert replication is not None
            assert replication.record.members[n] == host.copies[shard], (n, shard)
            assert replication.record.token == token
    assert not [e for e in logs if e["event"] == "cluster.not_promotable"], logs


async def test_a_joining_node_gets_its_balanced_share_once_caught_up_and_drain_is_at_once(
        world: World) -> None:
    """The node a shard is to move to is placed as an extra follower (the copies in sync
    never dip), gets the shard once it has joined the in-sync set, and the extra placement
    goes once it holds it. A draining owner hands its shards to in-sync copies at once."""
    hosts = {n: Host(n) for n in ("n1", "n2", "n3")}
    cs = {n: world.coordinator(n) for n in hosts}
    two, three = ("n1", "n2"), ("n1", "n2", "n3")

    async def catch_up(target: str | None = None) -> None:
        # The owner side's grow, for each placed follower (only ``target`` if given).
        v = world.snapshot()
        for shard, followers in sorted(v.replicas.items()):
            for node in followers:
                if node not in v.sync[shard].members and target in (None, node):
                    await grow(world, owner_of(world, cs, shard), shard, node,
                               hosts[node].copies.get(shard, f"{node}-copy{shard}"))

    def owners_are(names: tuple[str, ...]) -> bool:
        balanced = assign(SHARDS, dict.fromkeys(names, 1.0))
        return world.owners() == balanced and settled(world, [cs[n] for n in names])()

    for n in two:
        await cs[n].start(hosts[n])
    await until(lambda: len(world.snapshot().replicas) == SHARDS
                and settled(world, [cs[n] for n in two])(), 10, "placed and settled")
    await catch_up()
    await until(lambda: owners_are(two), 10, "the balanced owners of two nodes")
    await catch_up()  # the records after the moves name both copies again
    before = world.snapshot()
    assert all(len(r.members) == 2 for r in before.sync.values()), before.sync

    await cs["n3"].start(hosts["n3"])
    balanced = assign(SHARDS, dict.fromkeys(three, 1.0))
    moving = {s for s, n in balanced.items() if n == "n3"}
    assert 0 < len(moving) < SHARDS

    def n3_placed() -> bool:
        v = world.snapshot()
        return all("n3" in v.replicas.get(s, ()) for s in moving)

    await until(n3_placed, 10, "n3 placed as a follower of the shards it is to own")
    v = world.snapshot()
    assert not moving & {s for s, o in v.owners.items() if o.node == "n3"}, "moved uncaught-up"
    # (A follower it replaces stays in the in-sync set, streamed to, until the owner side
    # has n3 in the set: the owner prunes only above ``replicas`` copies; test_insync.)
    await catch_up("n3")
    await until(lambda: owners_are(three), 10, "n3 owns its balanced share")
    v = world.snapshot()
    for shard in moving:
        assert v.owners[shard].node == "n3"
        assert len(v.replicas[shard]) == 1 and "n3" not in v.replicas[shard], v.replicas[shard]
        # The takeover kept the live copies: the owner side prunes the extra one.
        assert {"n3", *before.sync[shard].members} == set(v.sync[shard].members)

    # Drain n3 after one of its shards lost from its in-sync set the node that shard would
    # go to without n3 (the balanced choice): the shard goes at once to the copy it still
    # has in its set (no grow here), not to the node that would first have to catch up.
    shard = min(moving)
    target = assign(SHARDS, {"n1": 1.0, "n2": 1.0})[shard]
    other = ({"n1", "n2"} - {target}).pop()
    old = v.sync[shard]
    new = old.with_members({n: c for n, c in old.members.items() if n != target})
    assert other in new.members and await cs["n3"].change_sync(shard, old, new) == new
    v = world.snapshot()
    held = {s: set(v.sync[s].members) - {"n3"} for s in moving}
    await cs["n1"].set_draining("n3", True)
    await until(lambda: "n3" not in world.owners().values()
                and settled(world, list(cs.values()))(), 10, "n3 drained")
    v = world.snapshot()
    assert v.owners[shard].node == other
    for shard, members in held.items():
        assert v.owners[shard].node in members, (shard, members, v.owners[shard])


async def test_a_member_whose_copy_id_changed_is_not_chosen(world: World) -> None:
    h1, h2 = Host("n1"), Host("n2")
    n1, n2 = world.coordinator("n1"), world.coordinator("n2")
    await n1.start(h1)
    await until(settled(world, [n1]), 10, "n1 owns every shard")
    await n2.start(h2)
    await until(lambda: len(world.snapshot().replicas) == SHARDS, 10, "followers placed")
    # Shard 0: n2's copy joined. Every other shard names a copy n2 no longer has (its disk
    # was replaced since it joined: it reports another id now).
    await grow(world, n1, 0, "n2", h2.copies[0])
    for shard in range(1, SHARDS):
        await grow(world, n1, shard, "n2", "n2-old-disk")
    n1._kick.set()
    await until(lambda: world.snapshot().assignment.get(0) in ("n1", "n2"), 10, "assigned")
    with capture_logs() as logs:
        world.kill(n1)
        await until(lambda: world.owners() == {0: "n2"} and not n2._busy, 10,
                    "n2 took shard 0 only")
        await until(lambda: any(e["event"] == "cluster.shard_waiting_for_copy"
                                and e["shards"] for e in logs), 10, "the waiting alert")
    assert set(h2.owned) == {0}
    assert [s for s, _, _ in h2.acquired] == [0]
    waiting = [e for e in logs if e["event"] == "cluster.shard_waiting_for_copy"]
    assert waiting[-1]["shards"] == list(range(1, SHARDS)), waiting
    assert not [e for e in logs if e["event"] == "cluster.not_promotable"]
    # The waiting shards stay with their dead owner in the assignment: nobody claims them.
    v = world.snapshot()
    assert all(v.assignment[s] == "n1" for s in range(1, SHARDS)), v.assignment


async def test_a_non_members_claim_is_refused_and_its_owner_key_deleted(
        world: World) -> None:
    host = Host("n3")
    n3 = world.coordinator("n3")
    n3._host = host
    await n3._join()
    world.put_sync(5, SyncRecord(7, "n1", {"n1": "c1", "n2": "c2"}))
    world.put_sync(6, SyncRecord(7, "n1", {"n1": "c1", "n3": "n3-earlier-copy"}))
    world.etcd.put(world.keys.sync(4), b"{not json")  # unreadable: nobody is promotable
    with capture_logs() as logs:
        for shard in (5, 6, 4):
            assert not await n3._claim(shard)
    assert world.owners() == {}
    assert host.acquired == []
    refused = [e for e in logs if e["event"] == "cluster.not_promotable"]
    assert [e["shard"] for e in refused] == [5, 6, 4]
    assert any(e["event"] == "cluster.bad_sync_record" for e in logs)
    # Untouched: a refused claim writes no record.
    assert world.snapshot().sync[5] == SyncRecord(7, "n1", {"n1": "c1", "n2": "c2"})
    # A shard never replicated may go anywhere: the claim writes its first record.
    assert await n3._claim(1)
    v = world.snapshot()
    assert v.sync[1] == SyncRecord(v.token(1), "n3", {"n3": "n3-copy1"})
    assert host.acquired[-1][2] == Replication(v.sync[1], ())


async def test_the_takeover_fails_if_the_record_changed_meanwhile_and_the_claim_is_released(
        world: World) -> None:
    host = Host("n2")
    n2 = world.coordinator("n2")
    n2._host = host
    await n2._join()
    before = SyncRecord(7, "n1", {"n1": "c1", "n2": host.copies[5]})
    shrunk = SyncRecord(7, "n1", {"n1": "c1"})
    world.put_sync(5, before)
    world.etcd.put(world.keys.replicas(5), b'["n2"]')
    sync_key = world.keys.sync(5)

    async def shrink_first(txn: Txn) -> None:
        if any(isinstance(op, Put) and op.key == sync_key for op in txn.success):
            mem(n2).hooks.clear()
            # The old owner's shrink (its change_sync) lands between our read and our write.
            world.put_sync(5, shrunk)

    mem(n2).hooks["commit"] = shrink_first
    with capture_logs() as logs:
        assert not await n2._claim(5)
    assert [e["event"] for e in logs if e["event"].startswith("cluster.takeover")] == [
        "cluster.takeover_refused"]
    assert world.owners() == {}, "the claimer kept its owner key"
    assert host.acquired == []
    assert world.snapshot().sync[5] == shrunk
    # Claiming again re-reads who is promotable: n2 no longer is.
    with capture_logs() as logs:
        assert not await n2._claim(5)
    assert [e["event"] for e in logs if e["event"] == "cluster.not_promotable"]
    assert world.owners() == {} and host.acquired == []


async def test_change_sync_is_refused_once_our_owner_key_is_gone_or_replaced(
        world: World) -> None:
    host = Host("n1")
    n1 = world.coordinator("n1")
    n1._host = host
    await n1._join()
    assert await n1._claim(5)
    assert n1.replication_address("n1") is None  # no view read yet
    r0 = world.snapshot().sync[5]
    assert host.acquired == [(5, r0.token, Replication(r0, ()))]
    r1 = r0.with_members({**r0.members, "n2": "c2"})
    r2 = r0.with_members({**r0.members, "n3": "c3"})
    assert await n1.change_sync(5, r0, r1) == r1
    assert world.snapshot().sync[5] == r1
    # Not the record in place any more: the one that is (this term's) comes back, and the
    # owner goes on from it instead of proposing against a stale one for ever.
    assert await n1.change_sync(5, r0, r2) == r1
    assert await n1.change_sync(3, r0, r2) is None  # a shard we do not own
    # Store down: the change may have committed or not; it stays in flight (the owner
    # keeps requiring the acks of both sets) until etcd answers, then what is there.
    mem(n1).mode = "refuse"
    before = len(mem(n1).calls)
    pending = asyncio.ensure_future(n1.change_sync(5, r1, r2))
    await until(lambda: len(mem(n1).calls) > before + 3, 10, "reads retried while down")
    assert not pending.done()
    mem(n1).mode = "up"
    assert await asyncio.wait_for(pending, 10) is None  # r1 still in place: not applied
    # Our owner key replaced (same node, a newer key: not the one the claim made) ...
    key = world.keys.owner(5)
    world.etcd.delete(key)
    world.etcd.put(key, b"n1")
    assert await n1.change_sync(5, r1, r2) is None
    # ... or gone.
    world.etcd.delete(key)
    assert await n1.change_sync(5, r1, r2) is None
    assert world.snapshot().sync[5] == r1


async def test_one_copy_writes_no_sync_or_replicas_keys(world: World) -> None:
    hosts = {n: Host(n) for n in ("n1", "n2")}
    cs = {n: world.coordinator(n, replicas=1) for n in hosts}
    for n, c in cs.items():
        await c.start(hosts[n])
    await until(lambda: world.snapshot().converged(SHARDS)
                and set(world.owners().values()) == {"n1", "n2"}
                and not any(c._busy for c in cs.values()), 10, "converged on both")
    keys = [world.keys.relative(k) for k in world.etcd.kv]
    assert not [k for k in keys if k.startswith(("sync/", "replicas/"))], keys
    acquired = [r for h in hosts.values() for _, _, r in h.acquired]
    assert acquired and all(r is None for r in acquired)
    # The node key is as it always was: no replication listener, zone or copies.
    for info in world.snapshot().members.values():
        assert not {"replication", "zone", "copies"} & set(info), dict(info)


async def test_replication_addresses_come_from_the_node_keys(world: World) -> None:
    h1, h2 = Host("n1", port=7001, zone="a"), Host("n2", port=7002, zone="b")
    n1, n2 = world.coordinator("n1"), world.coordinator("n2")
    await n1.start(h1)
    await n2.start(h2)
    n1._kick.set()
    await until(lambda: n1.replication_address("n2") == ("127.0.0.1", 7002), 10,
                "n1 sees n2's listener")
    assert n1.replication_address("n1") == ("127.0.0.1", 7001)
    assert n1.replication_address("n9") is None
    # The followers the leader placed, from the same view: n2 copies every shard of n1.
    await until(lambda: all(n1.followers(s) == ("n2",) for s in range(SHARDS)), 10,
                "n1 sees the followers")
    info = world.snapshot().members["n2"]
    assert info["zone"] == "b" and info["copies"]["3"] == "n2-copy3"


def test_parse_hostport() -> None:
    assert parse_hostport("10.0.0.1:7000") == ("10.0.0.1", 7000)
    assert parse_hostport("node-1.example:7000") == ("node-1.example", 7000)
    assert parse_hostport("[2001:db8::1]:7000") == ("2001:db8::1", 7000)
    for bad in ("", "host", "host:", ":7000", "2001:db8::1:7000", "host:70000", "host:x",
                "[::1:7000", None, 7000):
        assert parse_hostport(bad) is None, bad


def test_a_sync_record_that_does_not_decode_has_no_members() -> None:
    keys = Keys("k")
    good = SyncRecord(3, "n1", {"n1": "c"})
    with capture_logs() as logs:
        v = decode(keys, 9, [Entry(keys.sync(1), b"{not json", 2, 2),
                             Entry(keys.sync(2), good.encode(), 2, 2),
                             Entry(keys.replicas(2), b'["n2","n3"]', 2, 2)])
    assert v.sync[1].members == {} and v.sync[2] == good
    assert v.replicas == {2: ("n2", "n3")}
    assert [e["log_level"] for e in logs if e["event"] == "cluster.bad_sync_record"] == ["error"]


def _snapshot(assignment: dict[int, str], owners: dict[int, Owner]) -> Snapshot:
    members = {n: {"weight": 1.0} for n in ("n1", "n2", "n3")}
    record = SyncRecord(5, "n1", {"n1": "c1", "n2": "c2", "n3": "c3"})
    return Snapshot(members=members, assignment=assignment, owners=owners, sync={0: record},
                    replicas={0: ("n2", "n3")})


def test_the_new_owner_stays_placed_until_it_holds_the_shard() -> None:
    # The leader gave shard 0 to n3 (caught up, in the set); n1 still holds it (its owner
    # key): n3 must stay a placed follower of n1, else n1 prunes it from the set as a copy
    # the placement dropped and n3's claim is then refused (the move never completes).
    leader = SimpleNamespace(replicas=2)
    want = {0: "n3"}
    v = _snapshot({0: "n3"}, {0: Owner("n1", 7)})
    placed = ClusterCoordinator._followers(leader, v, want, want)  # type: ignore[arg-type]
    assert "n3" in placed.get(0, v.replicas[0]), placed
    # Once n3 holds it, it is no follower of its own shard.
    v = _snapshot({0: "n3"}, {0: Owner("n3", 9)})
    placed = ClusterCoordinator._followers(leader, v, want, want)  # type: ignore[arg-type]
    assert placed[0] == ["n2"], placed
