"""What the side file (the accounting log) lacks of what a shard's COMMIT records promised it.

A COMMIT record holds its batch's side lines and the offset they were to get in the side
file; the lines are written there after the records, so a process killed in between leaves
a COMMIT whose lines never arrived (or arrived torn). Side writes happen batch after batch:
once a batch's lines are in the file, every earlier batch of the same writer's are too, so
the check walks back from a shard's newest COMMIT only while lines are missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["SideCheck", "missing_lines"]


class SideCheck(Protocol):
    """How recovery asks the side file about lines promised to it (any thread)."""

    def verify(self, side_at: dict[str, Any], lines: bytes) -> int | None:
        """How many leading bytes of ``lines`` the file holds where ``side_at`` says (whole
        lines only), or None when that cannot be told (file gone, rotated, another's)."""

    def replayed(self, lines: bytes) -> bytes:
        """``lines`` marked as possibly written before, for lines that cannot be verified."""


def missing_lines(commits: Sequence[tuple[dict[str, Any], bytes]], side: SideCheck) -> bytes:
    """The lines of ``commits`` (oldest first) that the side file is missing, in order."""
    if not commits:
        return b""
    epoch = commits[-1][0].get("e")
    if epoch is None:
        return b""
    out: list[bytes] = []
    # Only the newest writer's commits can be missing lines: a writer recovers a shard (and
    # so re-emits what it lacks) before it appends to it.
    for side_at, lines in reversed(commits):
        if side_at.get("e") != epoch:
            break
        if not lines:
            continue
        held = side.verify(side_at, lines)
        if held is None:
            # Unknowable (another node's file we cannot read): the newest batch is the one
            # a kill can have cut off, so it is emitted again, marked, rather than lost.
            if not out:
                out.append(side.replayed(lines))
            break
        if held >= len(lines):
            break
        out.append(lines[held:])
    out.reverse()
    return b"".join(out)
