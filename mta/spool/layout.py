"""The spool's shard count, recorded once in the spool root and checked at every start.

A message id names its shard, and a node only opens shards below its configured count: a
spool reopened with fewer shards would keep the mail of the others on disk and never deliver
it, with no error anywhere. So the count is written when the spool is created, and a node
whose config disagrees refuses to start.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import structlog

from mta.spool.errors import SpoolError
from mta.spool.segment import fsync_dir

__all__ = ["SHARDS_FILE", "ShardCountMismatch", "SpoolLayoutError", "ensure_shard_count"]

log = structlog.get_logger("mta.spool")

SHARDS_FILE = "spool.shards"
_SHARD_DIR_RE = re.compile(r"shard-(\d+)")


class SpoolLayoutError(SpoolError):
    """The spool on disk does not fit the configuration; the node must not start.

    The message completes "<config file>: [spool] shards: ..." for the operator.
    """


class ShardCountMismatch(SpoolLayoutError):
    """The configured shard count differs from the one the spool (or cluster) was made with."""

    def __init__(self, configured: int, recorded: int, where: str, *, at_least: bool = False
                 ) -> None:
        self.configured = configured
        self.recorded = recorded
        self.where = where
        bound = "at least " if at_least else ""
        super().__init__(
            f"is {configured}, but {where} was created with {bound}{recorded} shards; set "
            f"[spool] shards = {recorded} (the count is fixed for the life of a spool: "
            f"with another one, mail in some shards would never be delivered)")


def _shard_dirs(root: Path) -> list[int]:
    out = []
    for entry in os.scandir(root):
        if (m := _SHARD_DIR_RE.fullmatch(entry.name)) and entry.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def _read(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise SpoolLayoutError(
            f"{path} holds {text[:40]!r}, not a shard count; write the number of shards the "
            "spool was created with into it (the highest shard-NNN directory + 1 at least)")
    return int(text)


def _write(root: Path, count: int, *, replace: bool) -> int:
    """Record ``count`` durably; returns the count on disk afterwards.

    Without ``replace`` the file is created only if absent (link, not rename, so a node
    starting at the same moment on a shared spool can never overwrite another's record).
    """
    final = root / SHARDS_FILE
    tmp = root / f"{SHARDS_FILE}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(f"{count}\n".encode())
        fh.flush()
        os.fsync(fh.fileno())
    try:
        if replace:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # A filesystem without hard links: rename, after a last look.
                if not final.exists():
                    os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(root)
    recorded = _read(final)
    if recorded is None:
        raise SpoolLayoutError(f"{final} vanished right after it was written")
    return recorded


def ensure_shard_count(root: str | os.PathLike[str], configured: int) -> None:
    """Check ``configured`` against the count recorded in the spool at ``root``; record it
    when there is none yet. Blocking (call from a thread); raises :class:`SpoolLayoutError`.

    A spool from before the record existed gets the configured count, unless it already
    holds a shard directory that count would leave out.
    """
    root = Path(root)
    path = root / SHARDS_FILE
    recorded = _read(path)
    if recorded == configured:
        return
    dirs = _shard_dirs(root)
    if recorded is None:
        if dirs and dirs[-1] >= configured:
            raise ShardCountMismatch(configured, dirs[-1] + 1,
                                     f"the spool {root} (shard directories up to "
                                     f"shard-{dirs[-1]:03d})", at_least=True)
        recorded = _write(root, configured, replace=False)
        if recorded == configured:
            log.info("spool.shards_recorded", path=str(path), shards=configured,
                     existing_shard_dirs=len(dirs))
            return
    elif not dirs:
        # Recorded by a start that was refused before it opened any shard (a cluster that
        # has another count, say): the spool has never held mail, so nothing can be hidden.
        log.warning("spool.shards_rerecorded", path=str(path), was=recorded, shards=configured)
        _write(root, configured, replace=True)
        return
    raise ShardCountMismatch(configured, recorded, f"the spool {root} (recorded in {path})")
