"""The id of one copy of a shard: made once, when the shard directory first gets one.

The replicated spool names the copies that may take a shard over by these ids
(:mod:`mta.replication.insync`): a node whose disk was replaced comes back with an empty
directory and so a new id, and is never mistaken for the copy that held acknowledged mail.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from pathlib import Path

from mta.spool.segment import replace_durably

__all__ = ["COPY_FILE", "copy_id"]

COPY_FILE = "shard.copy"
_ID = re.compile(r"[0-9a-f]{32}")


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    return text if _ID.fullmatch(text) else None


def copy_id(shard_dir: Path) -> str:
    """The id of the copy in ``shard_dir``, made (durably) if it has none. Blocking.

    A file that does not hold an id is replaced by a new one: an id nobody can read names no
    copy anyone can trust, and a new id only ever makes a copy less promotable, never more.
    """
    path = shard_dir / COPY_FILE
    if (found := _read(path)) is not None:
        return found
    # Made under a lock on the directory: two openers at once (a node and a tool, say)
    # must agree on one id, and a replacement of an unreadable file must not race a create.
    fd = os.open(shard_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _read(path) or _create(shard_dir, path)
    finally:
        os.close(fd)


def _create(shard_dir: Path, path: Path) -> str:
    new = secrets.token_hex(16)
    replace_durably(shard_dir, COPY_FILE, new.encode() + b"\n")  # we hold the lock
    found = _read(path)
    if found is None:
        raise OSError(f"{path}: the copy id just written cannot be read back")
    return found
