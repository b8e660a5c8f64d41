"""Accounting log: one JSON line per Reception, Delivery, TransientFailure, Bounce, Expiration.

Lines are buffered and appended by a worker thread (never on the event loop); the file is the
record an operator reconciles: every Reception ends in exactly one final record.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from mta.tasks import cancel_and_wait

__all__ = ["AccountingLog"]

log = structlog.get_logger("mta.accounting")


class AccountingLog:
    """Appends records to a JSONL file; ``record`` is cheap and never blocks."""

    def __init__(self, path: str | os.PathLike[str], node_id: str) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self._buf: list[str] = []
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._fh: Any = None

    async def start(self) -> None:
        await asyncio.to_thread(self._open)
        self._task = asyncio.create_task(self._flusher(), name="accounting-flush")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, kind: str, message_id: str, **fields: Any) -> None:
        rec = {"type": kind, "time": round(time.time(), 6), "message_id": message_id,
               "node": self.node_id, **fields}
        line = json.dumps(rec, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self._buf.append(line)

    def _write(self) -> None:
        with self._lock:
            lines, self._buf = self._buf, []
        if lines and self._fh is not None:
            self._fh.write("\n".join(lines) + "\n")
            self._fh.flush()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self._buf:
                try:
                    await asyncio.to_thread(self._write)
                except OSError as exc:
                    log.error("accounting.write_failed", error=str(exc))

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await asyncio.to_thread(self._write)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
