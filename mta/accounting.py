"""Accounting log: one JSON line per Reception, Delivery, TransientFailure, Bounce, Expiration,
AdminBounce.

The lines about a message ride the spool's group commit (see :class:`mta.spool.SideLog`): a
Reception is written with the message's MSG record, an outcome with the STATE or DONE record
that makes it final. So the file says exactly what the spool says, whenever the process dies:
an outcome whose state never reached the disk (and will be tried again) was never logged,
and one that did reach it is logged once. That makes the file the record an operator
reconciles: every Reception ends in exactly one final record per recipient.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from mta.envelope import Envelope

__all__ = ["AccountingLog"]

log = structlog.get_logger("mta.accounting")


class AccountingLog:
    """Collects lines per message until the spool writes the record they belong to."""

    def __init__(self, path: str | os.PathLike[str], node_id: str) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self._pending: dict[str, list[bytes]] = {}
        self._fd: int | None = None
        self._unwritten = b""  # what a failed write (disk full) left; retried next time

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _line(self, kind: str, message_id: str, fields: dict[str, Any]) -> bytes:
        rec = {"type": kind, "time": round(time.time(), 6), "message_id": message_id,
               "node": self.node_id, **fields}
        return json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"

    def record(self, kind: str, message_id: str, **fields: Any) -> None:
        """Note a line; it is written with the message's next spool record."""
        self._pending.setdefault(message_id, []).append(self._line(kind, message_id, fields))

    # --- SideLog (driven by the spool) -----------------------------------------------------

    def reception(self, message_id: str, envelope: Envelope, size: int) -> bytes | None:
        return self._line("Reception", message_id, {
            "sender": envelope.sender, "recipients": envelope.recipients, "size": size,
            "client_ip": envelope.client_ip})

    def take(self, message_id: str) -> bytes | None:
        lines = self._pending.pop(message_id, None)
        return b"".join(lines) if lines else None

    def restore(self, message_id: str, data: bytes) -> None:
        self._pending.setdefault(message_id, []).insert(0, data)

    def discard(self, keep: Callable[[str], bool]) -> None:
        """Forget the lines of messages for which ``keep`` is false (their outcomes will be
        decided again, by this node or the shard's next owner)."""
        for message_id in [m for m in self._pending if not keep(m)]:
            del self._pending[message_id]

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
            log.error("accounting.write_failed", error=str(exc), pending_bytes=len(view))

    async def close(self) -> None:
        """After the spool has stopped: nothing more can be written."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await asyncio.to_thread(os.close, fd)
