"""Messages waiting for their next attempt, in a heap; due ones are handed to a callback,
shared fairly between tenants when they must wait their turn."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable

from mta.queue.turns import Turn, Turns
from mta.tasks import cancel_and_wait

__all__ = ["Scheduler"]


class Scheduler:
    """A timer heap of (due, message id). Re-adding an id moves it; removal is lazy.

    Due messages that cannot be handed out at once (back-pressure: ``can_dispatch`` says no)
    wait in one FIFO per tenant, and the tenants take turns in proportion to their weights
    (stride scheduling): one tenant's backlog of a million never holds up another's next
    message. A tenant whose ``gate`` says to wait (its throttle) is passed over meanwhile.
    """

    def __init__(self, on_due: Callable[[str], None], clock: Callable[[], float] = time.time,
                 can_dispatch: Callable[[], bool] | None = None,
                 tenant_of: Callable[[str], str] | None = None,
                 weight_of: Callable[[str], int] | None = None,
                 gate: Callable[[str], float] | None = None) -> None:
        self._on_due = on_due
        self._clock = clock
        # Back-pressure: while this says no, due messages wait (call wake() when it may say
        # yes again).
        self._can_dispatch = can_dispatch or (lambda: True)
        self._tenant_of = tenant_of or (lambda _mid: "")
        # Seconds before a tenant may have its next message (0: now, and the slot is
        # taken); None when tenants are not throttled.
        self._gate = gate
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        # tenant -> due messages in arrival order, (id, due) checked against _due on the way
        # out; a tenant with waiting messages has one turn.
        self._ready: dict[str, deque[tuple[str, float]]] = {}
        self._turns = Turns(weight_of or (lambda _tenant: 1))
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
            self._collect(now)
            timeout = None  # paused, held back or nothing due: wait for wake()/add()
            if not self.paused:
                gated = self._dispatch()
                if self._ready and self._can_dispatch():
                    timeout = gated  # every waiting tenant is throttled: until the first
                if self._heap:
                    until = max(0.0, self._heap[0][0] - now)
                    timeout = until if timeout is None else min(timeout, until)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _collect(self, now: float) -> None:
        """Move the messages whose time has come from the timer heap to their tenants'
        queues."""
        heap, due_of = self._heap, self._due
        while heap and heap[0][0] <= now:
            due, mid = heapq.heappop(heap)
            if due_of.get(mid) != due:
                continue  # stale entry: moved or removed
            tenant = self._tenant_of(mid)
            queue = self._ready.get(tenant)
            if queue is None:
                queue = self._ready[tenant] = deque()
                self._turns.join(tenant)
            queue.append((mid, due))

    def _dispatch(self) -> float | None:
        """Hand out due messages, tenants taking turns, while there is room; the seconds
        until the first throttled tenant may go again (None if none is throttled)."""
        turns, gated = self._turns, list[Turn]()
        wait: float | None = None
        while turns and self._can_dispatch() and not self.paused:
            turn = turns.pop()
            tenant = turn[2]
            queue = self._ready[tenant]
            mid = self._next_live(queue)
            if mid is None:
                del self._ready[tenant]
                turns.skip(turn)
                continue
            if self._gate is not None and (hold := self._gate(tenant)) > 0:
                queue.appendleft((mid, self._due[mid]))
                gated.append(turn)
                wait = hold if wait is None else min(wait, hold)
                continue
            del self._due[mid]
            if not queue:
                del self._ready[tenant]
            turns.took(turn, more=bool(queue))
            self._on_due(mid)
        for turn in gated:
            turns.put_back(turn)
        return wait

    def _next_live(self, queue: deque[tuple[str, float]]) -> str | None:
        while queue:
            mid, due = queue.popleft()
            if self._due.get(mid) == due:
                return mid
        return None
