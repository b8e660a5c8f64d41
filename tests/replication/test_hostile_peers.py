"""Peers that know the cluster secret but misbehave (a zombie owner, a buggy or lying node):
they must never make a follower lose what it holds for the current owner, nor make an owner
answer 250 on a copy that does not exist. Real sockets, real copies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mta.replication import messages as m
from mta.replication.channel import Connection, ConnectionClosed, connect, serve
from mta.replication.errors import FollowUnreadable
from mta.replication.messages import BadMessage, parse
from mta.replication.owner import OwnerSide
from mta.replication.peerauth import PeerAuth
from mta.spool import Spool
from mta.spool.errors import ShardReadOnly
from mta.spool.record import encode_commit, encode_segment_header
from tests.support.replication import (
    SECRET,
    FollowerNode,
    MemorySyncStore,
    Peers,
    envelope,
    open_owner,
)


@pytest.fixture
async def follower(tmp_path: Path) -> AsyncIterator[FollowerNode]:
    node = await FollowerNode("b", tmp_path / "b").start(Peers())
    yield node
    await node.stop()


async def dial(node: FollowerNode, as_node: str) -> Connection:
    assert node.listener is not None
    return await connect("127.0.0.1", node.listener.port, PeerAuth(as_node, secret=SECRET),
                         "b", 3)


async def ask(conn: Connection, header: dict[str, Any], payload: bytes = b"") -> m.Msg:
    conn.send(header, payload)
    async with asyncio.timeout(5):
        raw, _ = await conn.recv()
    return parse(raw)


def first_segment(token: int) -> bytes:
    """A segment as an owner opens it: its header, then one empty batch's COMMIT."""
    return encode_segment_header(0, 1, "a", token) + encode_commit({}, b"")


async def test_a_stale_owner_can_neither_cut_drop_nor_collect_acks(
        follower: FollowerNode) -> None:
    owner = await dial(follower, "a")
    assert (await ask(owner, m.hello(0, 10))).kind == m.STATUS
    owner.send(m.start(0, 10, 1, None))  # nothing to cut: no answer of its own
    data = first_segment(10)
    ack = await ask(owner, m.append(0, 10, (1, 0), (0, 0)), data)
    assert ack.kind == m.ACK and ack.position == (1, len(data))

    zombie = await dial(follower, "z")
    for header in (m.start(0, 9, 1, (0, 0)), m.drop(0, 9, [1]), m.hello(0, 9),
                   m.ping(0, 9), m.append(0, 9, (1, len(data)), (1, len(data)))):
        answer = await ask(zombie, header, b"x" if header["k"] == m.APPEND else b"")
        assert answer.kind == m.NACK and answer.reason == "stale", (header, answer)
        assert answer.newest == 10
    copy = follower.follower.copies[0]  # type: ignore[union-attr]
    assert copy.position == (1, len(data)), "nothing cut, dropped or appended"
    await owner.close()
    await zombie.close()


async def test_a_copy_whose_follow_file_was_torn_follows_no_owner(tmp_path: Path) -> None:
    """b followed shard 0 under token 10; a crash tore its shard.follow. A stale owner (9)
    must not be taken for the current one: the copy follows nobody (nack broken, a warning
    naming the file), its bytes stay, and the connection still serves the other shard."""
    peers = Peers()
    first = await FollowerNode("b", tmp_path / "b").start(peers)
    owner = await dial(first, "a")
    assert (await ask(owner, m.hello(0, 10))).kind == m.STATUS
    owner.send(m.start(0, 10, 1, None))
    data = first_segment(10)
    assert (await ask(owner, m.append(0, 10, (1, 0), (0, 0)), data)).kind == m.ACK
    await owner.close()
    await first.stop()
    directory = tmp_path / "b" / "shard-000"
    (directory / "shard.follow").write_bytes(b'{"tok')  # torn by the crash
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    with capture_logs() as logs:
        node = await FollowerNode("b", tmp_path / "b").start(peers)
        try:
            zombie = await dial(node, "z")
            for header in (m.hello(0, 9), m.start(0, 9, 1, (1, 0)), m.drop(0, 9, [1]),
                           m.append(0, 9, (1, len(data)), (1, len(data))), m.hello(0, 10)):
                answer = await ask(zombie, header, b"x" if header["k"] == m.APPEND else b"")
                assert answer.kind == m.NACK and answer.reason == "broken", (header, answer)
            assert (await ask(zombie, m.hello(1, 9))).kind == m.STATUS  # shard 1 still served
            await zombie.close()
        finally:
            await node.stop()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    warned = [e for e in logs if e["event"] == "replication.copy_follow_unreadable"]
    assert warned and all(e["file"] == str(directory / "shard.follow") for e in warned)


async def test_a_copy_that_cannot_open_does_not_stop_a_takeover(tmp_path: Path) -> None:
    """The node is promoted while a frame is opening a copy whose shard.follow is torn:
    release (before the node opens the shard as owner, which never reads that file) must
    not fail with the open."""
    directory = tmp_path / "b" / "shard-000"
    directory.mkdir(parents=True)
    (directory / "shard.follow").write_bytes(b"garbage")
    node = await FollowerNode("b", tmp_path / "b").start(Peers())
    try:
        assert node.follower is not None
        opening = asyncio.create_task(node.follower.copy(0))
        await asyncio.sleep(0)  # one step: the open is queued to the copy writer
        await node.follower.release(0)
        with pytest.raises(FollowUnreadable):
            await opening
        assert 0 not in node.follower.copies
    finally:
        await node.stop()


async def test_frames_for_a_shard_the_spool_does_not_have_end_the_connection(
        follower: FollowerNode, tmp_path: Path) -> None:
    conn = await dial(follower, "a")
    conn.send(m.hello(2, 10))  # the follower's spool has shards 0 and 1
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionClosed):
            await conn.recv()
    assert not (tmp_path / "b" / "shard-002").exists()


async def test_an_owner_that_goes_silent_is_disconnected(follower: FollowerNode) -> None:
    """A peer that authenticates and then says nothing (its end of a partition lost the
    connection) does not hold a connection and its task for ever."""
    assert follower.follower is not None
    follower.follower.idle_timeout = 0.3
    conn = await dial(follower, "a")
    async with asyncio.timeout(5):
        with pytest.raises(ConnectionClosed):
            await conn.recv()


@pytest.mark.parametrize("header", [
    {"k": "hello", "s": -1, "t": 1},
    {"k": "hello", "s": 0, "t": True},
    {"k": "bogus", "s": 0, "t": 1},
    {"k": "append", "s": 0, "t": 1, "q": [1, 2, 3]},
    {"k": "append", "s": 0, "t": 1, "q": [10**8, 0]},
    {"k": "status", "s": 0, "t": 1, "g": [[1, 2]]},
    {"k": "drop", "s": 0, "t": 1, "d": "1"},
    {"k": "ack", "s": 0, "t": 1.5},
])
def test_malformed_headers_are_refused(header: dict[str, Any]) -> None:
    with pytest.raises(BadMessage):
        parse(header)


def test_an_unreadable_segment_header_token_is_kept_as_minus_one() -> None:
    msg = parse({"k": "status", "s": 0, "t": 1, "c": "x", "g": [[1, -1, 5]]})
    assert msg.segments[0].token == -1


async def test_an_owner_counts_no_ack_beyond_what_it_sent(tmp_path: Path) -> None:
    """A lying follower that acks positions it was never sent gets no vote: the shard stays
    on one copy (read-only with min_insync = 2) instead of answering 250."""
    async def liar(conn: Connection) -> None:
        while True:
            header, _ = await conn.recv()
            msg = parse(header)
            if msg.kind == m.HELLO:
                conn.send(m.status(msg.shard, msg.token, "liar-copy", []))
            else:
                conn.send(m.ack(msg.shard, msg.token, msg.stream or 1, (2**40, 0)))

    listener = await serve("127.0.0.1", 0, PeerAuth("b", secret=SECRET), liar)
    peers, store = Peers({"b": ("127.0.0.1", listener.port)}), MemorySyncStore()
    spool = Spool(tmp_path / "a", "a", shards=2)
    await spool.start()
    side = OwnerSide("a", PeerAuth("a", secret=SECRET), peers, store, min_insync=2,
                     replica_timeout=0.3)
    side.start()
    try:
        rep = await open_owner(spool, side, store, 0, 10, ["b"])
        async with asyncio.timeout(5):
            while rep.streams["b"].retry_at == 0:  # its lie was seen and the stream stopped
                await asyncio.sleep(0.01)
        assert set(store.records[0].members) == {"a"}
        with pytest.raises(ShardReadOnly):
            await spool.submit(envelope(), b"x", spool.allocate_id())
    finally:
        await side.stop()
        await spool.close()
        await listener.close()
