"""The caller's future and the writer's own (mta/spool/writer.py ``waiter``): the writer
settles both in one step; a cancelled caller leaves the append and its bookkeeping alone."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mta.spool import SpoolWriteError
from mta.spool.shard import Shard
from tests.support import wait_until


class HeldSync:
    """``os.fdatasync`` that waits for ``release()`` (the real call follows, or ``error``)."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.gate = threading.Event()
        self.error: OSError | None = None

    def release(self) -> None:
        self.gate.set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = os.fdatasync

        def held(fd: int) -> None:
            self.inside.set()
            self.gate.wait(30)
            error, self.error = self.error, None  # fails once
            if error is not None:
                raise error
            real(fd)

        monkeypatch.setattr(os, "fdatasync", held)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldSync]:
    sync = HeldSync()
    sync.install(monkeypatch)
    yield sync
    sync.release()  # never leave the writer thread waiting


async def test_a_cancelled_caller_leaves_the_write_and_its_bookkeeping_alone(
        shard: Shard, held: HeldSync) -> None:
    task = asyncio.create_task(shard.set_state("M0", {"tries": 1}))
    await wait_until(held.inside.is_set, what="the writer inside fdatasync")
    assert task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The append is still in flight: the shard stays busy (close() must wait for it) and the
    # message stays marked pending (compaction must not copy it meanwhile).
    assert not shard._idle.is_set()
    assert shard._pending == {"M0": 1}
    held.release()
    await wait_until(shard._idle.is_set, what="the write ended")
    assert shard._pending == {}
    # The cancelled caller's state still became durable and reached the index.
    assert shard.index.messages["M0"].state == {"tries": 1}


async def test_the_caller_gets_the_write_error_and_no_future_is_left_unread(
        shard: Shard, held: HeldSync) -> None:
    unread: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unread.append(context))
    try:
        held.error = OSError(errno.EIO, "Input/output error")
        held.release()
        with pytest.raises(SpoolWriteError, match="EIO"):
            await shard.set_state("M0", {"tries": 2})
        await wait_until(shard._idle.is_set, what="the failed write ended")
        # The writer thread holds its last batch until it takes the next one.
        await shard.set_state("M0", {"tries": 3})
        gc.collect()  # an unread exception is reported when its future is collected
        await asyncio.sleep(0)
        assert not unread, unread
    finally:
        loop.set_exception_handler(None)


async def test_the_writer_settles_the_callers_future_with_its_own(shard: Shard) -> None:
    """Both futures resolve with one position, in the same step of the loop."""
    assert shard._log is not None
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    seen: list[str] = []
    own = shard._writer.append(shard._log, b"", None, None, waiter)
    own.add_done_callback(lambda _f: seen.append("own"))
    waiter.add_done_callback(lambda _f: seen.append("waiter"))
    position = await waiter
    assert own.done() and own.result() == position
    await wait_until(lambda: len(seen) == 2, what="both callbacks")
