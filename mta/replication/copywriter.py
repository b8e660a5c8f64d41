"""The follower's group commit: one thread applies every queued operation on every copy.

The structure is the owner's :class:`mta.spool.writer.GroupCommitWriter` (a queue, one thread
taking all that is pending, one ``call_soon_threadsafe`` per batch), kept separate rather than
shared: the owner's writer is the ingress hot path and its batch handling (COMMIT records,
side file) has nothing in common with this one beyond the queue.

Per batch, each copy's operations run in queue order; then each copy that took a write is
fdatasynced once. An append's result is the copy's durable position after the batch (acks are
cumulative). A failed operation fails the ones queued after it for the same copy in the same
batch (with the same exception: they would land after a gap); the thread goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from mta.replication.copy import Position, ShardCopy
from mta.replication.errors import CopyError
from mta.spool.writer import BatchObserver

__all__ = ["CopyWriter"]

log = structlog.get_logger("mta.replication.copywriter")

_Apply = Callable[[ShardCopy | None], Any]


class _Op:
    __slots__ = ("ack", "apply", "copy", "future", "nbytes")

    def __init__(self, copy: ShardCopy | None, apply: _Apply, future: asyncio.Future[Any],
                 nbytes: int, ack: bool) -> None:
        self.copy = copy
        self.apply = apply
        self.future = future
        self.nbytes = nbytes
        self.ack = ack  # the result is the copy's durable position after the batch


_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


class CopyWriter:
    """The follower's writer thread; every :class:`ShardCopy` is used only through it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_batch_bytes: int = 8 * 1024 * 1024,
                 observe: BatchObserver | None = None) -> None:
        self._loop = loop
        self._max_batch_bytes = max_batch_bytes
        # Called per batch with (operations, bytes, copies synced, seconds applying and syncing).
        self._observe = observe
        self._pending: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="copy-writer", daemon=True)
        self._thread.start()

    # --- event loop ------------------------------------------------------------------------

    def _submit(self, copy: ShardCopy | None, apply: _Apply, nbytes: int = 0,
                ack: bool = False) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._stopping:
            fut.set_exception(CopyError("copy writer is shutting down"))
            return fut
        op = _Op(copy, apply, fut, nbytes, ack)
        with self._cond:
            self._pending.append(op)
            if len(self._pending) == 1:
                self._cond.notify()
        return fut

    def open(self, root: Path, shard: int) -> asyncio.Future[ShardCopy]:
        """Open (or create) the copy of ``shard`` under ``root``."""
        return self._submit(None, lambda _c: ShardCopy.open(root, shard))

    def append(self, copy: ShardCopy, token: int, seq: int, offset: int, data: bytes,
               prev: Position | None = None) -> asyncio.Future[Position]:
        """Write a frame; resolves to the copy's durable position once it is synced."""
        return self._submit(copy, lambda c: c.append(token, seq, offset, data, prev),
                            len(data), ack=True)

    def accept_token(self, copy: ShardCopy, token: int) -> asyncio.Future[None]:
        """Follow ``token`` (a new owner's hello); persisted when the future resolves."""
        return self._submit(copy, lambda c: c.accept_token(token))

    def truncate(self, copy: ShardCopy, seq: int, offset: int,
                 token: int | None = None) -> asyncio.Future[Position]:
        return self._submit(copy, lambda c: c.truncate(seq, offset, token))

    def drop(self, copy: ShardCopy, seqs: Iterable[int],
             token: int | None = None) -> asyncio.Future[None]:
        wanted = list(seqs)
        return self._submit(copy, lambda c: c.drop(wanted, token))

    def reset(self, copy: ShardCopy) -> asyncio.Future[None]:
        return self._submit(copy, lambda c: c.reset())

    def segments(self, copy: ShardCopy) -> asyncio.Future[list[tuple[int, int, int]]]:
        """``(seq, header token, size)`` of every segment, read in queue order (so it is
        what the copy holds after everything queued before)."""
        def read(c: ShardCopy | None) -> list[tuple[int, int, int]]:
            assert c is not None
            tokens = c.header_tokens()
            return [(seq, tokens.get(seq, -1), size) for seq, size in c.segments()]
        return self._submit(copy, read)

    def release(self, copy: ShardCopy) -> asyncio.Future[None]:
        """Close the copy's file once what is queued before is done."""
        return self._submit(copy, lambda c: c.close())

    async def close(self) -> None:
        """Apply everything queued, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    def _resolve(self, outcomes: list[_Outcome]) -> None:
        for fut, result, exc in outcomes:
            if fut.done():
                continue  # the caller cancelled its wait
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    # --- writer thread ---------------------------------------------------------------------

    def _take_batch(self) -> list[_Op] | None:
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._pending.popleft()]
            nbytes = batch[0].nbytes
            while self._pending and nbytes < self._max_batch_bytes:
                op = self._pending.popleft()
                nbytes += op.nbytes
                batch.append(op)
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            by_copy: dict[int, list[_Op]] = {}
            for op in batch:
                # Opens have no copy yet: each is its own group.
                key = id(op.copy) if op.copy is not None else id(op)
                by_copy.setdefault(key, []).append(op)
            outcomes: list[_Outcome] = []
            synced = 0
            t0 = time.perf_counter()
            for ops in by_copy.values():
                synced += self._apply(ops, outcomes)
            if self._observe is not None:
                self._observe(len(batch), sum(op.nbytes for op in batch), synced,
                              time.perf_counter() - t0)
            try:
                self._loop.call_soon_threadsafe(self._resolve, outcomes)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more

    def _apply(self, ops: list[_Op], outcomes: list[_Outcome]) -> int:
        """Run one copy's share of the batch in order, then sync it once; return 1 if it
        was synced."""
        done: list[tuple[_Op, Any]] = []
        failed: BaseException | None = None
        for op in ops:
            if failed is not None:
                outcomes.append((op.future, None, failed))
                continue
            try:
                done.append((op, op.apply(op.copy)))
            except CopyError as exc:
                failed = exc
                outcomes.append((op.future, None, exc))
            except Exception as exc:  # a bug must not kill the thread and hang callers
                log.exception("replication.copy_op_failed")
                failed = exc
                outcomes.append((op.future, None, exc))
        copy = ops[0].copy
        if copy is None or copy.broken or not done:
            for op, result in done:
                # Writes a broken copy took may never reach its disk: no ack for them.
                lost = op.ack and copy is not None and copy.broken
                outcomes.append((op.future, None, failed) if lost else (op.future, result, None))
            return 0
        try:
            durable = copy.sync()
        except CopyError as exc:
            outcomes.extend((op.future, None, exc) for op, _ in done)
            return 1
        for op, result in done:
            outcomes.append((op.future, durable if op.ack else result, None))
        return 1
