"""Errors of a follower's shard copy (:mod:`mta.replication.copy`).

The owner turns each into a reply to its frame: ``StaleToken`` into ``nack stale-token``,
``PositionMismatch`` and ``PositionCompacted`` into a resend from the position they carry (or
a full copy), ``CopyBroken`` into dropping the follower from the count.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["CopyBroken", "CopyError", "FollowUnreadable", "PositionCompacted",
           "PositionMismatch", "StaleToken"]

Position = tuple[int, int]  # (segment seq, offset)


class CopyError(Exception):
    """Base class for failures of a follower's copy."""


class StaleToken(CopyError):
    """The frame's fencing token is older than the newest this copy has followed."""

    def __init__(self, newest: int) -> None:
        self.newest = newest
        super().__init__(f"stale token: this copy follows token {newest}")


class PositionMismatch(CopyError):
    """A frame (or a truncation) is not at a position the copy can take; resend from
    ``expected``, the copy's end."""

    def __init__(self, expected: Position, detail: str = "") -> None:
        self.expected = expected
        super().__init__(f"position mismatch, copy ends at {expected}"
                         + (f": {detail}" if detail else ""))


class PositionCompacted(CopyError):
    """The segment holding ``position`` was deleted from the log: send a full copy."""

    def __init__(self, position: Position) -> None:
        self.position = position
        super().__init__(f"position {position} was compacted away")


class CopyBroken(CopyError):
    """A write or sync of the copy failed (ENOSPC, EIO...): the copy takes nothing more until
    it is opened again, which cuts it back to its last complete batch."""

    def __init__(self, shard: int, err: int, detail: str = "") -> None:
        self.shard = shard
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(f"copy of shard {shard} broken: {name}: {detail}")


class FollowUnreadable(CopyBroken):
    """The copy's followed-token file (``shard.follow``) is there but unreadable (torn by a
    crash, garbled, foreign): the newest token the copy followed is unknown, so no owner can
    be told from a stale one and the copy follows none (fail closed). Its bytes are kept:
    they are still what it acknowledged, and it may be the copy a takeover needs."""

    def __init__(self, shard: int, path: str, detail: str) -> None:
        self.path = path
        super().__init__(shard, _errno.EIO, f"{path}: {detail}")
