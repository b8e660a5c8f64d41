"""A shard's append side: the active segment, rotation and the fencing check.

Used from the writer thread (the spool's group-commit thread), except :meth:`ShardLog.committed`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mta.spool import ownership
from mta.spool.errors import SpoolWriteError, os_detail
from mta.spool.record import encode_commit, encode_segment_header
from mta.spool.segment import ActiveSegment
from mta.spool.writer import Extent, Position

__all__ = ["ShardLog"]


class ShardLog:
    """Appends to ``shard_dir`` as ``owner``, opening a fresh segment when one fills up."""

    def __init__(self, shard_dir: Path, shard: int, next_seq: int,
                 owner: ownership.OwnerToken, segment_size: int,
                 on_commit: Callable[[int, int, int], None] | None = None) -> None:
        self.shard_dir = shard_dir
        self._on_commit = on_commit
        self.shard = shard
        self.owner = owner
        self._check_owner = ownership.OwnerCheck(shard_dir, shard, owner)
        self.segment_size = segment_size
        self.next_seq = next_seq
        self.active: ActiveSegment | None = None
        # Replication: every write (a segment header, a batch) as it lands, from the writer
        # thread, before it is synced; the callee hands it to the event loop.
        # (segment, offset, bytes, records in them): a replicated shard ships each write.
        self.on_write: Callable[[int, int, bytes, int], None] | None = None

    def _rotate(self) -> None:
        old = self.active
        self.active = None
        if old is not None:
            old.close()
        try:
            seg = ActiveSegment(self.shard_dir, self.next_seq)
        except FileExistsError as exc:
            # Left by an attempt whose cleanup failed: never append to a file we did not open.
            self.next_seq += 1
            raise SpoolWriteError(errno.EEXIST, f"creating segment: {os_detail(exc)}") from exc
        except OSError as exc:
            raise SpoolWriteError(exc.errno or errno.EIO,
                                  f"creating segment: {os_detail(exc)}") from exc
        header = encode_segment_header(self.shard, seg.seq, self.owner.node, self.owner.token)
        try:
            seg.write(header)
        except SpoolWriteError:
            # Disk full: do not leave an empty segment behind for every failed attempt.
            seg.close()
            try:
                os.unlink(seg.path)
            except OSError:
                pass
            raise
        self.next_seq += 1
        self.active = seg
        if self.on_write is not None:
            self.on_write(seg.seq, 0, header, 0)

    def append_many(self, chunks: list[bytes], side_at: dict[str, Any],
                    lines: bytes) -> tuple[list[Position], Extent]:
        """Write ``chunks`` and the batch's COMMIT record (carrying ``lines``) in one write;
        return where each chunk landed and the COMMIT's extent."""
        # Fencing: a node that lost the shard must not write one more byte into it.
        try:
            self._check_owner()
        except OSError as exc:
            raise SpoolWriteError(exc.errno or errno.EIO,
                                  f"reading owner file: {os_detail(exc)}") from exc
        commit = encode_commit(side_at, lines)
        total = sum(len(c) for c in chunks) + len(commit)
        seg = self.active
        if seg is None or seg.broken or (seg.size + total > self.segment_size and seg.size > 64):
            self._rotate()
            seg = self.active
            assert seg is not None
        data = b"".join((*chunks, commit))
        base = seg.write(data)
        if self.on_write is not None:
            self.on_write(seg.seq, base, data, len(chunks) + 1)
        positions = []
        for chunk in chunks:
            positions.append((seg.seq, base))
            base += len(chunk)
        return positions, (seg.seq, base, len(commit))

    def sync(self) -> None:
        if self.active is not None:
            self.active.sync()

    def committed(self, extent: Extent) -> None:
        if self._on_commit is not None:
            self._on_commit(*extent)

    def close(self) -> None:
        if self.active is not None:
            self.active.close()
            self.active = None
