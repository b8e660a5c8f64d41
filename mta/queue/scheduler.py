"""Messages waiting for their next attempt, in a heap; due ones are handed to a callback."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

from mta.tasks import cancel_and_wait

__all__ = ["Scheduler"]


class Scheduler:
    """A timer heap of (due, message id). Re-adding an id moves it; removal is lazy."""

    def __init__(self, on_due: Callable[[str], None], clock: Callable[[], float] = time.time,
                 can_dispatch: Callable[[], bool] | None = None) -> None:
        self._on_due = on_due
        self._clock = clock
        # Back-pressure: while this says no, due messages wait in the heap (call wake() when
        # it may say yes again).
        self._can_dispatch = can_dispatch or (lambda: True)
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.paused = False

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._due

    def add(self, message_id: str, due: float) -> None:
        self._due[message_id] = due
        heapq.heappush(self._heap, (due, message_id))
        if self._heap[0][1] == message_id:
            self._wake.set()

    def remove(self, message_id: str) -> bool:
        return self._due.pop(message_id, None) is not None

    def due_of(self, message_id: str) -> float | None:
        return self._due.get(message_id)

    def ids(self) -> list[str]:
        return list(self._due)

    def reschedule_all(self, due: float, match: Callable[[str], bool] | None = None) -> int:
        """Move every (matching) waiting message to ``due``; returns how many moved."""
        moved = [mid for mid in self._due if match is None or match(mid)]
        for mid in moved:
            self.add(mid, due)
        self._wake.set()
        return len(moved)

    def wake(self) -> None:
        """Re-check the heap now (after a pause ends)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = self._clock()
            while self._heap and not self.paused and self._can_dispatch():
                due, mid = self._heap[0]
                if self._due.get(mid) != due:
                    heapq.heappop(self._heap)  # stale entry: moved or removed
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                del self._due[mid]
                self._on_due(mid)
            timeout = None  # paused or held back: wait for wake()/add(), do not spin
            if self._heap and not self.paused and self._can_dispatch():
                timeout = max(0.0, self._heap[0][0] - now)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
