"""Password-guessing defence: slow down, then refuse, AUTH from an address that keeps failing."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["AuthGuard"]

_MAX_TRACKED = 100_000  # addresses remembered at most (oldest forgotten first)


class AuthGuard:
    """Per client address: each failure after the first answers ``delay`` x (failures - 1)
    later (at most 5x); ``max_failures`` failures within ``lockout`` seconds refuse AUTH from
    that address for ``lockout`` seconds."""

    def __init__(self, max_failures: int, lockout: float, delay: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.lockout = lockout
        self.delay = delay
        self._clock = clock
        # ip -> (failures, first failure time, locked until)
        self._state: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def locked_for(self, ip: str) -> float:
        """Seconds this address is still refused AUTH (0 when it may try)."""
        state = self._state.get(ip)
        if state is None:
            return 0.0
        return max(0.0, state[2] - self._clock())

    def failed(self, ip: str) -> tuple[float, bool]:
        """Record a failure: (seconds to wait before answering, whether it locked now)."""
        now = self._clock()
        count, first, until = self._state.pop(ip, (0, now, 0.0))
        if now - first > self.lockout and until <= now:
            count, first = 0, now  # an old streak: start counting again
        count += 1
        locked = count >= self.max_failures and until <= now
        if locked:
            until = now + self.lockout
        self._state[ip] = (count, first, until)
        while len(self._state) > _MAX_TRACKED:
            self._state.popitem(last=False)
        return self.delay * min(count - 1, 5), locked

    def succeeded(self, ip: str) -> None:
        self._state.pop(ip, None)
