"""Spool exceptions; the ingress edge turns them into SMTP replies."""

from __future__ import annotations

import errno as _errno
import os

from mta.logs import describe

__all__ = [
    "FencedError",
    "MessageNotFound",
    "NoShardsOwned",
    "ShardLockedError",
    "ShardReadOnly",
    "SpoolError",
    "SpoolWriteError",
    "os_detail",
]


class SpoolError(Exception):
    """Base class for spool failures."""


def os_detail(exc: OSError) -> str:
    """A SpoolWriteError detail for ``exc``: its text and file, without the "[Errno N]" that
    SpoolWriteError's errno name already says."""
    text = exc.strerror or describe(exc)
    return f"{text}: {exc.filename}" if exc.filename else text


class SpoolWriteError(SpoolError):
    """An append could not be made durable (ENOSPC, EIO, EFBIG...); nothing was acknowledged."""

    def __init__(self, err: int, detail: str = "") -> None:
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"{name}: {detail or os.strerror(err)}")


class FencedError(SpoolWriteError):
    """This node no longer holds the shard's fencing token; it must not write there."""

    def __init__(self, shard: int, detail: str) -> None:
        self.shard = shard
        super().__init__(_errno.EPERM, f"shard {shard} fenced: {detail}")


class ShardReadOnly(SpoolError):
    """The shard has fewer in-sync copies than ``[spool] min_insync``: it takes no new mail
    (451 4.3.0) until copies catch up; its queued mail is still delivered."""

    def __init__(self, shard: int, detail: str) -> None:
        self.shard = shard
        super().__init__(f"shard {shard} is read-only: {detail}")


class NoShardsOwned(SpoolError):
    """The node owns no shard right now, so it cannot accept a message."""


class ShardLockedError(SpoolError):
    """Another live process holds the spool (standalone lock)."""


class MessageNotFound(SpoolError):
    """No live message with that id in the shards this node owns."""
