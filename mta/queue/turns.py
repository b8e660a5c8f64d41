"""Weighted turns between keys (tenants): stride scheduling, as the scheduler's due queues
and each site's ready queue share them out."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Container

__all__ = ["Turn", "Turns"]

Turn = tuple[float, int, str]  # (pass, seq, key): the lowest pass goes next
_IDLE_KEPT = 4096  # idle keys whose pass is remembered at most (the rest restart at vtime)


class Turns:
    """Each waiting key has one turn; the key with the lowest pass goes next, and its pass
    moves on by 1/weight, so keys go in proportion to their weights. A key back from idle
    starts at the current pass: no credit saved up while it had nothing to send."""

    def __init__(self, weight_of: Callable[[str], int] = lambda _key: 1) -> None:
        self._weight_of = weight_of
        self._heap: list[Turn] = []
        self._passes: dict[str, float] = {}  # where an idle key's turns stopped
        self._vtime = 0.0  # the pass of the last turn taken
        self._seq = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._heap)

    def join(self, key: str) -> None:
        """``key`` has something waiting (it must not hold a turn already)."""
        start = max(self._passes.pop(key, 0.0), self._vtime)
        heapq.heappush(self._heap, (start, next(self._seq), key))

    def pop(self) -> Turn:
        """The next turn; give it back with :meth:`took`, :meth:`skip` or :meth:`put_back`."""
        return heapq.heappop(self._heap)

    def took(self, turn: Turn, more: bool) -> None:
        """The key took one; ``more``: it still has something waiting."""
        pass_, seq, key = turn
        self._vtime = pass_
        following = pass_ + 1.0 / max(1, self._weight_of(key))
        if more:
            heapq.heappush(self._heap, (following, seq, key))
        else:
            self._idle(key, following)

    def skip(self, turn: Turn) -> None:
        """The key turned out to have nothing waiting: it leaves, having taken nothing."""
        self._idle(turn[2], turn[0])

    def put_back(self, turn: Turn) -> None:
        """The key may not take now (throttled): its turn stays as it was."""
        heapq.heappush(self._heap, turn)

    def keep(self, keys: Container[str]) -> None:
        """Drop the turns of keys not in ``keys`` (they have nothing waiting any more)."""
        self._heap = [turn for turn in self._heap if turn[2] in keys]
        heapq.heapify(self._heap)

    def _idle(self, key: str, pass_: float) -> None:
        if len(self._passes) < _IDLE_KEPT:
            self._passes[key] = pass_
