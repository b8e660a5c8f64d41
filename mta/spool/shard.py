"""One spool shard as the event loop sees it: appends, reads, segment deletion, compaction."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from mta.envelope import Envelope
from mta.logs import describe
from mta.spool import ownership
from mta.spool.errors import (
    FencedError,
    MessageNotFound,
    ShardReadOnly,
    SpoolError,
    SpoolWriteError,
)
from mta.spool.index import MessageRef, ShardIndex, labels_of, recipient_domains
from mta.spool.record import Kind, ScannedRecord, encode_done, encode_msg, encode_state, scan
from mta.spool.recovery import RecoveryReport, recover_shard
from mta.spool.segment import fsync_dir, read_range, segment_path, sync_segments
from mta.spool.shardlog import ShardLog
from mta.spool.sidelines import SideCheck, missing_lines
from mta.spool.writer import GroupCommitWriter, Position

__all__ = ["ReplicaGate", "Shard", "ShardClosed", "StoredMessage", "shard_dir"]

log = structlog.get_logger("mta.spool.shard")


class ShardClosed(SpoolError):
    """The shard is being released or was released; the caller must not use it."""


@dataclass(slots=True)
class StoredMessage:
    """A message read back from the spool."""

    id: str
    envelope: Envelope
    body: bytes
    state: dict[str, Any] | None


class ReplicaGate(Protocol):
    """What a replicated shard answers to (:class:`mta.replication.owner.ShardReplica`)."""

    @property
    def accepting(self) -> bool:
        """May new mail be taken (enough in-sync copies)?"""

    def written(self, seq: int, offset: int, data: bytes, records: int) -> None:
        """Event loop: ``data`` (``records`` log records) was written at ``(seq, offset)``
        (not yet synced)."""

    def synced(self, end: tuple[int, int]) -> None:
        """Event loop: the local log is durable up to ``end``."""

    def dropped(self, seqs: list[int]) -> None:
        """Event loop: these dead head segments were deleted (compaction)."""

    async def wait(self, end: tuple[int, int], reception: bool) -> None:
        """Return once ``end`` may be acknowledged (raises ShardReadOnly, FencedError)."""


def shard_dir(root: Path, number: int) -> Path:
    return root / f"shard-{number:03d}"


class Shard:
    """A shard this node owns. Create with :meth:`open`; all methods run on the event loop."""

    def __init__(self, number: int, root: Path, writer: GroupCommitWriter,
                 owner: ownership.OwnerToken, segment_size: int,
                 side: SideCheck | None = None) -> None:
        self.number = number
        self._side = side
        self.dir = shard_dir(root, number)
        self.owner = owner
        self._writer = writer
        self._segment_size = segment_size
        self.index = ShardIndex()
        self._log: ShardLog | None = None
        self._closing = False
        # Set when the node fences itself (cluster lease lost): no byte more into this shard.
        self.fenced = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Messages with a STATE or DONE on its way to disk: compaction leaves them alone, or
        # its copy could land after a DONE (resurrecting the message) or revert a state.
        self._pending: dict[str, int] = {}
        # Set when the shard is replicated: acknowledgements wait for the in-sync copies.
        self.replica: ReplicaGate | None = None
        # Opened to be replicated, its gate not installed yet (the owner side needs the
        # recovered log first): no new mail, and STATE/DONE wait, until replicate().
        self.awaiting_gate: asyncio.Event | None = None
        self._commit_end: Position = (0, 0)  # the end of the newest durable COMMIT

    async def open(self) -> RecoveryReport:
        """Claim the shard's owner file, recover its index from the segments, and give the
        side file the lines its last batches promised it but it never got."""
        report, missing = await asyncio.to_thread(self._open_blocking)
        if missing:
            report.side_recovered = missing.count(b"\n")
            log.warning("spool.side_lines_recovered", shard=self.number,
                        lines=report.side_recovered, bytes=len(missing))
            await self._append(b"", None, missing)
        return report

    def _open_blocking(self) -> tuple[RecoveryReport, bytes]:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Claim before scanning: a previous owner still running sees the new token and stops
        # appending, so nothing can land behind the scan.
        ownership.claim(self.dir, self.number, self.owner)
        self.index, report = recover_shard(self.dir, self.number)
        # The log may come from another process (the previous owner, or the copy this node
        # followed, promoted) and sit in the page cache only: durable before anything is
        # acknowledged on top of it (a DONE must never outlive the MSG it completes).
        sync_segments(self.dir)
        missing = missing_lines(report.commits, self._side) if self._side else b""
        self._log = ShardLog(self.dir, self.number, report.last_seq + 1, self.owner,
                             self._segment_size, self._note_commit)
        return report, missing

    async def start_term(self) -> None:
        """A bare COMMIT, now: the first write of this owner, in a segment of its own."""
        await self._append(b"", None)

    def _note_commit(self, seq: int, offset: int, size: int) -> None:
        self.index.note(seq, offset, size)
        self._commit_end = max(self._commit_end, (seq, offset + size))
        if self.replica is not None:
            self.replica.synced((seq, offset + size))

    def replicate(self, gate: ReplicaGate) -> None:
        """From now on, ship every write to ``gate`` and acknowledge only what it allows."""
        assert self._log is not None
        loop = asyncio.get_running_loop()
        self.replica = gate
        if self.awaiting_gate is not None:
            self.awaiting_gate.set()
            self.awaiting_gate = None

        def on_write(seq: int, offset: int, data: bytes, records: int) -> None:
            loop.call_soon_threadsafe(gate.written, seq, offset, data, records)

        self._log.on_write = on_write

    @property
    def accepting(self) -> bool:
        """May new mail be taken into this shard now?"""
        if self.awaiting_gate is not None:
            return False
        return self.replica is None or self.replica.accepting

    async def _replicated(self, pos: Position, size: int, reception: bool) -> None:
        if self.awaiting_gate is not None:
            await self.awaiting_gate.wait()
        if self.replica is not None:
            # Up to the end of the record's batch (its COMMIT), not of the record: a copy
            # that holds a record without its batch's COMMIT drops it when it is opened.
            # The batch committed before this append's future resolved, so the newest
            # COMMIT end is at or past it.
            await self.replica.wait(max((pos[0], pos[1] + size), self._commit_end), reception)

    # --- appends ---------------------------------------------------------------------------

    def _append(self, data: bytes, on_durable: Any, side: bytes | None = None,
                pending: str | None = None) -> asyncio.Future[Position]:
        """Queue ``data``; the future returned resolves once it is durable, and its awaiter
        may be cancelled without touching the append. ``pending``: a message id marked
        pending until the write ends (compaction must not move it meanwhile)."""
        if self.fenced:
            raise FencedError(self.number, "node is fenced (lease not provably held)")
        if self._closing or self._log is None:
            raise ShardClosed(f"shard {self.number} is not open for writing")
        # The writer resolves the caller's future in the same step as its own: no shield
        # (an outer future, two callbacks and a turn of the loop more per message).
        waiter = self._writer.create_future()
        fut = self._writer.append(self._log, data, on_durable, side, waiter)
        self._inflight += 1
        self._idle.clear()
        # Bookkeeping hangs off the writer's own future, which only the writer completes:
        # a cancelled caller must not mark the shard idle (close() would pull the fd from
        # under the writer) or drop the pending mark compaction relies on.
        if pending is not None:
            self._pending[pending] = self._pending.get(pending, 0) + 1
            fut.add_done_callback(lambda _f: self._unpend(pending))
        fut.add_done_callback(self._append_done)
        return waiter

    def _append_done(self, fut: asyncio.Future[Position]) -> None:
        if not fut.cancelled():
            fut.exception()  # the caller's own future carries it: this one is read, not lost
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def add(self, message_id: str, envelope: dict[str, Any], body: bytes,
                  after: Callable[[], None] | None = None, side: bytes | None = None) -> None:
        """Append a new message; returns once it is durable. ``after`` runs on the loop once
        it is, even if the caller was cancelled meanwhile (a client gone during the fsync)."""
        if self.awaiting_gate is not None:
            raise ShardReadOnly(self.number, "taken over, not replicating yet")
        if self.replica is not None and not self.replica.accepting:
            raise ShardReadOnly(self.number, "fewer in-sync copies than [spool] min_insync")
        data = encode_msg(message_id, envelope, body)
        size = len(data)
        index = self.index
        dests = recipient_domains(envelope["to"])
        labels = labels_of(envelope)

        def durable(pos: Position) -> None:
            index.on_msg(message_id, pos[0], pos[1], size, None, dests, labels)
            if after is not None:
                after()

        pos = await self._append(data, durable, side)
        if self.replica is not None or self.awaiting_gate is not None:
            await self._replicated(pos, size, reception=True)

    async def _append_tracked(self, message_id: str, data: bytes, durable: Any,
                              side: bytes | None = None) -> None:
        pos = await self._append(data, durable, side, pending=message_id)
        # A DONE counts only once every promotable copy has it: else a takeover by a copy
        # without it would deliver the recipient again.
        if self.replica is not None or self.awaiting_gate is not None:
            await self._replicated(pos, len(data), reception=False)

    def _unpend(self, message_id: str) -> None:
        left = self._pending.get(message_id, 0) - 1
        if left > 0:
            self._pending[message_id] = left
        else:
            self._pending.pop(message_id, None)

    async def set_state(self, message_id: str, state: dict[str, Any],
                        side: bytes | None = None) -> None:
        """Durably record a live message's new delivery state."""
        if message_id not in self.index.messages:
            raise MessageNotFound(message_id)
        data = encode_state(message_id, state)
        size = len(data)
        index = self.index

        def durable(pos: Position) -> None:
            index.on_state(message_id, pos[0], pos[1], size, state)

        await self._append_tracked(message_id, data, durable, side)

    async def done(self, message_id: str, side: bytes | None = None) -> None:
        """Durably mark a message finished; it is no longer live."""
        if message_id not in self.index.messages:
            raise MessageNotFound(message_id)
        data = encode_done(message_id)
        size = len(data)
        index = self.index

        def durable(pos: Position) -> None:
            index.on_done(message_id, pos[0], pos[1], size)

        await self._append_tracked(message_id, data, durable, side)

    # --- reads -----------------------------------------------------------------------------

    async def load(self, message_id: str) -> StoredMessage:
        """Read a live message's envelope and body back from its segment."""
        for _ in range(3):
            ref = self.index.messages.get(message_id)
            if ref is None:
                raise MessageNotFound(message_id)
            try:
                raw = await asyncio.to_thread(read_range, self.dir, ref.seq, ref.offset,
                                              ref.size)
            except FileNotFoundError:
                continue  # compaction moved it between lookup and read: look again
            rec = _single_record(raw, ref)
            meta = rec.meta
            body = raw[rec.body_offset:rec.body_offset + rec.body_len]
            return StoredMessage(message_id, Envelope.from_dict(meta[2]), body, ref.state)
        raise MessageNotFound(message_id)

    # --- housekeeping ----------------------------------------------------------------------

    async def collect(self) -> int:
        """Delete the dead sealed segments at the head of the log; return how many."""
        dead = self.index.dead_head()
        if not dead:
            return 0
        await asyncio.to_thread(self._unlink_segments, dead)
        for seq in dead:
            self.index.forget_segment(seq)
        if self.replica is not None:
            self.replica.dropped(dead)  # the copies drop them too
        log.debug("spool.segments_deleted", shard=self.number, segments=dead)
        return len(dead)

    def _unlink_segments(self, seqs: list[int]) -> None:
        for seq in seqs:
            try:
                os.unlink(segment_path(self.dir, seq))
            except FileNotFoundError:
                pass
            # Each deletion durable before the next (newer) one: no DONE may disappear while
            # the MSG it cancels could still come back after a crash, whatever order the
            # filesystem would otherwise persist unlinks in.
            fsync_dir(self.dir)

    async def compact(self, live_ratio: float) -> int:
        """Rewrite the live records of the oldest sealed segment when that frees enough space.

        The head is rewritten when its live bytes are under ``live_ratio`` of the bytes it
        keeps on disk (itself plus the dead segments queued behind it). Returns messages moved.
        """
        if self._closing:
            return 0
        index = self.index
        sealed = sorted(s for s in index.segments if s < index.sealed_below)
        if not sealed or index.segments[sealed[0]].refs == 0:
            return 0
        head = sealed[0]
        blocked = index.segments[head].end
        for seq in sealed[1:]:
            if index.segments[seq].refs > 0:
                break
            blocked += index.segments[seq].end
        if index.segments[head].live_bytes > live_ratio * blocked:
            return 0
        msgs, states = index.referencing(head)
        moved = 0
        for ref in msgs:
            if ref.id in self._pending or self._closing:
                continue
            moved += await self._move_message(ref, head)
        for ref in states:
            if ref.id in self._pending or self._closing or ref.state is None:
                continue
            if index.messages.get(ref.id) is ref and ref.state_seq == head:
                await self.set_state(ref.id, ref.state)
                moved += 1
        if moved:
            log.info("spool.compacted", shard=self.number, segment=head, moved=moved)
        return moved

    async def _move_message(self, ref: MessageRef, head: int) -> int:
        try:
            raw = await asyncio.to_thread(read_range, self.dir, ref.seq, ref.offset, ref.size)
        except OSError as exc:
            log.error("spool.compact.read_failed", shard=self.number, message_id=ref.id,
                      error=describe(exc))
            return 0
        rec = _single_record(raw, ref)
        # Re-check after the read: a DONE or STATE may have been queued meanwhile.
        if self.index.messages.get(ref.id) is not ref or ref.id in self._pending \
                or ref.seq != head:
            return 0
        body = raw[rec.body_offset:rec.body_offset + rec.body_len]
        data = encode_msg(ref.id, rec.meta[2], body, ref.state)
        size = len(data)
        index = self.index
        message_id, state = ref.id, ref.state

        def durable(pos: Position) -> None:
            if message_id in index.messages:
                index.on_msg(message_id, pos[0], pos[1], size, state)

        try:
            await self._append_tracked(message_id, data, durable)
        except SpoolWriteError as exc:
            log.warning("spool.compact.write_failed", shard=self.number, error=describe(exc))
            return 0
        return 1

    # --- release ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop taking appends, wait for those in flight, and close the active segment."""
        self._closing = True
        await self._idle.wait()
        if self._log is not None:
            log_ = self._log
            self._log = None
            await asyncio.to_thread(log_.close)


def _single_record(raw: bytes, ref: MessageRef) -> ScannedRecord:
    for item in scan(raw):
        if isinstance(item, ScannedRecord) and item.meta[0] == Kind.MSG and item.meta[1] == ref.id:
            return item
        break
    raise SpoolError(f"record of message {ref.id} at segment {ref.seq} offset {ref.offset} "
                     "failed verification")
