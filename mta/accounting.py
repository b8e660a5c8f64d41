"""Accounting log: one JSON line per Reception, Delivery, TransientFailure, Bounce, Expiration,
AdminBounce, AdminDelete.

The lines about a message ride the spool's group commit (see :class:`mta.spool.SideLog`): a
Reception is written with the message's MSG record, an outcome with the STATE or DONE record
that makes it final. The spool keeps the lines too, in the batch's COMMIT record with the
offset they get here, and is the source of truth: after a kill, recovery drops the records of
a batch that never completed and writes here again what a completed batch promised but this
file lacks (a torn last line is cut off when the file is opened). So the file says exactly
what the spool says, whenever the process dies: an outcome whose state never reached the disk
(and will be tried again) was never logged, and one that did reach it is logged once. That
makes the file the record an operator reconciles: every Reception ends in exactly one final
record per recipient. Rotate it by renaming (the node keeps the open file) and SIGHUP is not
needed; copy-and-truncate breaks the offsets recovery checks.
"""

from __future__ import annotations

import asyncio
import errno
import json.encoder
import os
import time
from pathlib import Path
from typing import Any

import structlog

from mta.envelope import Envelope
from mta.jsonenc import encoder
from mta.logs import describe

__all__ = ["AccountingLog"]

log = structlog.get_logger("mta.accounting")

_dumps = encoder(ensure_ascii=False, separators=(",", ":"))
# How _dumps quotes a string (non-ASCII left as it is: ensure_ascii=False).
_string = json.encoder.encode_basestring


class AccountingLog:
    """Builds the lines; the spool's writer thread writes them to the file, each with the
    record it belongs to (a caller hands an outcome's lines to the spool write that makes the
    outcome durable, so a line exists exactly when its record does)."""

    def __init__(self, path: str | os.PathLike[str], node_id: str) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self._fd: int | None = None
        self._unwritten = b""  # what a failed write (disk full) left; retried next time
        # Where this process's lines go: the file's identity and the offset the next promised
        # line gets (writer thread), and its size when opened (what earlier processes wrote).
        self._epoch = os.urandom(6).hex()
        self._ident = ""
        self._opened_size = 0
        self._offset = 0

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            size = _cut_torn_line(fd)
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        self._ident = f"{st.st_dev}:{st.st_ino}"
        self._opened_size = self._offset = size
        self._fd = fd

    def _line(self, kind: str, message_id: str, fields: dict[str, Any]) -> bytes:
        rec = {"type": kind, "time": round(time.time(), 6), "message_id": message_id,
               "node": self.node_id, **fields}
        return _dumps(rec).encode() + b"\n"

    def line(self, kind: str, message_id: str, **fields: Any) -> bytes:
        """One line about a message, for the spool write that makes it true."""
        return self._line(kind, message_id, fields)

    # --- SideLog (driven by the spool) -----------------------------------------------------

    def reception(self, message_id: str, envelope: Envelope, size: int) -> bytes | None:
        # The bytes _line("Reception", ...) makes, written out: one line per accepted message,
        # on the loop, where building, merging and encoding the dict cost 3.0 us, this 1.5.
        # tests/spool/test_accounting_lines.py holds the two equal.
        line = (f'{{"type":"Reception","time":{round(time.time(), 6)!r},'
                f'"message_id":{_string(message_id)},"node":{_string(self.node_id)},'
                f'"sender":{_string(envelope.sender)},'
                f'"recipients":[{",".join(map(_string, envelope.recipients))}],'
                f'"size":{size:d},"client_ip":{_string(envelope.client_ip)}')
        for key, value in envelope.labels().items():
            line += f',{_string(key)}:{_string(value)}'
        return (line + "}\n").encode()

    # --- SideFile (the spool's writer thread) and SideCheck (recovery) --------------------

    def side_at(self) -> dict[str, Any]:
        return {"e": self._epoch, "n": self.node_id, "p": str(self.path.absolute()),
                "i": self._ident, "o": self._offset}

    def advance(self, nbytes: int) -> None:
        self._offset += nbytes

    def verify(self, side_at: dict[str, Any], lines: bytes) -> int | None:
        offset, path, ident = side_at.get("o"), side_at.get("p"), side_at.get("i")
        if not isinstance(offset, int) or not isinstance(path, str) or not ident:
            return None
        want = len(lines)
        if ident == self._ident and self._fd is not None:
            fd, own = self._fd, True
            if side_at.get("e") != self._epoch:
                # What an earlier process promised can only be in what it left behind;
                # beyond that lie this process's own lines.
                want = max(0, min(want, self._opened_size - offset))
        else:
            try:
                fd, own = os.open(path, os.O_RDONLY), False
            except OSError:
                return None
        try:
            st = os.fstat(fd)
            if f"{st.st_dev}:{st.st_ino}" != ident:
                return None  # rotated or replaced since: cannot tell
            got = os.pread(fd, want, offset) if want else b""
        except OSError:
            return None
        finally:
            if not own:
                os.close(fd)
        if got != lines[:len(got)]:
            return None
        return got.rfind(b"\n") + 1

    def replayed(self, lines: bytes) -> bytes:
        return b"".join(line[:-1] + b',"replayed":true}\n' if line.endswith(b"}") else
                        line + b"\n" for line in lines.splitlines())

    def write(self, data: bytes) -> None:
        """Writer thread: append (page cache: survives the process being killed)."""
        data = self._unwritten + data
        self._unwritten = b""
        if self._fd is None:
            self._unwritten = data  # not open yet (or closed): keep, never drop
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._unwritten = bytes(view)
            log.error("accounting.write_failed", error=describe(exc), pending_bytes=len(view))

    async def close(self) -> None:
        """After the spool has stopped: nothing more can be written."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await asyncio.to_thread(_sync_and_close, fd)


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        log.error("accounting.sync_failed", error=describe(exc))
    os.close(fd)


def _cut_torn_line(fd: int, chunk: int = 65536) -> int:
    """Cut a last line a killed writer left without its newline; return the new size."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise OSError(errno.EIO, "short read of the accounting log")
        nl = data.rfind(b"\n")
        if nl >= 0:
            end = start + nl + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
        log.warning("accounting.torn_line_cut", dropped=size - end)
    return end
