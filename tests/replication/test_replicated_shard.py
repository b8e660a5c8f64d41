"""A replicated shard end to end, in one process: a real spool owning the shard, a follower
node with its own directory, the peer channel over loopback with a shared secret, and the
in-sync records in memory. What the cluster coordinator will drive (placement, promotion,
``sync/`` in etcd) is done by hand here.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mta.replication.copy import log_segments
from mta.replication.insync import SyncRecord
from mta.replication.owner import OwnerSide, ShardReplica
from mta.replication.peerauth import PeerAuth
from mta.spool import FencedError, Spool
from mta.spool.errors import ShardReadOnly
from mta.spool.shard import shard_dir
from tests.support.replication import (
    SECRET,
    FollowerNode,
    MemorySyncStore,
    Peers,
    envelope,
    open_owner,
)

SHARDS = 2
TIMEOUT = 0.4  # replica_timeout: short, so shrinking is quick; nothing here sleeps on it


@dataclass
class World:
    tmp: Path
    peers: Peers
    store: MemorySyncStore
    spool: Spool
    side: OwnerSide
    follower: FollowerNode
    fenced: list[tuple[int, str]]

    async def shard(self, n: int = 0, token: int = 10) -> ShardReplica:
        return await open_owner(self.spool, self.side, self.store, n, token, ["b"])

    async def until(self, cond: object, what: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():  # type: ignore[operator]
                await asyncio.sleep(0.01)
        del what


async def _world(tmp: Path, min_insync: int) -> World:
    peers, store, fenced = Peers(), MemorySyncStore(), []
    follower = await FollowerNode("b", tmp / "b").start(peers)
    spool = Spool(tmp / "a", "a", shards=SHARDS, segment_size=4096)
    await spool.start()
    side = OwnerSide("a", PeerAuth("a", secret=SECRET), peers, store, min_insync=min_insync,
                     replica_timeout=TIMEOUT,
                     on_fenced=lambda shard, why: fenced.append((shard, why)))
    side.start()
    return World(tmp, peers, store, spool, side, follower, fenced)


@pytest.fixture
async def world2(tmp_path: Path) -> AsyncIterator[World]:
    """min_insync = 2: owner a and follower b must both hold what is acknowledged."""
    w = await _world(tmp_path, 2)
    yield w
    await w.side.stop()
    await w.spool.close()
    await w.follower.stop()


def identical(w: World, shard: int = 0) -> bool:
    """The follower's copy holds the owner's log byte for byte."""
    mine = shard_dir(w.spool.root, shard)
    theirs = shard_dir(w.follower.root, shard)
    segs = log_segments(mine)
    if [s[0] for s in log_segments(theirs)] != [s[0] for s in segs]:
        return False
    return all((mine / f"seg-{seq:08d}.log").read_bytes()
               == (theirs / f"seg-{seq:08d}.log").read_bytes() for seq, _, _ in segs)


def members(w: World, shard: int = 0) -> set[str]:
    return set(w.store.records[shard].members)


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
    await w.until(lambda: members(w) == {"a", "b"}, "b caught up and joined")
    assert rep.accepting
    ids = await submit_many(w, 60)
    assert len(set(ids)) == 60
    # Acknowledged means on b's disk: its durable copy already ends past every message.
    copy = w.follower.follower.copies[0]  # type: ignore[union-attr]
    assert copy.durable >= max(rep.replica.acknowledged, (0, 0))
    await w.until(lambda: identical(w), "b's copy is the owner's log")
    assert len(log_segments(shard_dir(w.spool.root, 0))) > 3, "segments rolled over"


async def test_an_unreachable_follower_is_dropped_and_the_shard_turns_read_only(
        world2: World) -> None:
    w = world2
    await w.shard()
    await w.until(lambda: members(w) == {"a", "b"}, "joined")
    await submit_many(w, 5)
    await w.follower.stop()  # its disk is there, but nobody answers
    pending = asyncio.ensure_future(w.spool.submit(envelope(1), b"after the follower left"))
    # Not acknowledged on one copy: the follower leaves the in-sync set first, and then the
    # shard has fewer than min_insync copies, so the waiting message gets a 451.
    with pytest.raises(ShardReadOnly):
        await asyncio.wait_for(pending, 10)
    assert members(w) == {"a"}
    with pytest.raises(ShardReadOnly):
        await w.spool.submit(envelope(2), b"x", w.spool.allocate_id())


async def test_a_follower_that_returns_catches_up_and_rejoins(world2: World) -> None:
    w = world2
    await w.shard()
    await w.until(lambda: members(w) == {"a", "b"}, "joined")
    await submit_many(w, 10)
    port = w.peers.addresses["b"][1]
    await w.follower.stop()
    await w.until(lambda: members(w) == {"a"}, "dropped")
    w.follower = await FollowerNode("b", w.tmp / "b").start(w.peers, port)
    await w.until(lambda: members(w) == {"a", "b"}, "rejoined after catching up")
    await submit_many(w, 10)
    await w.until(lambda: identical(w), "identical again")


async def test_a_replaced_disk_gets_a_full_copy_under_a_new_id(world2: World) -> None:
    w = world2
    await w.shard()
    await w.until(lambda: members(w) == {"a", "b"}, "joined")
    await submit_many(w, 30)
    old_id = w.store.records[0].members["b"]
    port = w.peers.addresses["b"][1]
    await w.follower.stop()
    shutil.rmtree(w.tmp / "b")
    w.follower = await FollowerNode("b", w.tmp / "b").start(w.peers, port)
    await w.until(lambda: members(w) == {"a", "b"} and w.store.records[0].members["b"] != old_id,
                  "the new disk joined under its own id")
    await w.until(lambda: identical(w), "a full copy")


async def test_a_stale_owner_collects_no_ack_once_a_newer_one_spoke(world2: World) -> None:
    w = world2
    await w.shard()
    await w.until(lambda: members(w) == {"a", "b"}, "joined")
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
        await w.until(lambda: w.follower.follower.copies[0].token == 20,  # type: ignore
                      "b follows token 20")
        with pytest.raises(FencedError):
            await asyncio.wait_for(w.spool.submit(envelope(9), b"from the zombie"), 10)
        assert w.fenced and w.fenced[0][0] == 0
    finally:
        await side_c.stop()
        await other.close()


async def test_a_shard_the_node_owns_itself_is_refused(world2: World) -> None:
    w = world2
    w.follower.owns.add(0)
    rep = await w.shard()
    await w.until(lambda: rep.streams["b"].retry_at > 0, "b said it owns shard 0")
    assert members(w) == {"a"}


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
