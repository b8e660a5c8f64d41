"""The one way to stop tasks (mta.tasks): bounded waits, the caller's own cancellation passes
through, and nothing a stopped task raised is left for asyncio to complain about."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable
from typing import Any, TypeVar

from mta.tasks import cancel_and_wait, finish_or_cancel

T = TypeVar("T")

# Every wait in these tests is bounded, and never by cancelling the helper under test (a
# helper that swallowed cancellation would hang the run instead of failing it).
_BOUND = 5.0


async def _within(awaitable: Awaitable[T]) -> T:
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=_BOUND)
    assert task in done, f"still waiting after {_BOUND}s"
    return task.result()


async def _stubborn(cancelled: asyncio.Event, release: asyncio.Event) -> None:
    """Ignores every cancellation until ``release`` is set."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.set()


async def test_a_task_that_ignores_cancellation_is_returned_after_the_timeout() -> None:
    cancelled, release = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_stubborn(cancelled, release))
    try:
        await asyncio.sleep(0)  # let it reach its wait
        assert await _within(cancel_and_wait(task, None, timeout=0.05)) == {task}
        assert cancelled.is_set() and not task.done()
    finally:
        release.set()
    await _within(task)
    assert await cancel_and_wait(None) == set()


async def test_the_callers_own_cancellation_passes_through() -> None:
    cancelled, release = asyncio.Event(), asyncio.Event()
    inner = asyncio.create_task(_stubborn(cancelled, release))
    outer = asyncio.create_task(cancel_and_wait(inner))
    try:
        await _within(cancelled.wait())
        outer.cancel()
        done, _ = await asyncio.wait({outer}, timeout=_BOUND)
        assert outer in done and outer.cancelled()
        assert not inner.done()
    finally:
        release.set()
    await _within(asyncio.wait({inner, outer}))


async def test_a_cancelled_caller_of_finish_or_cancel_cancels_its_tasks() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(forever())
    outer = asyncio.create_task(finish_or_cancel([task], grace=3600))
    try:
        await _within(started.wait())
        await asyncio.sleep(0)  # let outer reach its wait
        outer.cancel()
        done, _ = await asyncio.wait({outer, task}, timeout=_BOUND)
        assert done == {outer, task}
        assert outer.cancelled() and task.cancelled()
    finally:
        task.cancel()


async def test_finish_or_cancel_lets_quick_tasks_finish_and_cancels_the_rest() -> None:
    quick_done = asyncio.Event()

    async def quick() -> None:
        quick_done.set()

    quick_task = asyncio.create_task(quick())
    slow_task = asyncio.create_task(asyncio.Event().wait())
    assert await _within(finish_or_cancel([quick_task, slow_task], grace=0.05)) == set()
    assert quick_done.is_set() and not quick_task.cancelled()
    assert slow_task.cancelled()
    assert await finish_or_cancel([], grace=3600) == set()


async def test_what_a_stopped_task_raised_is_retrieved() -> None:
    # Where asyncio reports a task exception that was never retrieved.
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        await _stop_failing_tasks()
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [c["message"] for c in loop_errors] == []


async def _stop_failing_tasks() -> None:
    async def fails_at_once() -> None:
        raise ValueError("failed before the stop")

    async def fails_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise ValueError("failed while stopping") from None

    async def fails_after_the_timeout(release: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()
            raise ValueError("failed once the caller had gone") from None

    release = asyncio.Event()
    tasks = [asyncio.create_task(fails_at_once()), asyncio.create_task(fails_when_cancelled()),
             asyncio.create_task(fails_after_the_timeout(release))]
    try:
        await _within(asyncio.wait(tasks[:1]))
        await asyncio.sleep(0)  # the others reach their waits
        assert await _within(cancel_and_wait(*tasks, timeout=0.05)) == {tasks[2]}
    finally:
        release.set()
    await _within(asyncio.wait(tasks))
    quick = asyncio.create_task(fails_at_once())
    assert await _within(finish_or_cancel([quick], grace=_BOUND)) == set()
    for _ in range(3):  # done-callbacks run before the tasks are collected, on return
        await asyncio.sleep(0)
