"""The owner side: ship each shard's writes to its followers, and hold acknowledgements until
the in-sync set has them.

:class:`OwnerSide` is one per node: a long-lived connection per follower node (all shards
multiplexed), a clock that pings, proposes in-sync set changes and times out waiters. Each
owned shard has a :class:`ShardReplica`, which the spool's shard calls (it is its
:class:`mta.spool.shard.ReplicaGate`): the writer thread hands it every write (header or batch)
as it lands (before the local fdatasync: pipelining), the shard tells it what is durable
locally, and :meth:`ShardReplica.wait` returns once a position may be acknowledged. The
decisions are :class:`mta.replication.insync.OwnerReplica`'s; this module only moves bytes.

A follower is streamed to in three states: ``hello`` (asked for its copy), ``catchup`` (sent
its plan, reading the log from disk up to what is written) and ``live`` (each write is sent as
it lands). A follower that falls behind (a full send buffer, a gap) goes back to ``catchup``,
so a slow follower costs disk reads, never owner memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from mta.logs import describe
from mta.replication import messages as m
from mta.replication.channel import Connection, ConnectionClosed, connect
from mta.replication.copy import log_segments, read_log
from mta.replication.errors import PositionCompacted
from mta.replication.frames import ReplicationError
from mta.replication.insync import (
    NOTHING,
    OwnerReplica,
    Position,
    SegmentInfo,
    SyncRecord,
    plan_catch_up,
)
from mta.replication.lag import WriteMarks
from mta.replication.peerauth import PeerAuth
from mta.spool.errors import FencedError, ShardReadOnly

__all__ = ["NACK_REASONS", "SHARD_STATES", "OwnerEvents", "OwnerSide", "PeerDirectory",
           "ShardReplica", "SyncStore", "lag_bytes", "shard_state"]

log = structlog.get_logger("mta.replication.owner")

_SEND_LIMIT = 32 * 1024 * 1024  # unsent bytes to one follower before it goes back to catch-up
_PING_LIMIT = 1024 * 1024  # unsent bytes above which no ping or hello is queued
_READ_CHUNK = 1 << 20
_READ_BATCH = 8 << 20  # bytes read from disk per catch-up step before draining
_SIZES_KEPT = 4096  # segment sizes kept for the lag of a follower that acks nothing


class SyncStore(Protocol):
    """Where the in-sync record of each shard lives (etcd in a cluster)."""

    async def change(self, shard: int, old: SyncRecord, new: SyncRecord) -> SyncRecord | None:
        """Replace ``old`` by ``new`` if ``old`` is still the record and we still own the
        shard; the record now in place, or None if the change was refused or failed."""


class PeerDirectory(Protocol):
    """Where a node's replication listener is."""

    def address(self, node: str) -> tuple[str, int] | None:
        """``(host, port)`` of ``node``'s replication listener; None if unknown or gone."""


# What a follower's nack may say (mta.replication.follower); any other word is counted as
# "other", so a peer cannot grow the metric's label set.
NACK_REASONS = ("stale", "position", "owner", "broken", "other")


class OwnerEvents(Protocol):
    """What the owner side reports as it happens (the node counts it in its metrics; this
    package stays free of Prometheus)."""

    def insync_changed(self, change: str) -> None:
        """An in-sync set change committed: ``grow`` or ``shrink``."""

    def refused(self, reason: str) -> None:
        """A follower nacked: one of :data:`NACK_REASONS`."""


SHARD_STATES = ("in_sync", "under_replicated", "read_only")


def shard_state(members: int, replicas: int, min_insync: int) -> str:
    """The state of a shard whose in-sync set has ``members`` copies: ``in_sync``
    (``replicas`` copies), ``under_replicated`` (fewer, but at least ``min_insync``: it still
    takes mail) or ``read_only`` (fewer than ``min_insync``: new mail gets 451)."""
    if members >= replicas:
        return "in_sync"
    return "under_replicated" if members >= min_insync else "read_only"


def lag_bytes(end: Position, acked: Position, sizes: dict[int, int]) -> int:
    """Bytes of the owner's log from ``acked`` to ``end``: exact within one segment; across
    segments the sizes of the segments in between as ``sizes`` (seq -> size, the segments
    this owner has seen: those on disk when it opened the shard and those it wrote since)
    has them; a segment missing there (compacted away) counts 0."""
    if acked >= end:
        return 0
    if acked[0] == end[0]:
        return end[1] - acked[1]
    total = max(0, sizes.get(acked[0], 0) - acked[1])
    total += sum(size for seq, size in sizes.items() if acked[0] < seq < end[0])
    return total + end[1]


@dataclass
class _Stream:
    peer: str
    state: str = "idle"  # idle | hello | catchup | live
    sent: Position = NOTHING  # where the follower's copy ends once all we sent lands
    since: float = 0.0  # when the state began
    retry_at: float = 0.0
    task: asyncio.Task[None] | None = None


@dataclass
class _Waiter:
    end: Position
    reception: bool
    future: asyncio.Future[None]
    since: float


class ShardReplica:
    """Replication of one owned shard."""

    def __init__(self, side: OwnerSide, shard: int, token: int, directory: Path,
                 copy_id: str, record: SyncRecord, followers: list[str], end: Position,
                 sizes: dict[int, int] | None = None) -> None:
        self.side = side
        self.shard = shard
        self.token = token
        self.dir = directory
        self.replica = OwnerReplica(side.node_id, copy_id, record, side.min_insync,
                                    side.replica_timeout)
        self.replica.begin(end, side.clock())
        self.end = end
        # Segment sizes (seq -> bytes) for the lag in status(): those on disk at open, then
        # what the writer wrote.
        self.sizes = dict(sizes or {})
        self.marks = WriteMarks(end, side.clock())  # for the lag in records and age
        if end != NOTHING:
            self.sizes[end[0]] = max(self.sizes.get(end[0], 0), end[1])
        targets = [*followers, *record.members]
        self.streams = {p: _Stream(p) for p in dict.fromkeys(targets) if p != side.node_id}
        self._waiters: list[_Waiter] = []
        self._proposing: asyncio.Task[None] | None = None
        self.fenced: str | None = None  # why this owner may acknowledge nothing more
        self.closed = False
        self.read_only = False  # as last logged: fewer than min_insync in-sync copies
        self._note_read_only()

    # --- the spool's side (ReplicaGate) -------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """May new mail be taken into this shard (enough copies in the in-sync set)?"""
        return self.fenced is None and self.replica.accepting

    def written(self, seq: int, offset: int, data: bytes, records: int = 0) -> None:
        """The writer wrote ``data`` (``records`` records) at ``(seq, offset)`` (event loop,
        in write order)."""
        self.end = max(self.end, (seq, offset + len(data)))
        self.marks.wrote(self.end, records, self.side.clock())
        if seq not in self.sizes:
            self._prune_sizes(seq)
        self.sizes[seq] = max(self.sizes.get(seq, 0), offset + len(data))
        self.replica.wrote(self.end)
        for stream in self.streams.values():
            if stream.state != "live":
                continue
            conn = self.side.connection(stream.peer)
            follows = stream.sent == (seq, offset) or (offset == 0 and seq > stream.sent[0])
            if conn is None or not follows or conn.buffered() > _SEND_LIMIT:
                self._catch_up(stream)
                continue
            self._send(conn, m.append(self.shard, self.token, (seq, offset), stream.sent), data)
            stream.sent = (seq, offset + len(data))

    def dropped(self, seqs: list[int]) -> None:
        """Compaction deleted these dead head segments: followers delete them too (their
        copies follow the owner's), and a copy no longer needs them to join."""
        if not seqs:
            return
        self.replica.compacted((max(seqs) + 1, 0))
        for seq in seqs:
            self.sizes.pop(seq, None)
        for stream in self.streams.values():
            conn = self.side.connection(stream.peer)
            if stream.state == "live" and conn is not None:
                self._send(conn, m.drop(self.shard, self.token, sorted(seqs)))
        self._propose(self.side.clock())

    def synced(self, end: Position) -> None:
        """The local log is durable up to ``end``."""
        self.replica.synced(end)
        self._evaluate()

    async def wait(self, end: Position, reception: bool) -> None:
        """Return once ``end`` may be acknowledged: for new mail (``reception``) on
        ``min_insync`` copies, for STATE/DONE on every member. Raises
        :class:`ShardReadOnly` (answer 451) or :class:`FencedError`."""
        if self.fenced is not None:
            raise FencedError(self.shard, self.fenced)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(end, reception, fut, self.side.clock()))
        self._evaluate()
        await fut

    # --- decisions ---------------------------------------------------------------------------

    def _evaluate(self) -> None:
        if not self._waiters:
            return
        frontier, reception = self.replica.advance()
        keep = []
        for w in self._waiters:
            gate = reception if w.reception else frontier
            if w.future.done():
                continue
            if gate is not None and w.end <= gate:
                w.future.set_result(None)
            else:
                keep.append(w)
        self._waiters = keep

    def _fail_waiters(self, exc: Exception, only_reception: bool = False,
                      older_than: float | None = None) -> None:
        keep = []
        for w in self._waiters:
            if w.future.done():
                continue
            stale = older_than is None or w.since < older_than
            if (w.reception or not only_reception) and stale:
                w.future.set_exception(exc)
            else:
                keep.append(w)
        self._waiters = keep

    def tick(self, now: float) -> None:
        """The side's clock: new followers, hellos, pings, in-sync set changes, timeouts."""
        if self.closed or self.fenced is not None:
            return
        self._follow_placement()
        for stream in self.streams.values():
            conn = self.side.connection(stream.peer)
            if conn is None or conn.buffered() > _PING_LIMIT:
                continue  # a follower that does not read is not sent more
            if stream.state == "idle" and now >= stream.retry_at:
                self._hello(stream, conn, now)
            elif stream.state == "hello" and now - stream.since > self.side.replica_timeout:
                stream.state = "idle"  # no status: ask again
            elif stream.state == "live":
                self._send(conn, m.ping(self.shard, self.token))
        self._propose(now)
        self._note_read_only()
        # New mail that waited this long will not be acknowledged soon: 451, the sender
        # retries (perhaps to a healthier shard or node).
        self._fail_waiters(ShardReadOnly(self.shard, "not enough in-sync copies"),
                           only_reception=True, older_than=now - self.side.wait_timeout)
        self._evaluate()

    def _follow_placement(self) -> None:
        """Stream to the followers the leader places now (a node that joined the cluster
        after we opened the shard, a replacement for a dead one), and no longer to one it
        moved away that is no member (or no longer: the in-sync set pruned it)."""
        placed = self.side.followers(self.shard)
        for peer in placed:
            if peer != self.side.node_id and peer not in self.streams:
                self.streams[peer] = _Stream(peer)
                self.side.link(peer, self.shard)
                log.info("replication.follower_placed", node_id=self.side.node_id,
                         shard=self.shard, peer=peer)
        if not placed:
            return  # no placement known (yet): keep what we have
        keep = {*placed, *self.replica.record.members}
        if self.replica.proposed is not None:
            keep |= set(self.replica.proposed.members)
        for peer in [p for p in self.streams if p not in keep]:
            self._stop(self.streams.pop(peer))
            self.replica.forget(peer)
            self.side.unlink(peer, self.shard)
            log.info("replication.follower_unplaced", node_id=self.side.node_id,
                     shard=self.shard, peer=peer)

    def _propose(self, now: float) -> None:
        if self._proposing is not None:
            return
        new = self.replica.proposal(now, self.side.followers(self.shard), self.side.replicas)
        if new is None:
            return
        old = self.replica.record
        log.info("replication.insync_change", node_id=self.side.node_id, shard=self.shard,
                 members=sorted(new.members), was=sorted(old.members))
        self._proposing = asyncio.create_task(self._commit(old, new),
                                              name=f"replication:sync:{self.shard}")

    async def _commit(self, old: SyncRecord, new: SyncRecord) -> None:
        try:
            done = await self.side.store.change(self.shard, old, new)
        except Exception as exc:  # the store's failure is "not changed", never a crash
            log.warning("replication.insync_change_failed", node_id=self.side.node_id,
                        shard=self.shard, error=describe(exc))
            done = None
        self._proposing = None
        if done is not None and self.side.events is not None:
            grew, was = len(done.members), len(old.members)
            if grew != was:
                self.side.events.insync_changed("grow" if grew > was else "shrink")
        if not self.closed:
            self.replica.settled(done)
            self._note_read_only()
            if not self.replica.accepting and self.replica.proposed is None:
                # The set shrank below min_insync: mail waiting for its 250 will not get
                # one soon; 451 now (the sender retries, perhaps elsewhere), not after
                # wait_timeout.
                self._fail_waiters(ShardReadOnly(self.shard, "not enough in-sync copies"),
                                   only_reception=True)
            self._evaluate()

    def _note_read_only(self) -> None:
        """Log when the shard turns read-only (fewer than min_insync in-sync copies: new mail
        gets 451) and when it is writable again: once per change, not per tick."""
        read_only = not self.replica.accepting
        if read_only == self.read_only or self.closed:
            return
        self.read_only = read_only
        event = "replication.shard_read_only" if read_only else "replication.shard_writable"
        (log.warning if read_only else log.info)(
            event, node_id=self.side.node_id, shard=self.shard,
            members=sorted(self.replica.record.members), min_insync=self.side.min_insync)

    # --- followers ---------------------------------------------------------------------------

    def link_up(self, peer: str) -> None:
        if (stream := self.streams.get(peer)) is not None and not self.closed:
            stream.state, stream.retry_at = "idle", 0.0
            conn = self.side.connection(peer)
            if conn is not None and self.fenced is None:
                self._hello(stream, conn, self.side.clock())

    def link_down(self, peer: str) -> None:
        if (stream := self.streams.get(peer)) is not None:
            self._stop(stream)
            self.replica.disconnected(peer)

    def _hello(self, stream: _Stream, conn: Connection, now: float) -> None:
        stream.state, stream.since = "hello", now
        self._send(conn, m.hello(self.shard, self.token))

    def _stop(self, stream: _Stream, retry_in: float = 0.0) -> None:
        if stream.task is not None:
            stream.task.cancel()
            stream.task = None
        stream.state = "idle"
        stream.retry_at = self.side.clock() + retry_in

    def receive(self, peer: str, msg: m.Msg) -> None:
        """A follower's message for this shard."""
        stream = self.streams.get(peer)
        if stream is None or self.closed or msg.token != self.token:
            return
        now = self.side.clock()
        # Only acks keep a follower in the in-sync set: one that answers and never acks
        # (a nack loop, a broken disk) must time out like a silent one.
        if msg.kind == m.STATUS and stream.state == "hello":
            stream.state = "catchup"
            stream.task = asyncio.create_task(self._plan(stream, msg),
                                              name=f"replication:catchup:{self.shard}:{peer}")
        elif msg.kind == m.ACK:
            if msg.position is None:
                return
            if msg.position > stream.sent:
                # It cannot hold what we never sent it: a buggy or lying follower.
                log.warning("replication.ack_beyond_sent", node_id=self.side.node_id,
                            shard=self.shard, peer=peer, acked=msg.position, sent=stream.sent)
                self._stop(stream, self.side.replica_timeout)
                return
            self.replica.acked(peer, msg.position, now, msg.stream)
            self._evaluate()
        elif msg.kind == m.NACK:
            self._nacked(stream, msg)

    def _nacked(self, stream: _Stream, msg: m.Msg) -> None:
        # A stale-token nack does not fence this owner: one follower's word (it may be
        # poisoned by a bad peer) is not proof. It simply gives no ack; if another owner
        # really exists, our lease and owner key say so, and a shard that cannot collect
        # acks turns read-only meanwhile.
        log.info("replication.follower_refused", node_id=self.side.node_id, shard=self.shard,
                 peer=stream.peer, reason=msg.reason, position=msg.position)
        if self.side.events is not None:
            self.side.events.refused(msg.reason if msg.reason in NACK_REASONS else "other")
        retry = 0.0 if msg.reason == "position" else self.side.replica_timeout
        self._stop(stream, retry)

    def fence(self, why: str) -> None:
        """A newer owner exists (or this node lost the shard): acknowledge nothing more."""
        if self.fenced is None:
            self.fenced = why
            log.warning("replication.owner_fenced", node_id=self.side.node_id,
                        shard=self.shard, token=self.token, reason=why)
        self._fail_waiters(FencedError(self.shard, why))
        self.side.on_fenced(self.shard, why)

    async def _plan(self, stream: _Stream, status: m.Msg) -> None:
        try:
            mine = await asyncio.to_thread(log_segments, self.dir)
            plan = plan_catch_up([SegmentInfo(*s) for s in mine], list(status.segments))
            await self._stream_from(stream, status.copy_id, plan.truncate_to,
                                    plan.resume_from)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream starts again later, never hangs in catchup
            log.warning("replication.catchup_failed", node_id=self.side.node_id,
                        shard=self.shard, peer=stream.peer, error=describe(exc))
            self._stop(stream, self.side.replica_timeout)

    async def _stream_from(self, stream: _Stream, copy_id: str, cut: Position | None,
                           start: Position) -> None:
        conn = self.side.connection(stream.peer)
        if conn is None:
            self._stop(stream)
            return
        number = self.replica.connected(stream.peer, copy_id, self.side.clock())
        self._send(conn, m.start(self.shard, self.token, number, cut))
        stream.sent = start
        await self._read_on(stream, conn)

    def _catch_up(self, stream: _Stream) -> None:
        conn = self.side.connection(stream.peer)
        if conn is None:
            self._stop(stream)
            return
        stream.state = "catchup"
        stream.task = asyncio.create_task(self._read_on(stream, conn),
                                          name=f"replication:catchup:{self.shard}:{stream.peer}")

    async def _read_on(self, stream: _Stream, conn: Connection) -> None:
        """Send the log from ``stream.sent`` up to what is written, then go live."""
        try:
            while stream.sent < self.end:
                await conn.drain()
                chunks = await asyncio.to_thread(_read_some, self.dir, stream.sent, self.end)
                for seq, offset, data in chunks:
                    self._send(conn, m.append(self.shard, self.token, (seq, offset),
                                              stream.sent), data)
                    stream.sent = (seq, offset + len(data))
            stream.state, stream.task = "live", None
        except PositionCompacted:
            # Compaction took the segment we were at: start that follower afresh.
            self._stop(stream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # closed, I/O, a log that does not read: start again later
            log.info("replication.catchup_stopped", node_id=self.side.node_id,
                     shard=self.shard, peer=stream.peer, error=describe(exc))
            self._stop(stream, self.side.replica_timeout)

    @staticmethod
    def _send(conn: Connection, header: dict[str, object], payload: bytes = b"") -> None:
        with contextlib.suppress(ConnectionClosed):
            conn.send(header, payload)

    def close(self) -> None:
        """Stop replicating (the shard is released); waiters fail."""
        self.closed = True
        for stream in self.streams.values():
            self._stop(stream)
        if self._proposing is not None:
            self._proposing.cancel()
        self._fail_waiters(FencedError(self.shard, "shard released"))

    def _prune_sizes(self, newest: int) -> None:
        """Forget the sizes of segments every follower has acked past (and keep a bounded
        number whatever happens: an older one then counts 0 in the lag)."""
        acked = self.replica.lagging()
        # The slowest follower's position (none streamed to: the end, in segment ``newest``).
        slowest = min((acked.get(p, NOTHING) for p in self.streams), default=self.end)
        for seq in [q for q in self.sizes if q < slowest[0] or q <= newest - _SIZES_KEPT]:
            del self.sizes[seq]
        self.marks.prune(slowest)

    def lag(self) -> dict[str, int]:
        """Per follower streamed to: bytes of the log it has not acked (:func:`lag_bytes`)."""
        acked = self.replica.lagging()
        return {p: lag_bytes(self.end, acked.get(p, NOTHING), self.sizes)
                for p in sorted(self.streams)}

    def status(self) -> dict[str, object]:
        """Members, followers' acked positions, lag (bytes, :func:`lag_bytes`) and states,
        for mtactl shards and metrics."""
        acked, lag, now = self.replica.lagging(), self.lag(), self.side.clock()
        followers: dict[str, object] = {}
        for p, s in sorted(self.streams.items()):
            records, age = self.marks.lag(acked.get(p, NOTHING), now)
            followers[p] = {"state": s.state, "connected": self.side.connection(p) is not None,
                            "acked": list(acked.get(p, NOTHING)), "lag_bytes": lag[p],
                            "lag_records": records, "lag_age": round(age, 3)}
        return {"token": self.token, "members": sorted(self.replica.record.members),
                "accepting": self.accepting, "end": list(self.end), "followers": followers}


def _read_some(directory: Path, start: Position, end: Position
               ) -> list[tuple[int, int, bytes]]:
    out, total = [], 0
    for chunk in read_log(directory, start, end, _READ_CHUNK):
        out.append(chunk)
        total += len(chunk[2])
        if total >= _READ_BATCH:
            break
    return out


@dataclass
class _Peer:
    node: str
    conn: Connection | None = None
    task: asyncio.Task[None] | None = None
    shards: set[int] = field(default_factory=set)


class OwnerSide:
    """This node as the owner of replicated shards."""

    def __init__(self, node_id: str, auth: PeerAuth, peers: PeerDirectory, store: SyncStore,
                 *, min_insync: int, replica_timeout: float, replicas: int = 0,
                 on_fenced: Callable[[int, str], None] | None = None,
                 followers: Callable[[int], tuple[str, ...]] | None = None,
                 events: OwnerEvents | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.auth = auth
        self.peers = peers
        self.store = store
        self.min_insync = min_insync
        # Copies a shard should have; the in-sync set is pruned back to it after a move (0:
        # never pruned).
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self.wait_timeout = 2 * replica_timeout
        self.clock = clock
        self.events = events
        self._on_fenced = on_fenced
        # The leader's current placement of each shard's followers (replicas/<shard>).
        self.followers: Callable[[int], tuple[str, ...]] = followers or (lambda _s: ())
        self.shards: dict[int, ShardReplica] = {}
        self._peers: dict[str, _Peer] = {}
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick_loop(), name="replication:ticker")

    def open(self, shard: int, token: int, directory: Path, copy_id: str, record: SyncRecord,
             followers: list[str], end: Position,
             sizes: dict[int, int] | None = None) -> ShardReplica:
        """Replicate ``shard`` (just opened as owner under ``token``, its log ending at
        ``end``, its segments' sizes ``sizes``) to ``followers`` and the record's members."""
        rep = ShardReplica(self, shard, token, directory, copy_id, record, followers, end,
                           sizes)
        self.shards[shard] = rep
        for peer in rep.streams:
            self.link(peer, shard)
        return rep

    def link(self, peer: str, shard: int) -> None:
        """Have a connection to ``peer`` serve ``shard`` (made if there is none yet)."""
        link = self._peers.get(peer)
        if link is None:
            link = self._peers[peer] = _Peer(peer)
            link.task = asyncio.create_task(self._link_loop(link),
                                            name=f"replication:link:{peer}")
        link.shards.add(shard)
        if link.conn is not None and (rep := self.shards.get(shard)) is not None:
            rep.link_up(peer)

    def unlink(self, peer: str, shard: int) -> None:
        """``shard`` no longer streams to ``peer`` (the connection stays for the others)."""
        if (link := self._peers.get(peer)) is not None:
            link.shards.discard(shard)

    def close_shard(self, shard: int) -> None:
        rep = self.shards.pop(shard, None)
        if rep is not None:
            rep.close()
        for link in self._peers.values():
            link.shards.discard(shard)

    def connection(self, peer: str) -> Connection | None:
        link = self._peers.get(peer)
        return None if link is None or link.conn is None or link.conn.closed else link.conn

    def connected_followers(self) -> int:
        """Follower nodes this owner has a live replication connection to."""
        return sum(1 for peer in self._peers if self.connection(peer) is not None)

    def shard_states(self, replicas: int) -> dict[str, int]:
        """How many owned shards are in each of :data:`SHARD_STATES` (:func:`shard_state`)."""
        out = dict.fromkeys(SHARD_STATES, 0)
        for rep in self.shards.values():
            out[shard_state(len(rep.replica.record.members), replicas, self.min_insync)] += 1
        return out

    def follower_lag(self) -> dict[str, int]:
        """Per follower node: the most bytes it lacks of any shard this node owns."""
        out: dict[str, int] = {}
        for rep in self.shards.values():
            for peer, lag in rep.lag().items():
                out[peer] = max(out.get(peer, 0), lag)
        return dict(sorted(out.items()))

    def on_fenced(self, shard: int, why: str) -> None:
        if self._on_fenced is not None:
            self._on_fenced(shard, why)

    async def stop(self) -> None:
        for shard in list(self.shards):
            self.close_shard(shard)
        tasks = [t for t in (self._ticker, *(p.task for p in self._peers.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._peers.values():
            if link.conn is not None:
                link.conn.abort()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.replica_timeout / 4)
            now = self.clock()
            for rep in list(self.shards.values()):
                rep.tick(now)

    async def _link_loop(self, link: _Peer) -> None:
        """Keep a connection to ``link.node`` while any owned shard streams to it."""
        backoff = 0.05
        while True:
            address = self.peers.address(link.node)
            if address is None:
                await asyncio.sleep(self.replica_timeout)
                continue
            try:
                conn = await connect(*address, self.auth, link.node,
                                     timeout=max(self.replica_timeout, 1.0))
            except ReplicationError as exc:
                log.info("replication.connect_failed", node_id=self.node_id, peer=link.node,
                         error=describe(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.replica_timeout)
                continue
            backoff = 0.05
            link.conn = conn
            for shard in list(link.shards):
                if (rep := self.shards.get(shard)) is not None:
                    rep.link_up(link.node)
            await self._read_link(link, conn)
            link.conn = None
            for shard in list(link.shards):
                if (rep := self.shards.get(shard)) is not None:
                    rep.link_down(link.node)

    async def _read_link(self, link: _Peer, conn: Connection) -> None:
        # A follower that says nothing (no ack to our pings, no status) for this long is
        # gone, whatever TCP says: drop the connection, the link loop dials again.
        silence = max(2 * self.replica_timeout, 1.0)
        try:
            while True:
                try:
                    async with asyncio.timeout(silence):
                        header, _ = await conn.recv()
                except TimeoutError:
                    if not link.shards:
                        continue
                    log.warning("replication.follower_silent", node_id=self.node_id,
                                peer=link.node, seconds=silence)
                    return
                msg = m.parse(header)
                if (rep := self.shards.get(msg.shard)) is not None:
                    rep.receive(link.node, msg)
        except ConnectionClosed:
            pass
        except ReplicationError as exc:
            log.warning("replication.follower_dropped", node_id=self.node_id, peer=link.node,
                        error=describe(exc))
        finally:
            conn.abort()
