"""Segment files: naming, the append handle used by the writer thread, and positional reads."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from mta.spool.errors import SpoolWriteError, os_detail

__all__ = ["ActiveSegment", "fsync_dir", "list_segments", "read_range", "replace_durably",
           "segment_path", "sync_segments"]

_SEG_RE = re.compile(r"^seg-(\d{8})\.log$")


def segment_path(shard_dir: Path, seq: int) -> Path:
    return shard_dir / f"seg-{seq:08d}.log"


def list_segments(shard_dir: Path) -> list[int]:
    """Sequence numbers of the segments in a shard directory, oldest first."""
    seqs = []
    for name in os.listdir(shard_dir):
        if m := _SEG_RE.match(name):
            seqs.append(int(m.group(1)))
    return sorted(seqs)


def fsync_dir(path: Path) -> None:
    """Make a create, rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_segments(shard_dir: Path) -> None:
    """fdatasync every segment in ``shard_dir``, then the directory (blocking): a log another
    process wrote may still be in the page cache only, and must not vanish in a power loss
    once we acknowledge on top of it."""
    for seq in list_segments(shard_dir):
        fd = os.open(segment_path(shard_dir, seq), os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    fsync_dir(shard_dir)


def replace_durably(directory: Path, name: str, data: bytes) -> None:
    """Make ``directory/name`` hold ``data``, whole or not at all, durably: a temporary file
    fsynced, renamed over it, the directory fsynced (a small record: owner, token, id)."""
    tmp = directory / f"{name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, directory / name)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)


def read_range(shard_dir: Path, seq: int, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset`` of a segment (blocking; call from a thread)."""
    fd = os.open(segment_path(shard_dir, seq), os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(errno.EIO, f"short read in segment {seq} at {offset}")
    return data


class ActiveSegment:
    """The segment the writer thread appends to. Only the writer thread touches it."""

    def __init__(self, shard_dir: Path, seq: int) -> None:
        self.seq = seq
        self.path = segment_path(shard_dir, seq)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        self.size = 0
        # Set after a failed write or sync (EFBIG, EIO, fsyncgate): the next append opens a
        # fresh segment instead of trusting this file's tail.
        self.broken = False
        fsync_dir(shard_dir)

    def write(self, data: bytes) -> int:
        """Append ``data`` fully; return its offset. On error, cut back what was written."""
        offset = self.size
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as exc:
            # Cut the partial record off, and retire the file either way: EFBIG will not go
            # away for this file, and after EIO its tail cannot be trusted.
            self.broken = True
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                pass
            raise SpoolWriteError(exc.errno or errno.EIO, os_detail(exc)) from exc
        self.size += len(data)
        return offset

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            self.broken = True
            raise SpoolWriteError(exc.errno or errno.EIO, os_detail(exc)) from exc

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
