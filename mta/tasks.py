"""Small asyncio helpers shared by the node's long-running parts: one way to stop tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait", "finish_or_cancel"]


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A task stopped here may have failed: read its exception so asyncio does not log
    # "exception was never retrieved" for what the caller chose to discard.
    if not task.cancelled():
        task.exception()


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None,
                          timeout: float | None = None) -> set[asyncio.Task[Any]]:
    """Cancel ``tasks`` (None entries are skipped) and wait until they have stopped, at most
    ``timeout`` seconds; returns the ones still running.

    asyncio.wait() lets the caller's own cancellation through, unlike awaiting a task under
    ``suppress(CancelledError)``, which would swallow it.
    """
    live = {t for t in tasks if t is not None}
    if not live:
        return set()
    for task in live:
        task.cancel()
    done, pending = await asyncio.wait(live, timeout=timeout)
    for task in done:
        _retrieve(task)
    for task in pending:
        task.add_done_callback(_retrieve)
    return pending


async def finish_or_cancel(tasks: Iterable[asyncio.Task[Any]], grace: float,
                           timeout: float | None = None) -> set[asyncio.Task[Any]]:
    """Let ``tasks`` finish for up to ``grace`` seconds, then cancel the rest and wait for them
    (at most ``timeout``); returns the ones still running after that."""
    live = set(tasks)
    if not live:
        return set()
    done, pending = await asyncio.wait(live, timeout=grace)
    for task in done:
        _retrieve(task)
    return await cancel_and_wait(*pending, timeout=timeout)
