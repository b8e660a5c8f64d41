"""A replicated shard end to end, in one process: a real spool owning the shard, a follower
node with its own directory, the peer channel over loopback with a shared secret, and the
in-sync records in memory. What the cluster coordinator will drive (placement, promotion,
``sync/`` in etcd) is done by hand here.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mta.envelope import shard_of
from mta.replication.copy import log_segments
from mta.replication.insync import SyncRecord
from mta.replication.owner import OwnerSide, ShardReplica
from mta.replication.peerauth import PeerAuth
from mta.spool import Spool
from mta.spool.errors import ShardReadOnly
from mta.spool.recovery import committed_end
from mta.spool.shard import shard_dir
from tests.support import wait_until
from tests.support.replication import (
    SECRET,
    FollowerNode,
    Pair,
    envelope,
    open_owner,
    start_pair,
)

SHARDS = 2
TIMEOUT = 0.4  # replica_timeout: short, so shrinking is quick; nothing here sleeps on it
# Tests that wait out replica_timeouts on purpose run on uvloop only (the loop a node picks
# when it is installed): the loop flavour changes no protocol decision, and the channel on
# both loops is tests/replication/test_channel.py's subject.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


class World(Pair):
    """The pair, with the shard helpers these tests use."""

    async def shard(self, n: int = 0, token: int = 10) -> ShardReplica:
        return await open_owner(self.spool, self.side, self.store, n, token, ["b"])

async def _world(tmp: Path, min_insync: int) -> World:
    pair = await start_pair(tmp, min_insync, TIMEOUT, shards=SHARDS)
    return World(pair.tmp, pair.peers, pair.store, pair.spool, pair.side, pair.follower)


@pytest.fixture
async def world2(tmp_path: Path) -> AsyncIterator[World]:
    """min_insync = 2: owner a and follower b must both hold what is acknowledged."""
    w = await _world(tmp_path, 2)
    yield w
    await w.close()


def identical(w: World, shard: int = 0) -> bool:
    """The follower's copy holds the owner's log byte for byte."""
    mine = shard_dir(w.spool.root, shard)
    theirs = shard_dir(w.follower.root, shard)
    segs = log_segments(mine)
    if [s[0] for s in log_segments(theirs)] != [s[0] for s in segs]:
        return False
    return all((mine / f"seg-{seq:08d}.log").read_bytes()
               == (theirs / f"seg-{seq:08d}.log").read_bytes() for seq, _, _ in segs)


async def submit_many(w: World, count: int, size: int = 700) -> list[str]:
    """``count`` messages, five at a time (so batches are several and segments roll over)."""
    ids: list[str] = []
    for first in range(0, count, 5):
        ids += await asyncio.gather(*(w.spool.submit(envelope(n), b"x" * size)
                                      for n in range(first, min(first + 5, count))))
    return ids


async def test_mail_is_refused_until_a_follower_joins_then_both_copies_match(
        world2: World) -> None:
    w = world2
    rep = await w.shard()
    # Alone, the shard cannot make two copies: new mail is refused (451), not half-kept.
    with pytest.raises(ShardReadOnly):
        await w.spool.submit(envelope(), b"hello", w.spool.allocate_id())
    await wait_until(lambda: w.members() == {"a", "b"}, what="b caught up and joined")
    assert rep.accepting
    ids = await submit_many(w, 60)
    assert len(set(ids)) == 60
    # Acknowledged means on b's disk: its durable copy already ends past every message.
    copy = w.follower.follower.copies[0]  # type: ignore[union-attr]
    assert copy.durable >= max(rep.replica.acknowledged, (0, 0))
    await wait_until(lambda: identical(w), what="b's copy is the owner's log")
    assert len(log_segments(shard_dir(w.spool.root, 0))) > 3, "segments rolled over"


async def test_an_unreachable_follower_is_dropped_and_the_shard_turns_read_only(
        world2: World) -> None:
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    await submit_many(w, 5)
    await w.follower.stop()  # its disk is there, but nobody answers
    pending = asyncio.ensure_future(w.spool.submit(envelope(1), b"after the follower left"))
    # Not acknowledged on one copy: the follower leaves the in-sync set first, and then the
    # shard has fewer than min_insync copies, so the waiting message gets a 451.
    with pytest.raises(ShardReadOnly):
        await asyncio.wait_for(pending, 10)
    assert w.members() == {"a"}
    with pytest.raises(ShardReadOnly):
        await w.spool.submit(envelope(2), b"x", w.spool.allocate_id())


async def test_a_follower_that_returns_catches_up_and_rejoins(world2: World) -> None:
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    await submit_many(w, 10)
    port = w.peers.addresses["b"][1]
    await w.follower.stop()
    await wait_until(lambda: w.members() == {"a"}, what="dropped")
    w.follower = await FollowerNode("b", w.tmp / "b").start(w.peers, port)
    await wait_until(lambda: w.members() == {"a", "b"}, what="rejoined after catching up")
    await submit_many(w, 10)
    await wait_until(lambda: identical(w), what="identical again")


async def test_a_follower_the_leader_replaces_leaves_only_once_its_successor_joined(
        tmp_path: Path) -> None:
    """The placement moves shard 0's copy from b to c: b stays in the set (its acks
    required) until c has caught up and joined, then is pruned and no longer streamed to;
    the set never has fewer than two copies on the way."""
    placement: dict[int, tuple[str, ...]] = {0: ("b",)}
    # replica_timeout 1 s: on a loaded machine b must not pass for silent meanwhile.
    w = await start_pair(tmp_path, 2, 1.0, shards=SHARDS, replicas=2,
                         followers=lambda s: placement.get(s, ()))
    c = await FollowerNode("c", tmp_path / "c").start(w.peers)
    try:
        rep = await open_owner(w.spool, w.side, w.store, 0, 10, ["b"])
        await wait_until(lambda: w.members() == {"a", "b"}, what="b joined")
        await submit_many(w, 10)
        placement[0] = ("c",)
        await wait_until(lambda: w.members() == {"a", "c"}, what="c joined, b pruned")
        await wait_until(lambda: "b" not in rep.streams, what="b no longer streamed to")
        joined = next(i for i, r in enumerate(w.store.history) if set(r.members) == {"a", "b"})
        assert all(len(r.members) >= 2 for r in w.store.history[joined:]), w.store.history
        await w.follower.stop()  # b is not waited for any more
        ids = await asyncio.wait_for(submit_many(w, 10), 10)
        assert len(set(ids)) == 10
        copy = c.follower.copies[0]  # type: ignore[union-attr]
        assert copy.durable >= rep.replica.acknowledged
    finally:
        await w.close()
        await c.stop()


async def test_a_replaced_disk_gets_a_full_copy_under_a_new_id(world2: World) -> None:
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    await submit_many(w, 30)
    old_id = w.store.records[0].members["b"]
    port = w.peers.addresses["b"][1]
    await w.follower.stop()
    shutil.rmtree(w.tmp / "b")
    w.follower = await FollowerNode("b", w.tmp / "b").start(w.peers, port)
    await wait_until(lambda: w.members() == {"a", "b"}
                     and w.store.records[0].members["b"] != old_id,
                     what="the new disk joined under its own id")
    await wait_until(lambda: identical(w), what="a full copy")


async def test_copies_drop_what_compaction_deletes_and_a_new_disk_joins_an_empty_log(
        world2: World) -> None:
    """Every message delivered: the owner deletes the dead segments, and so does the
    follower's copy. Then b's disk is replaced: with the log deleted to its last segment
    (nothing more written: the shard is read-only without b), b still catches up and
    joins; it needs nothing that was deleted."""
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    ids = await submit_many(w, 30)
    async with asyncio.timeout(10):
        for mid in ids:
            await w.spool.mark_done(mid)
    theirs = shard_dir(w.follower.root, 0)
    before = {s[0] for s in log_segments(theirs)}
    _, deleted = await w.spool.maintain(0.25)
    assert deleted > 0
    mine = {s[0] for s in log_segments(shard_dir(w.spool.root, 0))}
    await wait_until(lambda: {s[0] for s in log_segments(theirs)} == mine,
                     what="b's copy dropped the same segments")
    assert mine < before
    # A new term on that log (the shard handed over and back), b's disk replaced
    # meanwhile, and the old term's segments all deleted before b is back: nothing more is
    # written (read-only without b), yet b must be able to catch up and join.
    port, old_id = w.peers.addresses["b"][1], w.store.records[0].members["b"]
    await w.follower.stop()
    w.side.close_shard(0)
    await w.spool.release_shard(0)
    shutil.rmtree(w.tmp / "b")
    await open_owner(w.spool, w.side, w.store, 0, 11, ["b"])
    await w.spool.maintain(0.25)
    w.follower = await FollowerNode("b", w.tmp / "b").start(w.peers, port)
    await wait_until(lambda: w.members() == {"a", "b"}
                     and w.store.records[0].members["b"] != old_id, what="the new disk joined")
    await submit_many(w, 3)  # writable again


async def test_a_stale_owner_collects_no_ack_once_a_newer_one_spoke(world2: World) -> None:
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    await submit_many(w, 3)
    # Another node took shard 0 over under a newer token and said hello to b.
    other = Spool(w.tmp / "c", "c", shards=SHARDS)
    await other.start()
    side_c = OwnerSide("c", PeerAuth("c", secret=SECRET), w.peers, w.store, min_insync=1,
                       replica_timeout=TIMEOUT)
    side_c.start()
    try:
        w.store.records[0] = SyncRecord(20, "c", dict(w.store.records[0].members))
        await open_owner(other, side_c, w.store, 0, 20, ["b"])
        await wait_until(lambda: w.follower.follower.copies[0].token == 20,
                         what="b follows token 20")  # type: ignore
        # b refuses the zombie's frames: the message is never acknowledged (the shard turns
        # read-only once b's silence outlasts replica_timeout, and its waiter gets 451).
        with pytest.raises(ShardReadOnly):
            await asyncio.wait_for(w.spool.submit(envelope(9), b"from the zombie"), 10)
    finally:
        await side_c.stop()
        await other.close()


async def test_a_shard_the_node_owns_itself_is_refused(world2: World) -> None:
    w = world2
    w.follower.owns.add(0)
    rep = await w.shard()
    await wait_until(lambda: rep.streams["b"].retry_at > 0, what="b said it owns shard 0")
    assert w.members() == {"a"}


@pytest.mark.parametrize("min_insync", [1])
async def test_with_min_insync_1_the_owner_alone_acknowledges(tmp_path: Path,
                                                               min_insync: int) -> None:
    w = await _world(tmp_path, min_insync)
    try:
        await w.follower.stop()
        await w.shard()
        ids = await submit_many(w, 5)
        assert len(ids) == 5
    finally:
        await w.side.stop()
        await w.spool.close()


@ONE_LOOP
async def test_an_idle_shard_keeps_its_follower(world2: World) -> None:
    """No mail for several replica_timeouts: pings and their acks keep b in the set."""
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    changes = w.store.changes
    idle_until = asyncio.get_running_loop().time() + 4 * TIMEOUT
    while asyncio.get_running_loop().time() < idle_until:
        assert w.members() == {"a", "b"}
        await asyncio.sleep(0.05)
    assert w.store.changes == changes
    await submit_many(w, 2)


async def test_delivery_records_settle_on_a_read_only_shard(world2: World) -> None:
    """Below min_insync the shard takes no new mail, but its queued mail is still delivered:
    STATE and DONE need every member, not min_insync copies."""
    w = world2
    await w.shard()
    await wait_until(lambda: w.members() == {"a", "b"}, what="joined")
    [mid] = await submit_many(w, 1)
    await w.follower.stop()
    await wait_until(lambda: w.members() == {"a"}, what="b dropped: read-only")
    async with asyncio.timeout(10):
        await w.spool.update_state(mid, {"att": 1})
        await w.spool.mark_done(mid)
    assert w.spool.live_count() == 0


class _Gate:
    """A ReplicaGate that records what it is asked and lets everything through."""

    def __init__(self, accepting: bool = True) -> None:
        self.accepting = accepting
        self.waits: list[tuple[tuple[int, int], bool]] = []

    def written(self, seq: int, offset: int, data: bytes, records: int) -> None:
        pass

    def synced(self, end: tuple[int, int]) -> None:
        pass

    def dropped(self, seqs: list[int]) -> None:
        pass

    async def wait(self, end: tuple[int, int], reception: bool) -> None:
        self.waits.append((end, reception))


async def test_an_acknowledgement_waits_for_its_whole_batch(tmp_path: Path) -> None:
    """A copy that holds a record but not its batch's COMMIT drops it when opened: what is
    waited for is the COMMIT's end, never a record's."""
    spool = Spool(tmp_path / "s", "a", shards=1)
    await spool.start()
    try:
        await spool.acquire_shard(0, 1)
        gate = _Gate()
        spool.replicate(0, gate)
        await asyncio.gather(*(spool.submit(envelope(n), b"x" * 300) for n in range(5)))
        ends = {end for end, _ in gate.waits}
        segs = log_segments(shard_dir(spool.root, 0))
        assert ends and max(ends) <= (segs[-1][0], segs[-1][2])
        # Every wait ends at a COMMIT's end: opening a copy cut there keeps every record.
        data = (shard_dir(spool.root, 0) / f"seg-{segs[-1][0]:08d}.log").read_bytes()
        for seq, offset in ends:
            assert committed_end(data[:offset]) == offset, (seq, offset)
    finally:
        await spool.close()


async def test_new_mail_goes_to_a_shard_that_accepts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", "a", shards=3)
    await spool.start()
    try:
        gates = {n: _Gate(accepting=n == 2) for n in range(3)}
        for n, gate in gates.items():
            await spool.acquire_shard(n, 1)
            spool.replicate(n, gate)
        assert {shard_of(spool.allocate_id()) for _ in range(10)} == {2}
        gates[2].accepting = False
        gates[0].accepting = True
        assert {shard_of(spool.allocate_id()) for _ in range(10)} == {0}
    finally:
        await spool.close()


@ONE_LOOP
async def test_a_member_the_placement_moved_away_is_streamed_to_until_pruned(
        tmp_path: Path) -> None:
    """The placement replaces b by c, which cannot catch up yet (not reachable): b stays a
    member, so the owner keeps streaming to it and mail is still acknowledged on two copies;
    b is not dropped as silent, and the set never dips below two."""
    placement: dict[int, tuple[str, ...]] = {0: ("b",)}
    timeout = 1.0  # b must not pass for silent on a loaded machine; c's absence must show
    w = await start_pair(tmp_path, 2, timeout, shards=SHARDS, replicas=2,
                         followers=lambda s: placement.get(s, ()))
    try:
        rep = await open_owner(w.spool, w.side, w.store, 0, 10, ["b"])
        await wait_until(lambda: w.members() == {"a", "b"}, what="b joined")
        placement[0] = ("c",)  # c: no address, no node; it never catches up here
        await wait_until(lambda: "c" in rep.streams, what="c placed")
        for _ in range(4):  # past replica_timeout twice over
            ids = await asyncio.wait_for(submit_many(w, 5), 3 * timeout)
            assert len(set(ids)) == 5
            await asyncio.sleep(timeout / 2)
        assert "b" in rep.streams and w.members() == {"a", "b"}
        assert rep.replica.lagging()["b"] >= rep.replica.acknowledged
        assert all(len(r.members) >= 2 for r in w.store.history[1:]), w.store.history
    finally:
        await w.close()


async def test_the_writer_reports_each_batch_s_records_and_none_for_a_header(
        tmp_path: Path) -> None:
    """What lag_records counts: a message is one MSG record and its batch's COMMIT, a new
    segment's header no record."""
    from tests.support.replication import envelope

    w = await start_pair(tmp_path, 1, TIMEOUT, shards=SHARDS)
    try:
        rep = await open_owner(w.spool, w.side, w.store, 0, 10, ["b"])
        calls: list[tuple[int, int]] = []
        real = rep.written

        def written(seq: int, offset: int, data: bytes, records: int = 0) -> None:
            calls.append((offset, records))
            real(seq, offset, data, records)

        rep.written = written  # type: ignore[method-assign]
        before = rep.marks.records
        for n in range(12):  # one at a time: one message per batch; segments roll over
            await w.spool.submit(envelope(n), b"x" * 700)
        headers = [r for off, r in calls if off == 0]
        assert headers and set(headers) == {0}, calls
        assert [r for off, r in calls if off > 0] == [2] * 12, calls
        assert rep.marks.records - before == 24
    finally:
        await w.close()


async def test_a_shard_taken_over_takes_no_mail_until_it_replicates(tmp_path: Path) -> None:
    """Between opening a shard it takes over and installing its replication gate (the owner
    side needs the recovered log), a 250 would rest on this copy alone: no new mail goes
    there, and a DONE waits for the gate."""
    spool = Spool(tmp_path / "s", "a", shards=1)
    await spool.start()
    try:
        await spool.acquire_shard(0, 10)
        mid = await spool.submit(envelope(0), b"before the handover")
        await spool.release_shard(0)
        await spool.acquire_shard(0, 11, replicated=True)
        with pytest.raises(ShardReadOnly):
            await spool.submit(envelope(1), b"x", spool.allocate_id())
        done = asyncio.ensure_future(spool.mark_done(mid))
        await asyncio.sleep(0)  # let it reach the gate
        for _ in range(20):
            await asyncio.sleep(0.01)
            assert not done.done(), "acknowledged before the gate was there"
        gate = _Gate()
        spool.replicate(0, gate)
        await asyncio.wait_for(done, 5)
        assert gate.waits and gate.waits[-1][1] is False
        await spool.submit(envelope(2), b"now")
    finally:
        await spool.close()
