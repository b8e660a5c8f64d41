"""The follower side: owners' frames in, copies written, acks out.

One :class:`Follower` per node serves every connection the replication listener accepts. A
connection comes from one owner node and carries frames for any of the shards it owns;
frames are applied in arrival order through the node's :class:`CopyWriter` without waiting
for each to be durable (the writer group-commits), and each append's ack goes back when its
batch is synced: cumulative positions, echoing the catch-up plan (``stream``) the owner sent.

Refusals are answers, not errors: a frame under a token older than the copy has followed is
``nack stale`` with the newest token (a zombie owner learns it lost the shard and collects no
ack); a frame that does not land where the copy ends is ``nack position`` with the copy's end
(the owner restarts that stream); a shard this node owns itself is ``nack owner``; a copy
that is broken or cannot be opened (its followed token unreadable) is ``nack broken``. A
malformed header ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mta.logs import describe
from mta.replication import messages as m
from mta.replication.channel import Connection, ConnectionClosed
from mta.replication.copy import ShardCopy
from mta.replication.copywriter import CopyWriter
from mta.replication.errors import CopyBroken, CopyError, PositionMismatch, StaleToken
from mta.replication.frames import ReplicationError
from mta.replication.insync import NOTHING, Position

__all__ = ["Follower"]

log = structlog.get_logger("mta.replication.follower")

_MAX_INFLIGHT = 64 * 1024 * 1024  # bytes queued to the writer per connection before reading waits
_MAX_UNSENT = 4 * 1024 * 1024  # acks an owner has not read before its connection is dropped


@dataclass
class _Stream:
    """One owner's stream of one shard on one connection."""

    number: int = 0  # the catch-up plan the owner last sent
    acked: Position = NOTHING
    token: int = 0


@dataclass
class _Conn:
    conn: Connection
    streams: dict[int, _Stream] = field(default_factory=dict)
    inflight: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)


class Follower:
    """This node's copies of other nodes' shards, and the handler for their connections."""

    def __init__(self, node_id: str, root: Path, writer: CopyWriter,
                 owns: Callable[[int], bool], shards: int, idle_timeout: float = 60.0) -> None:
        self.node_id = node_id
        # An owner that says nothing this long is gone (its end dropped the connection
        # without a word reaching us): close ours, or each such partition leaks one.
        self.idle_timeout = idle_timeout
        self.shards = shards  # the spool's count: a frame for another shard is an error
        self.root = root
        self._writer = writer
        self._owns = owns
        self.copies: dict[int, ShardCopy] = {}
        self._opening: dict[int, asyncio.Future[ShardCopy]] = {}
        # Shards this node is taking over or owns: no copy is opened for them (the spool's
        # writer and the copy writer must never both write one directory).
        self._taken: set[int] = set()

    # --- the copies -------------------------------------------------------------------------

    async def copy(self, shard: int) -> ShardCopy:
        """The copy of ``shard``, opened (and cut to its last batch) on first use."""
        if (found := self.copies.get(shard)) is not None:
            return found
        fut = self._opening.get(shard)
        if fut is None:
            fut = self._opening[shard] = self._writer.open(self.root, shard)
        try:
            copy = await asyncio.shield(fut)
        finally:
            self._opening.pop(shard, None)
        if shard in self._taken:
            return copy  # taken over meanwhile: not kept (the caller refuses the frame)
        self.copies.setdefault(shard, copy)
        return self.copies[shard]

    async def release(self, shard: int) -> None:
        """Close the copy of ``shard`` and take no frame for it any more (this node is about
        to open it as owner): every frame queued before is applied first."""
        self._taken.add(shard)
        fut = self._opening.get(shard)
        if fut is not None:
            # An open that fails (an unreadable shard.follow) leaves nothing to release, and
            # must not stop this node from taking the shard over: an owner never reads it.
            with contextlib.suppress(CopyError, OSError):
                await asyncio.shield(fut)
        copy = self.copies.pop(shard, None)
        if copy is not None:
            await self._writer.release(copy)

    def resume(self, shard: int) -> None:
        """This node no longer owns ``shard``: it may follow it again (a fresh open: what
        was known of the copy before is stale, the owner wrote it since)."""
        self._taken.discard(shard)
        self.copies.pop(shard, None)

    # --- a connection -----------------------------------------------------------------------

    async def handle(self, conn: Connection) -> None:
        """Serve one owner's connection until it closes (the listener's handler)."""
        state = _Conn(conn)
        state.room.set()
        log.info("replication.owner_connected", node_id=self.node_id, peer=conn.peer)
        try:
            while True:
                await state.room.wait()
                async with asyncio.timeout(self.idle_timeout):
                    header, payload = await conn.recv()
                await self._dispatch(state, m.parse(header), payload)
        except ConnectionClosed:
            pass
        except TimeoutError:
            log.info("replication.owner_silent", node_id=self.node_id, peer=conn.peer,
                     seconds=self.idle_timeout)
        except ReplicationError as exc:
            log.warning("replication.owner_dropped", node_id=self.node_id, peer=conn.peer,
                        error=describe(exc))
        finally:
            log.info("replication.owner_disconnected", node_id=self.node_id, peer=conn.peer)
            conn.abort()

    async def _dispatch(self, state: _Conn, msg: m.Msg, payload: bytes) -> None:
        if msg.kind in (m.STATUS, m.ACK, m.NACK):
            raise m.BadMessage(f"{msg.kind} is a follower's message")
        if msg.shard >= self.shards:
            raise m.BadMessage(f"shard {msg.shard}: the spool has {self.shards} shards")
        stream = state.streams.setdefault(msg.shard, _Stream())
        if msg.shard in self._taken or self._owns(msg.shard):
            self._send(state, m.nack(msg.shard, msg.token, stream.number, "owner"))
            return
        try:
            copy = await self.copy(msg.shard)
        except CopyError as exc:
            # This shard's copy cannot be used (an unreadable shard.follow): refuse its
            # frames, not the connection the owner's other shards share.
            self._refuse(state, msg, exc)
            return
        if msg.shard in self._taken:  # taken over while the copy was opening
            self._send(state, m.nack(msg.shard, msg.token, stream.number, "owner"))
            return
        if msg.kind == m.HELLO:
            await self._hello(state, copy, msg)
        elif msg.kind == m.START:
            stream.number, stream.acked, stream.token = msg.stream, NOTHING, msg.token
            cut = self._writer.truncate(copy, *msg.cut, msg.token) if msg.cut is not None \
                else self._writer.accept_token(copy, msg.token)
            self._track(state, copy, msg, cut, 0)
        elif msg.kind == m.APPEND:
            if msg.position is None:
                raise m.BadMessage("append without a position")
            seq, offset = msg.position
            fut = self._writer.append(copy, msg.token, seq, offset, payload, msg.prev)
            self._track(state, copy, msg, fut, len(payload))
        elif msg.kind == m.DROP:
            self._track(state, copy, msg, self._writer.drop(copy, msg.seqs, msg.token), 0)
        else:  # ping: the durable position after everything queued before it
            self._track(state, copy, msg, self._writer.accept_token(copy, msg.token), 0)

    async def _hello(self, state: _Conn, copy: ShardCopy, msg: m.Msg) -> None:
        try:
            await self._writer.accept_token(copy, msg.token)
            segments = await self._writer.segments(copy)
        except CopyError as exc:
            self._refuse(state, msg, exc)
            return
        self._send(state, m.status(msg.shard, msg.token, copy.copy_id, segments))

    def _track(self, state: _Conn, copy: ShardCopy, msg: m.Msg, fut: asyncio.Future[Any],
               nbytes: int) -> None:
        """When ``fut`` (an op queued for ``copy``) is done, ack the copy's durable position
        or refuse; count its bytes against the connection's room meanwhile."""
        state.inflight += nbytes
        if state.inflight > _MAX_INFLIGHT:
            state.room.clear()

        def done(f: asyncio.Future[Any]) -> None:
            state.inflight -= nbytes
            if state.inflight <= _MAX_INFLIGHT:
                state.room.set()
            exc = f.exception() if not f.cancelled() else None
            stream = state.streams.get(msg.shard)
            if stream is None:
                return
            if exc is None and msg.token < copy.token:
                exc = StaleToken(copy.token)  # a newer owner spoke meanwhile: no ack for this
            if exc is not None:
                self._refuse(state, msg, exc)
                return
            durable = copy.durable
            if durable > stream.acked or msg.kind == m.PING:
                stream.acked = max(stream.acked, durable)
                self._send(state, m.ack(msg.shard, msg.token, stream.number, durable))

        fut.add_done_callback(done)

    def _refuse(self, state: _Conn, msg: m.Msg, exc: BaseException) -> None:
        number = state.streams.get(msg.shard, _Stream()).number
        if isinstance(exc, StaleToken):
            self._send(state, m.nack(msg.shard, msg.token, number, "stale", newest=exc.newest))
        elif isinstance(exc, PositionMismatch):
            self._send(state, m.nack(msg.shard, msg.token, number, "position",
                                     position=exc.expected))
        else:
            if isinstance(exc, CopyBroken):
                # Dropped from the copy so the next hello reopens it (reopening cuts the tail).
                self.copies.pop(msg.shard, None)
            log.error("replication.copy_failed", node_id=self.node_id, shard=msg.shard,
                      error=describe(exc))
            self._send(state, m.nack(msg.shard, msg.token, number, "broken"))

    @staticmethod
    def _send(state: _Conn, header: dict[str, Any]) -> None:
        try:
            if state.conn.buffered() > _MAX_UNSENT:
                # An owner that does not read our acks: drop it rather than buffer for ever.
                log.warning("replication.owner_not_reading", peer=state.conn.peer)
                state.conn.abort()
                return
            state.conn.send(header)
        except ConnectionClosed:
            pass
