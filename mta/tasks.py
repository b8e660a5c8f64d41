"""Small asyncio helpers shared by the node's long-running parts: one way to stop tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

__all__ = ["cancel_and_wait", "finish_or_cancel", "keep"]


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A task stopped here may have failed: read its exception so asyncio does not log
    # "exception was never retrieved" for what the caller chose to discard.
    if not task.cancelled():
        task.exception()


def _adopt(tasks: Iterable[asyncio.Task[Any] | None]) -> set[asyncio.Task[Any]]:
    # Retrieval is a done-callback, not a read after the wait: it then also covers tasks
    # still running at the timeout and tasks left behind when the caller is cancelled.
    live = {t for t in tasks if t is not None}
    for task in live:
        task.add_done_callback(_retrieve)
    return live


async def _cancel(live: set[asyncio.Task[Any]], timeout: float | None) -> set[asyncio.Task[Any]]:
    if not live:
        return set()
    for task in live:
        task.cancel()
    _, pending = await asyncio.wait(live, timeout=timeout)
    return pending


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None,
                          timeout: float | None = None) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (None entries are skipped) and wait until they have stopped, at most
    ``timeout`` seconds; returns the ones still running.

    asyncio.wait() lets the caller's own cancellation through, unlike awaiting a task under
    ``suppress(CancelledError)``, which would swallow it.
    """
    return await _cancel(_adopt(tasks), timeout)


async def finish_or_cancel(tasks: Iterable[asyncio.Task[Any]], grace: float,
                           timeout: float | None = None) -> set[asyncio.Task[Any]]:
    """Let ``tasks`` finish for up to ``grace`` seconds, then cancel the rest and wait for them
    (at most ``timeout``); returns the ones still running after that.

    If the caller is cancelled during the grace period, the tasks are cancelled too (not
    waited for) rather than left running with nobody to stop them.
    """
    live = _adopt(tasks)
    if not live:
        return set()
    try:
        _, pending = await asyncio.wait(live, timeout=grace)
    except asyncio.CancelledError:
        for task in live:
            task.cancel()
        raise
    return await _cancel(pending, timeout)


def keep(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any],
         name: str | None = None) -> asyncio.Task[Any]:
    """Run ``coro`` as a task held in ``tasks`` until it ends (the loop keeps only a weak
    reference to a task: one nobody holds may be collected mid-way)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
