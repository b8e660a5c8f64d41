"""The spool: the shards this node owns, one group-commit writer, and the read/write API."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from mta.envelope import Envelope, new_message_id, received_at_of, shard_of
from mta.logs import describe
from mta.spool import layout, ownership
from mta.spool.errors import MessageNotFound, NoShardsOwned, ShardLockedError, SpoolError
from mta.spool.index import MessageRef
from mta.spool.recovery import RecoveryReport
from mta.spool.shard import ReplicaGate, Shard, ShardClosed, StoredMessage, shard_dir
from mta.spool.sidelines import SideCheck
from mta.spool.writer import BatchObserver, GroupCommitWriter, SideFile

__all__ = ["SideLog", "Spool"]

log = structlog.get_logger("mta.spool")


class SideLog(SideFile, SideCheck, Protocol):
    """Lines about messages (the accounting log) that must reach their own file in the same
    group commit as the spool record they describe: never before it, never lost after it.
    A new message's lines come from here; the lines of a state change come with the write
    that records it (``lines=``)."""

    def reception(self, message_id: str, envelope: Envelope, size: int) -> bytes | None:
        """The lines for a new message about to be stored."""


class Spool:
    """Durable, sharded message store.

    ``submit`` returns only after the message is on disk. New messages go to the owned shards
    in turn, moving to the next shard once per group-commit batch: each batch then costs one
    ``fdatasync`` instead of one per shard it touches.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        node_id: str,
        *,
        shards: int = 64,
        segment_size: int = 64 * 1024 * 1024,
        max_batch_bytes: int = 8 * 1024 * 1024,
        exclusive: bool = True,
        observe_batch: BatchObserver | None = None,
        on_recovered: Callable[[RecoveryReport], None] | None = None,
        hot_cache_bytes: int = 64 * 1024 * 1024,
        on_new_message: Callable[[str, Envelope, int], None] | None = None,
        side_log: SideLog | None = None,
    ) -> None:
        self.root = Path(root)
        self.node_id = node_id
        self.total_shards = shards
        self._segment_size = segment_size
        self._max_batch_bytes = max_batch_bytes
        self._exclusive = exclusive
        self._observe_batch = observe_batch
        self._on_recovered = on_recovered
        self._shards: dict[int, Shard] = {}
        self._order: list[int] = []
        self._cursor = 0
        self._writer: GroupCommitWriter | None = None
        self._lock_fd: int | None = None
        # Messages just accepted, kept in memory for their first delivery attempt so the
        # common path never reads back what it wrote a moment ago. Bounded by bytes.
        self._hot: OrderedDict[str, tuple[Envelope, bytes]] = OrderedDict()
        self._hot_bytes = 0
        self._hot_limit = hot_cache_bytes
        self.fenced = False
        # Told about every new message once it is durable, even if the submitter went away
        # meanwhile (so it is scheduled and accounted for, never orphaned until a restart).
        self.on_new_message = on_new_message
        self._side_log = side_log

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the spool root, take the standalone lock, start the writer thread."""
        await asyncio.to_thread(self._prepare_root)
        # After the lock: a spool reopened with another shard count would hide mail.
        await asyncio.to_thread(layout.ensure_shard_count, self.root, self.total_shards)
        self._writer = GroupCommitWriter(
            asyncio.get_running_loop(), self._max_batch_bytes, self._observe_batch,
            self._next_ingress_shard, self._side_log,
        )

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._exclusive:
            return
        # Standalone: two processes on one spool would interleave appends. (In a cluster the
        # etcd owner keys and shard.owner fencing tokens do this job per shard instead.)
        fd = os.open(self.root / "spool.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ShardLockedError(
                f"spool {self.root} is in use by another mta process (pid {holder}); "
                "stop it or point [spool] path elsewhere"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    async def close(self) -> None:
        """Release every shard (waiting for in-flight appends), then stop the writer."""
        for number in list(self._shards):
            await self.release_shard(number)
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- ownership -------------------------------------------------------------------------

    async def acquire_shard(self, number: int, token: int,
                            replicated: bool = False) -> RecoveryReport:
        """Take a shard: claim its owner file with ``token``, recover it, accept writes.
        ``replicated``: no new mail, and no STATE or DONE acknowledged, until
        :meth:`replicate` installs its gate (else a 250 could come from this copy alone)."""
        if self._writer is None:
            raise SpoolError("spool is not started")
        if not 0 <= number < self.total_shards:
            raise SpoolError(f"shard {number} out of range 0..{self.total_shards - 1}")
        if number in self._shards:
            raise SpoolError(f"shard {number} is already open")
        shard = Shard(number, self.root, self._writer,
                      ownership.OwnerToken(self.node_id, token), self._segment_size,
                      self._side_log)
        t0 = time.perf_counter()
        if replicated:
            shard.awaiting_gate = asyncio.Event()
        report = await shard.open()
        shard.fenced = self.fenced
        self._shards[number] = shard
        self._order = sorted(self._shards)
        log.debug("spool.shard_acquired", shard=number, token=token, live=report.live,
                 segments=report.segments, corrupt=len(report.corrupt),
                 truncated=len(report.truncated),
                 seconds=round(time.perf_counter() - t0, 3))
        if self._on_recovered is not None:
            self._on_recovered(report)
        return report

    async def recorded_token(self, number: int) -> int:
        """The fencing token in the shard's owner file, 0 when it has none."""
        owner = await asyncio.to_thread(ownership.read_owner, shard_dir(self.root, number))
        return owner.token if owner is not None else 0

    async def release_shard(self, number: int) -> None:
        """Stop writing a shard; returns when its in-flight appends are settled."""
        shard = self._shards.pop(number, None)
        self._order = sorted(self._shards)
        for mid in [m for m in self._hot if shard_of(m) == number]:
            self._unhot(mid)
        if shard is not None:
            await shard.close()
            log.debug("spool.shard_released", shard=number)

    def fence(self, fenced: bool) -> None:
        """Refuse (or allow again) every append to the open shards, at once."""
        self.fenced = fenced
        for shard in self._shards.values():
            shard.fenced = fenced

    @property
    def owned(self) -> list[int]:
        return list(self._order)

    def owns(self, number: int) -> bool:
        """Is shard ``number`` open for writing here?"""
        return number in self._shards

    def fence_shard(self, number: int) -> None:
        """Refuse every append to shard ``number`` from now on (it has a newer owner)."""
        if (shard := self._shards.get(number)) is not None:
            shard.fenced = True

    # --- writes ----------------------------------------------------------------------------

    def _next_ingress_shard(self) -> None:
        self._cursor += 1

    def allocate_id(self) -> str:
        """A new message id in the shard that takes new messages now: the next one in turn
        that is not read-only (too few in-sync copies), so one sick shard does not stop the
        node accepting; if every shard is read-only, the next in turn (it will answer 451)."""
        order = self._order
        if not order:
            raise NoShardsOwned("this node owns no spool shard right now")
        start = self._cursor % len(order)
        for step in range(len(order)):
            shard = self._shards[order[(start + step) % len(order)]]
            if shard.accepting:
                return new_message_id(shard.number)
        return new_message_id(order[start])

    def replicate(self, number: int, gate: ReplicaGate) -> None:
        """Replicate the open shard ``number`` through ``gate`` from now on."""
        shard = self._shards.get(number)
        if shard is None:
            raise SpoolError(f"shard {number} is not open")
        shard.replicate(gate)

    async def start_term(self, number: int) -> None:
        """Write a bare COMMIT into the open shard ``number`` (a new owner's first write
        opens a segment of its own under its token); returns once it is durable."""
        shard = self._shards.get(number)
        if shard is None:
            raise SpoolError(f"shard {number} is not open")
        await shard.start_term()

    async def submit(self, envelope: Envelope, body: bytes, message_id: str | None = None) -> str:
        """Store a new message durably; return its id once it is fsynced.

        ``message_id`` comes from :meth:`allocate_id` when the caller needs the id before
        storing (the ingress puts it in the ``Received:`` header).
        """
        if message_id is None:
            message_id = self.allocate_id()
        shard = self._shards.get(shard_of(message_id))
        if shard is None:
            raise ShardClosed(f"shard of {message_id} is not owned by this node")
        mid = message_id
        side = self._side_log.reception(mid, envelope, len(body)) if self._side_log else None
        await shard.add(mid, envelope.to_dict(), body,
                        after=lambda: self._new_message(mid, envelope, body), side=side)
        return message_id

    def _new_message(self, message_id: str, envelope: Envelope, body: bytes) -> None:
        if self._hot_limit:
            self._hot[message_id] = (envelope, body)
            self._hot_bytes += len(body)
            while self._hot_bytes > self._hot_limit and self._hot:
                self._unhot(next(iter(self._hot)))
        if self.on_new_message is not None:
            self.on_new_message(message_id, envelope, len(body))

    def _unhot(self, message_id: str) -> None:
        entry = self._hot.pop(message_id, None)
        if entry is not None:
            self._hot_bytes -= len(entry[1])

    def _shard_for(self, message_id: str) -> Shard:
        shard = self._shards.get(shard_of(message_id))
        if shard is None:
            raise MessageNotFound(message_id)
        return shard

    async def update_state(self, message_id: str, state: dict[str, Any],
                           lines: bytes | None = None) -> None:
        """Durably record the delivery state of a live message, with ``lines`` for the side
        log in the same group commit (written if, and only if, the state is). ``state`` is
        opaque here: whatever the caller gets back from :meth:`load` later."""
        shard = self._shard_for(message_id)
        await shard.set_state(message_id, state, lines or None)
        # A recorded state means an attempt ended short of done: the retry is minutes away,
        # so the body goes back to disk and the cache keeps serving first attempts.
        self._unhot(message_id)

    async def mark_done(self, message_id: str, lines: bytes | None = None) -> None:
        """Durably finish a message (every recipient has its final outcome), with ``lines``
        for the side log in the same group commit."""
        shard = self._shard_for(message_id)
        await shard.done(message_id, lines or None)
        self._unhot(message_id)

    # --- reads -----------------------------------------------------------------------------

    async def load(self, message_id: str) -> StoredMessage:
        """Envelope, body and state of a live message in an owned shard."""
        shard = self._shard_for(message_id)
        hot = self._hot.get(message_id)
        ref = shard.index.messages.get(message_id)
        if hot is not None and ref is not None:
            return StoredMessage(message_id, hot[0], hot[1], ref.state)
        return await shard.load(message_id)

    def live_messages(self, number: int) -> list[MessageRef]:
        """The live messages of an owned shard (index entries, no body)."""
        shard = self._shards.get(number)
        return list(shard.index.messages.values()) if shard else []

    def live_ref(self, message_id: str) -> MessageRef | None:
        """The index entry of a live message in an owned shard, or None."""
        try:
            shard = self._shards.get(shard_of(message_id))
        except ValueError:  # not a message id at all
            return None
        return shard.index.messages.get(message_id) if shard else None

    def disk_bytes(self) -> int:
        """Bytes written to the segments of owned shards."""
        return sum(u.end for s in self._shards.values() for u in s.index.segments.values())

    def oldest_received(self) -> float | None:
        """Acceptance time of the oldest live message in owned shards, or None if empty."""
        oldest = None
        for shard in self._shards.values():
            # Index order is (nearly) arrival order: the first few entries hold the oldest.
            for message_id in itertools.islice(shard.index.messages, 16):
                at = received_at_of(message_id)
                oldest = at if oldest is None or at < oldest else oldest
        return oldest

    def live_count(self) -> int:
        return sum(len(s.index.messages) for s in self._shards.values())

    def segment_count(self) -> int:
        return sum(len(s.index.segments) for s in self._shards.values())

    # --- housekeeping ----------------------------------------------------------------------

    async def maintain(self, live_ratio: float) -> tuple[int, int]:
        """One housekeeping pass: compact heads worth compacting, delete dead segments."""
        moved = deleted = 0
        for shard in list(self._shards.values()):
            try:
                moved += await shard.compact(live_ratio)
                deleted += await shard.collect()
            except (SpoolError, OSError) as exc:
                log.warning("spool.maintain_failed", shard=shard.number, error=describe(exc))
        return moved, deleted
