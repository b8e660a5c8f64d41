"""Group commit: one thread takes every pending append, writes it, syncs once per file.

Callers on the event loop get a future per append; the thread resolves a whole batch with a
single ``call_soon_threadsafe``. Each append also carries an ``on_durable`` callback that runs
on the loop even if the caller stopped waiting, so the in-memory index never misses a record
that reached the disk.

An append may carry ``side`` bytes (accounting log lines) for a side file. Each shard's share
of a batch ends with a COMMIT record that holds the batch's lines for that shard and the
offset they get in the side file; the lines then go to the side file, after every shard's
records were written and before they are synced. Whatever moment the process is killed at,
recovery finds in the spool what the side file should say and re-emits what it lacks (see
:mod:`mta.spool.sidelines`).
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from mta.logs import describe
from mta.spool.errors import SpoolWriteError

__all__ = ["AppendLog", "BatchObserver", "Extent", "GroupCommitWriter", "Position", "SideFile"]

log = structlog.get_logger("mta.spool.writer")

Position = tuple[int, int]  # (segment seq, offset)
Extent = tuple[int, int, int]  # (segment seq, offset, size)


class AppendLog(Protocol):
    """What the writer needs from a shard's log."""

    def append_many(self, chunks: list[bytes], side_at: dict[str, Any],
                    lines: bytes) -> tuple[list[Position], Extent]:
        """Writer thread: write ``chunks`` and a COMMIT record for the batch (``lines``
        bound for the side file at ``side_at``), not yet durable; return where each chunk
        and the COMMIT landed."""

    def sync(self) -> None:
        """Writer thread: make everything written so far durable."""

    def committed(self, extent: Extent) -> None:
        """Event loop: the batch's COMMIT record at ``extent`` is durable."""


class SideFile(Protocol):
    """The file the ``side`` bytes go to; every method runs on the writer thread."""

    def side_at(self) -> dict[str, Any]:
        """Where the next bytes will land (file identity and offset), as stored in COMMIT."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more are promised to the file (their COMMIT was written)."""

    def write(self, data: bytes) -> None:
        """Append ``data``, the promised bytes in the order they were promised."""


class BatchObserver(Protocol):
    def __call__(self, records: int, nbytes: int, files: int, sync_seconds: float) -> None: ...


def _settle(futures: tuple[asyncio.Future[Position] | None, ...], position: Position | None,
            error: BaseException | None) -> None:
    """Give each future not done yet (a cancelled caller's is) the position, or the error."""
    for fut in futures:
        if fut is None or fut.done():
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(position)  # type: ignore[arg-type]


class _Item:
    __slots__ = ("data", "future", "log", "on_durable", "side", "waiter")

    def __init__(
        self,
        log: AppendLog,
        data: bytes,
        future: asyncio.Future[Position],
        on_durable: Callable[[Position], None] | None,
        side: bytes | None,
        waiter: asyncio.Future[Position] | None,
    ) -> None:
        self.log = log
        self.data = data
        self.future = future
        self.on_durable = on_durable
        self.side = side
        self.waiter = waiter


_Outcome = tuple[AppendLog, list[_Item], list[Position] | None, Extent | None,
                 SpoolWriteError | None]
_Written = tuple[AppendLog, list[_Item], list[Position], Extent]


class GroupCommitWriter:
    """The spool's dedicated writer thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_batch_bytes: int = 8 * 1024 * 1024,
        observe: BatchObserver | None = None,
        on_batch: Callable[[], None] | None = None,
        side: SideFile | None = None,
    ) -> None:
        self._loop = loop
        self._side = side
        self._max_batch_bytes = max_batch_bytes
        self._observe = observe
        self._on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def create_future(self) -> asyncio.Future[Position]:
        """A future of the writer's loop (no lookup of the running loop: that costs a
        getpid() system call each time)."""
        return self._loop.create_future()

    def append(
        self,
        log: AppendLog,
        data: bytes,
        on_durable: Callable[[Position], None] | None = None,
        side: bytes | None = None,
        waiter: asyncio.Future[Position] | None = None,
    ) -> asyncio.Future[Position]:
        """Queue ``data`` for ``log``; the future resolves once it is on disk (fdatasync).
        ``side`` goes to the side file if, and only if, ``data`` was written; ``data`` may
        be empty when only ``side`` is to be written (lines recovery found missing).
        ``waiter``, if given, gets the same outcome in the same step (unless it is done
        already: a cancelled caller's); only the returned future is the writer's own."""
        fut: asyncio.Future[Position] = self._loop.create_future()
        if self._stopping:
            _settle((fut, waiter), None, SpoolWriteError(errno.ESHUTDOWN, "spool is shutting down"))
            return fut
        item = _Item(log, data, fut, on_durable, side, waiter)
        with self._cond:
            self._pending.append(item)
            if len(self._pending) == 1:
                self._cond.notify()
        return fut

    async def close(self) -> None:
        """Write out everything queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # --- writer thread ---------------------------------------------------------------------

    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._pending.popleft()]
            nbytes = len(batch[0].data)
            while self._pending and nbytes < self._max_batch_bytes:
                item = self._pending.popleft()
                nbytes += len(item.data)
                batch.append(item)
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            outcomes, written = self._append_batch(batch)
            t0 = time.perf_counter()
            for append_log, items, positions, commit in written:
                try:
                    append_log.sync()
                    outcomes.append((append_log, items, positions, commit, None))
                except SpoolWriteError as exc:
                    outcomes.append((append_log, items, None, None, exc))
            sync_seconds = time.perf_counter() - t0
            if self._observe is not None:
                self._observe(len(batch), sum(len(i.data) for i in batch), len(written),
                              sync_seconds)
            try:
                self._loop.call_soon_threadsafe(self._resolve, outcomes)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more

    def _append_batch(self, batch: list[_Item]) -> tuple[list[_Outcome], list[_Written]]:
        """Write each log's share of ``batch`` with its COMMIT, then the side file's lines
        of every share written (before anything is synced); the shares that failed are
        outcomes already."""
        side = self._side
        by_log: dict[int, tuple[AppendLog, list[_Item]]] = {}
        for item in batch:
            by_log.setdefault(id(item.log), (item.log, []))[1].append(item)
        outcomes: list[_Outcome] = []
        written: list[_Written] = []
        side_data: list[bytes] = []
        for append_log, items in by_log.values():
            lines = b"".join(it.side for it in items if it.side) if side else b""
            try:
                positions, commit = append_log.append_many(
                    [it.data for it in items], side.side_at() if side else {}, lines)
            except SpoolWriteError as exc:
                outcomes.append((append_log, items, None, None, exc))
                continue
            except Exception as exc:  # a bug must not kill the writer and hang callers
                text = describe(exc)
                log.exception("spool.writer.append_failed", error=text)
                # The class name too: this is a bug, and its name is the lead.
                name = type(exc).__name__
                outcomes.append((append_log, items, None, None, SpoolWriteError(
                    errno.EIO, text if text.startswith(name) else f"{name}: {text}")))
                continue
            written.append((append_log, items, positions, commit))
            if lines and side is not None:
                side.advance(len(lines))
                side_data.append(lines)
        if side is not None and side_data:
            data = b"".join(side_data)
            try:
                side.write(data)
            except Exception:  # the side file must never stop the spool
                log.exception("spool.writer.side_write_failed", bytes=len(data))
        return outcomes, written

    # --- event loop ----------------------------------------------------------------------

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        for append_log, items, positions, commit, exc in outcomes:
            if commit is not None:
                append_log.committed(commit)
            for i, item in enumerate(items):
                if positions is not None:
                    if item.on_durable is not None:
                        item.on_durable(positions[i])
                    _settle((item.future, item.waiter), positions[i], None)
                else:
                    _settle((item.future, item.waiter), None, exc or SpoolWriteError(errno.EIO))
        if self._on_batch is not None:
            self._on_batch()
