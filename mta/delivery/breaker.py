"""Circuit breaker per site: stop hammering a destination that does not answer."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Breaker"]


class Breaker:
    """Opens after ``threshold`` consecutive connection failures; after ``cooldown`` one
    probe connection may try (half-open); its success closes the breaker, its failure
    reopens it with a doubled cooldown (capped at 16x)."""

    def __init__(self, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.cooldown = cooldown
        self._clock = clock
        self.failures = 0
        self.state = "closed"
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May a new connection be tried now?"""
        if self.state == "closed":
            return True
        if self.state == "open" and self._clock() >= self.opened_at + self.cooldown:
            self.state = "half-open"
            self._probing = False
        if self.state == "half-open" and not self._probing:
            self._probing = True
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until a probe may be tried (0 when closed)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - self._clock())

    def on_success(self) -> None:
        self.failures = 0
        self.state = "closed"
        self.cooldown = self.base_cooldown
        self._probing = False

    def on_failure(self) -> bool:
        """Record a connection failure; return True if this opened the breaker."""
        self.failures += 1
        if self.state == "half-open":
            self.cooldown = min(self.cooldown * 2, self.base_cooldown * 16)
        elif self.failures < self.threshold or self.state == "open":
            return False
        self.state = "open"
        self.opened_at = self._clock()
        self._probing = False
        return True
