"""A follower's copy of a shard's log, byte-identical to the owner's up to its end.

The owner ships each batch's bytes with the position ``(seq, offset)`` it wrote them at; the
copy writes them at the same position, in the owner's own layout (``<root>/shard-NNN/
seg-<seq>.log``), so a promoted follower opens its copy with the owner code unchanged
(:meth:`mta.spool.shard.Shard.open`, then recovery).

Positions: ``(seq, end)`` of the newest segment; :data:`NOTHING` ``(0, 0)`` is an empty copy
(no segment: real seqs start at 1). A fresh copy's first frame opens a segment of any seq.

Crash safety rests on one invariant: **every segment but the newest is complete on disk**
(a segment is fdatasynced before the next one is created). Opening then only has to cut the
newest segment back to its last complete batch (:func:`mta.spool.recovery.committed_end`).
Deletions keep the copy a prefix of the log or a suffix of it, whatever moment a crash hits:
truncation deletes newest first, compaction's drop oldest first (a DONE never vanishes before
its MSG), each deletion made durable before the next.

The caller decides ownership: it must not have the shard open as owner while it follows it.
This module never touches ``shard.owner``.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import structlog

from mta.replication.errors import (
    CopyBroken,
    CopyError,
    FollowUnreadable,
    PositionCompacted,
    PositionMismatch,
    StaleToken,
)
from mta.spool.copyid import copy_id
from mta.spool.ownership import read_owner
from mta.spool.record import HEADER, Kind, ScannedRecord, scan
from mta.spool.recovery import committed_end
from mta.spool.segment import fsync_dir, list_segments, replace_durably, segment_path
from mta.spool.shard import shard_dir

__all__ = ["FOLLOW_FILE", "NOTHING", "Position", "ShardCopy", "log_segments", "read_follow",
           "read_log"]

log = structlog.get_logger("mta.replication.copy")

FOLLOW_FILE = "shard.follow"
Position = tuple[int, int]  # (segment seq, offset); compares in log order
NOTHING: Position = (0, 0)  # an empty copy: before any segment


def read_follow(directory: Path) -> int:
    """The newest token followed in ``directory``; 0 when there is no file. Raises
    ``ValueError`` for a file that does not hold exactly what :func:`_write_follow` writes
    (torn, garbled, foreign), ``OSError`` for one that cannot be read: never a guess."""
    try:
        with open(directory / FOLLOW_FILE, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return 0
    try:
        raw = json.loads(data)
    except ValueError:
        raise ValueError(f"not JSON ({len(data)} bytes)") from None
    token = raw.get("token") if isinstance(raw, dict) and set(raw) == {"token"} else None
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise ValueError(f"not a followed token: {data[:80]!r}")
    return token


def _write_follow(directory: Path, token: int) -> None:
    replace_durably(directory, FOLLOW_FILE, json.dumps({"token": token}).encode())


def _read_segment(directory: Path, seq: int) -> bytes:
    with open(segment_path(directory, seq), "rb") as fh:
        return fh.read()


class ShardCopy:
    """A follower's copy of one shard. Blocking: only the copy writer thread calls it
    (:class:`mta.replication.copywriter.CopyWriter`). Create with :meth:`open`."""

    def __init__(self, directory: Path, shard: int, token: int,
                 sizes: dict[int, int], copy_id: str = "") -> None:
        self.dir = directory
        self.shard = shard
        # Names this copy in the in-sync set; a new disk (an empty directory) gets a new one.
        self.copy_id = copy_id
        self._token = token
        # Every segment of the copy and its length (the newest one's is the write position).
        self._sizes = sizes
        self._fd: int | None = None  # the newest segment, opened on the first write
        self._fd_seq = 0
        self._unsynced = False  # the newest segment has writes not fdatasynced yet
        self._dir_dirty = False  # a segment was created since the last sync
        self._broken = False
        self._durable = self.position

    # --- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, root: Path, shard: int) -> ShardCopy:
        """Open (creating it if missing) the copy of ``shard`` under the spool ``root``, cut
        its newest segment back to its last complete batch, and make that durable. An
        OSError here (unreadable disk) propagates as is: there is no copy to mark broken.
        :class:`FollowUnreadable` when ``shard.follow`` is there but unreadable (fail closed:
        the copy is left as it is)."""
        directory = shard_dir(root, shard)
        if not directory.exists():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        # The floor is also the token this node itself owned the shard under: a zombie
        # older than our own ownership must not be followed (nor cut what we wrote).
        owner = read_owner(directory)
        try:
            followed = read_follow(directory)
        except (OSError, ValueError) as exc:
            # The newest token followed is unknown: a floor guessed lower could let a stale
            # owner cut or extend the copy and collect its acks. Follow nobody; keep the
            # bytes (what the copy acknowledged, maybe the copy a takeover needs).
            path = str(directory / FOLLOW_FILE)
            log.warning("replication.copy_follow_unreadable", shard=shard, file=path,
                        error=str(exc), action="the copy follows no owner (nack broken) "
                        "until the file is repaired or the copy replaced")
            raise FollowUnreadable(shard, path, str(exc)) from exc
        token = max(followed, owner.token if owner is not None else 0)
        for tmp in directory.glob(f"{FOLLOW_FILE}.*.tmp"):
            tmp.unlink(missing_ok=True)  # a token write that died before its rename
        seqs = list_segments(directory)
        sizes = {seq: os.stat(segment_path(directory, seq)).st_size for seq in seqs}
        while seqs:
            seq = seqs[-1]
            path = segment_path(directory, seq)
            size = sizes[seq]
            end = committed_end(_read_segment(directory, seq))
            if end == 0:
                # Not even a header made it: nothing of this segment was ever acknowledged.
                os.unlink(path)
                fsync_dir(directory)
                del sizes[seq]
                seqs.pop()
                log.warning("replication.copy_empty_segment_removed", shard=shard, seq=seq,
                            size=size)
                continue
            # Cut (and sync) even when nothing is cut: bytes a killed process left in the page
            # cache count as durable only once they are synced.
            fd = os.open(path, os.O_WRONLY)
            try:
                if end < size:
                    os.ftruncate(fd, end)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if end < size:
                log.warning("replication.copy_tail_cut", shard=shard, seq=seq, offset=end,
                            dropped=size - end)
            sizes[seq] = end
            break
        copy = cls(directory, shard, token, sizes, copy_id(directory))
        log.info("replication.copy_opened", shard=shard, token=token, position=copy.position,
                 segments=len(sizes))
        return copy

    # --- state -----------------------------------------------------------------------------

    @property
    def position(self) -> Position:
        """Where the copy ends: ``(seq, end)`` of its newest segment, :data:`NOTHING` if empty."""
        if not self._sizes:
            return NOTHING
        seq = max(self._sizes)
        return seq, self._sizes[seq]

    @property
    def durable(self) -> Position:
        """How far the copy is fdatasynced (what an ack may say)."""
        return self._durable

    @property
    def token(self) -> int:
        """The newest fencing token this copy has followed (persisted)."""
        return self._token

    @property
    def broken(self) -> bool:
        return self._broken

    def segments(self) -> list[tuple[int, int]]:
        """``(seq, size)`` of every segment, oldest first."""
        return sorted(self._sizes.items())

    def header_tokens(self) -> dict[int, int]:
        """The fencing token in each segment's header (which owner wrote it), by seq: what
        :func:`mta.replication.insync.plan_catch_up` compares. -1 for an unreadable header."""
        out = {}
        for seq in sorted(self._sizes):
            out[seq] = _header_token(self.dir, seq)
        return out

    # --- fencing ---------------------------------------------------------------------------

    def accept_token(self, token: int) -> None:
        """Follow ``token``: persisted before anything written under it; older is refused."""
        self._usable()
        if token < self._token:
            raise StaleToken(self._token)
        if token == self._token:
            return
        try:
            _write_follow(self.dir, token)
        except OSError as exc:
            raise self._break(exc, "persisting token") from exc
        log.info("replication.copy_token", shard=self.shard, token=token, previous=self._token)
        self._token = token

    # --- appends ---------------------------------------------------------------------------

    def append(self, token: int, seq: int, offset: int, data: bytes,
               prev: Position | None = None) -> Position:
        """Write ``data`` at ``(seq, offset)``: the copy's end, or ``(seq > ours, 0)`` to open
        segment ``seq`` (``data`` then starts with its header). ``prev``, when the owner gives
        it, is its end before this frame and must be ours: it catches a frame lost just before
        a segment rollover, which the position alone cannot. Returns the new position (not yet
        durable: see :meth:`sync`)."""
        self._usable()
        self.accept_token(token)
        pos = self.position
        if prev is not None and prev != pos:
            raise PositionMismatch(pos, f"frame follows {prev}")
        if offset == 0 and seq > pos[0]:
            if not data:
                raise PositionMismatch(pos, "a frame opening a segment carries its header")
            self._roll(seq)
        elif (seq, offset) != pos or seq == 0:
            raise PositionMismatch(pos, f"frame at {(seq, offset)}")
        fd = self._writable()
        view = memoryview(data)
        at = offset
        try:
            while view:
                n = os.pwrite(fd, view, at)
                view = view[n:]
                at += n
        except OSError as exc:
            # Cut the partial frame off (best effort; reopening cuts it anyway) and take
            # nothing more: after EIO this file's tail cannot be trusted.
            try:
                os.ftruncate(fd, offset)
            except OSError:
                pass
            raise self._break(exc, f"writing segment {seq} at {offset}") from exc
        self._sizes[seq] = offset + len(data)
        self._unsynced = True
        return self.position

    def _roll(self, seq: int) -> None:
        """Seal the newest segment and create ``seq`` after it."""
        try:
            if self._fd is not None:
                # The invariant open() relies on: a segment is complete on disk before a
                # newer one can exist, so a crash can only tear the newest.
                if self._unsynced:
                    os.fdatasync(self._fd)
                    self._unsynced = False
                self._close_fd()
            path = segment_path(self.dir, seq)
            try:
                # Beyond our end, so never acknowledged: left by an earlier life of the copy.
                os.unlink(path)
                log.warning("replication.copy_leftover_removed", shard=self.shard, seq=seq)
            except FileNotFoundError:
                pass
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise self._break(exc, f"creating segment {seq}") from exc
        self._fd_seq = seq
        self._sizes[seq] = 0
        self._dir_dirty = True

    def _writable(self) -> int:
        seq = self.position[0]
        if self._fd is None or self._fd_seq != seq:
            self._close_fd()
            try:
                self._fd = os.open(segment_path(self.dir, seq), os.O_WRONLY)
            except OSError as exc:
                raise self._break(exc, f"opening segment {seq}") from exc
            self._fd_seq = seq
        return self._fd

    def sync(self) -> Position:
        """Make everything written durable (one fdatasync, plus the directory when a segment
        was created); return :attr:`durable`."""
        self._usable()
        try:
            if self._unsynced and self._fd is not None:
                os.fdatasync(self._fd)
            self._unsynced = False
            if self._dir_dirty:
                fsync_dir(self.dir)
                self._dir_dirty = False
        except OSError as exc:
            raise self._break(exc, "syncing") from exc
        self._durable = self.position
        return self._durable

    # --- cutting ---------------------------------------------------------------------------

    def truncate(self, seq: int, offset: int, token: int | None = None) -> Position:
        """Cut the copy back to ``(seq, offset)`` (KIP-101: to the end of the epoch it
        followed). ``(seq, 0)`` drops segment ``seq`` and every later one; otherwise ``offset``
        must be a batch end inside segment ``seq``. Durable on return. With ``token``, only
        for an owner at least as new as the one the copy follows (a zombie's stale plan
        must not cut what a newer owner wrote)."""
        self._usable()
        if token is not None:
            self.accept_token(token)
        pos = self.position
        if offset != 0:
            size = self._sizes.get(seq)
            if size is None or offset > size or committed_end(
                    _read_segment(self.dir, seq)[:offset]) != offset:
                raise PositionMismatch(pos, f"no batch ends at {(seq, offset)}")
        try:
            self._delete(sorted((s for s in self._sizes if s > seq or (
                s == seq and offset == 0)), reverse=True))
            if offset != 0 and offset < self._sizes[seq]:
                fd = os.open(segment_path(self.dir, seq), os.O_WRONLY)
                try:
                    os.ftruncate(fd, offset)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                self._sizes[seq] = offset
            self.sync()
        except OSError as exc:
            raise self._break(exc, f"truncating to {(seq, offset)}") from exc
        self._durable = self.position
        log.warning("replication.copy_truncated", shard=self.shard, seq=seq, offset=offset,
                    previous=pos, position=self._durable)
        return self._durable

    def drop(self, seqs: Iterable[int], token: int | None = None) -> None:
        """Delete head segments the owner's compaction found dead, oldest first. Never the
        active (newest) segment; seqs the copy does not have are skipped (an empty copy
        has nothing to drop). With ``token``, only for a current owner (as truncate)."""
        self._usable()
        if token is not None:
            self.accept_token(token)
        wanted = sorted(set(seqs))
        newest = self.position[0]
        if self._sizes and any(s >= newest for s in wanted):
            raise CopyError(f"shard {self.shard}: refusing to drop the active segment "
                            f"{newest} or a newer one ({wanted})")
        try:
            self._delete([s for s in wanted if s in self._sizes])
        except OSError as exc:
            raise self._break(exc, "dropping segments") from exc
        log.info("replication.copy_dropped", shard=self.shard, segments=wanted)

    def reset(self) -> None:
        """Discard the whole copy (newest segment first); the followed token stays. The
        position becomes :data:`NOTHING`: the owner sends a full copy next."""
        self._usable()
        pos = self.position
        try:
            self._delete(sorted(self._sizes, reverse=True))
        except OSError as exc:
            raise self._break(exc, "resetting") from exc
        self._unsynced = False
        self._durable = NOTHING
        log.warning("replication.copy_reset", shard=self.shard, previous=pos)

    def _delete(self, seqs: list[int]) -> None:
        """Unlink ``seqs`` in the order given, each durable before the next."""
        for seq in seqs:
            if seq == self._fd_seq:
                self._close_fd()
                self._unsynced = False
            try:
                os.unlink(segment_path(self.dir, seq))
            except FileNotFoundError:
                pass
            fsync_dir(self.dir)
            del self._sizes[seq]
        self._durable = min(self._durable, self.position)

    # --- failure and release ---------------------------------------------------------------

    def _usable(self) -> None:
        if self._broken:
            raise CopyBroken(self.shard, errno.EIO, "an earlier write or sync failed; reopen")

    def _break(self, exc: OSError, what: str) -> CopyBroken:
        self._broken = True
        log.error("replication.copy_broken", shard=self.shard, during=what, error=str(exc))
        return CopyBroken(self.shard, exc.errno or errno.EIO, f"{what}: {exc}")

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
            self._fd_seq = 0

    def close(self) -> None:
        """Sync what was written and release the open segment."""
        if self._unsynced and not self._broken:
            self.sync()
        self._close_fd()


def _header_token(directory: Path, seq: int) -> int:
    try:
        with open(segment_path(directory, seq), "rb") as fh:
            head = fh.read(HEADER.size)
            if len(head) < HEADER.size:
                return -1
            total = HEADER.unpack(head)[1]
            data = head + fh.read(min(total, 1 << 16))
    except OSError:
        return -1
    for item in scan(data):
        if isinstance(item, ScannedRecord) and item.meta[0] == Kind.SEGMENT and \
                isinstance(item.meta[1], dict):
            token = item.meta[1].get("token")
            return token if isinstance(token, int) else -1
        break
    return -1


def log_segments(directory: Path) -> list[tuple[int, int, int]]:
    """``(seq, header token, size)`` of every segment of a shard log in ``directory`` (an
    owner's or a copy), oldest first (blocking): what a catch-up plan compares."""
    out = []
    for seq in list_segments(directory):
        try:
            size = os.stat(segment_path(directory, seq)).st_size
        except FileNotFoundError:
            continue  # compacted while we looked
        out.append((seq, _header_token(directory, seq), size))
    return out


def read_log(directory: Path, start: Position, end: Position,
             max_bytes: int = 1 << 20) -> Iterator[tuple[int, int, bytes]]:
    """The owner's log between ``start`` and ``end`` as ``(seq, offset, data)`` chunks of at
    most ``max_bytes``, never spanning two segments (blocking). ``start`` :data:`NOTHING`
    means from the oldest segment's start. Raises :class:`PositionCompacted` when the segment
    at ``start`` is gone (send a full copy instead)."""
    seqs = list_segments(directory)
    if start == NOTHING:
        if not seqs:
            return
        start = (seqs[0], 0)
    if start >= end:
        return
    if start[0] not in seqs:
        raise PositionCompacted(start)
    for seq in seqs:
        if seq < start[0] or seq > end[0]:
            continue
        offset = start[1] if seq == start[0] else 0
        try:
            fd = os.open(segment_path(directory, seq), os.O_RDONLY)
        except FileNotFoundError:
            # Compaction deleted it while we read: the follower needs a full copy.
            raise PositionCompacted((seq, offset)) from None
        try:
            yield from _read_segment_chunks(fd, seq, offset, end, max_bytes)
        finally:
            os.close(fd)


def _read_segment_chunks(fd: int, seq: int, offset: int, end: Position,
                         max_bytes: int) -> Iterator[tuple[int, int, bytes]]:
    size = os.fstat(fd).st_size
    stop = end[1] if seq == end[0] else size
    if stop > size or offset > stop:
        raise PositionMismatch((seq, size), f"segment {seq} holds no {(seq, max(offset, stop))}")
    while offset < stop:
        data = os.pread(fd, min(max_bytes, stop - offset), offset)
        if not data:
            raise OSError(errno.EIO, f"short read in segment {seq} at {offset}")
        yield seq, offset, data
        offset += len(data)
