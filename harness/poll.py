"""The one way to wait for a condition: poll it until a deadline, then fail saying what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _timed_out(what: str, pred: object, timeout: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what or pred}")


async def wait_until(pred: Callable[[], T], timeout: float = 10.0, what: str = "",
                     step: float = 0.01) -> T:
    """Poll ``pred`` on the event loop until it returns something true, and return that.

    ``step`` 0 checks on every turn of the loop (to catch a state that lasts one turn).
    """
    deadline = time.monotonic() + timeout
    while True:
        if value := pred():
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, pred, timeout)
        await asyncio.sleep(step)


def wait_until_sync(pred: Callable[[], T], timeout: float = 15.0, what: str = "",
                    step: float = 0.05) -> T:
    """``wait_until`` for code without an event loop (blocks the calling thread)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := pred():
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, pred, timeout)
        time.sleep(step)
