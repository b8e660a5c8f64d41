"""Small state files replaced whole and durably: written beside the old one, fsynced,
renamed over it, the directory fsynced. A crash leaves the old file or the new, never a
mix. Blocking: call through a thread."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["replace_file"]


def replace_file(path: str, data: bytes) -> None:
    """Make ``data`` the content of ``path`` (its directory is created if needed)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
