"""GCRA throttles ("100/s", "5000/h") and the adaptive back-off of a site."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Backoff", "Throttle"]


class Throttle:
    """Generic cell rate algorithm: at most ``rate`` events per second, bursts of ``burst``.

    :meth:`reserve` books the next free slot and returns how long to wait for it, so any
    number of concurrent callers share the rate fairly. ``rate`` None means unlimited.
    """

    def __init__(self, rate: float | None, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next event

    def _book(self, only_if_free: bool) -> float:
        """Seconds until the next free slot; the slot is booked unless ``only_if_free`` and
        it is not free now."""
        if not self.rate:
            return 0.0
        interval = 1.0 / self.rate
        now = self._clock()
        tat = max(self._tat, now)
        wait = max(0.0, tat - now - (self.burst - 1) * interval)
        if not (only_if_free and wait > 0):
            self._tat = tat + interval
        return wait

    def reserve(self) -> float:
        """Book a slot; return seconds to wait before using it (0 when free now)."""
        return self._book(only_if_free=False)

    def take(self) -> float:
        """Book a slot only if one is free now (returns 0); otherwise book nothing and return
        the seconds until one is."""
        return self._book(only_if_free=True)

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


class Backoff:
    """A site's politeness factor in (0, 1]: halved on a 421 or a run of 4xx, then recovers.

    Multiplicative decrease, additive increase: every success adds ``step`` back.
    """

    def __init__(self, floor: float = 1 / 64, step: float = 0.02, run: int = 5) -> None:
        self.factor = 1.0
        self.floor = floor
        self.step = step
        self.run = run
        self._temp_failures = 0

    def on_success(self) -> None:
        self._temp_failures = 0
        self.factor = min(1.0, self.factor + self.step)

    def on_temp_failure(self, code: int) -> bool:
        """Record a 4xx; return True when it made the site back off."""
        self._temp_failures += 1
        if code == 421 or self._temp_failures >= self.run:
            self._temp_failures = 0
            self.factor = max(self.floor, self.factor / 2)
            return True
        return False
