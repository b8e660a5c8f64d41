"""How far behind a follower is, in records and in time: marks of where each written batch
ended, how many records the log held then, and when it was written. Only this owner's writes
are marked: for a follower behind where the log stood when the owner opened the shard (after
a takeover), the records are unknown and the age is at least the time since then."""

from __future__ import annotations

from bisect import bisect_right

from mta.replication.insync import NOTHING, Position

__all__ = ["WriteMarks"]

_LIMIT = 65536  # marks kept; a follower that acks nothing for longer gets a lower bound


class WriteMarks:
    """The owner's writes since it opened the shard, for :meth:`lag`."""

    def __init__(self, start: Position = NOTHING, opened: float = 0.0,
                 limit: int = _LIMIT) -> None:
        self.records = 0  # records written since the shard was opened
        self.start, self.opened = start, opened  # the log's end at open, and when
        self._limit = limit
        self._ends: list[Position] = []  # ascending: the log only grows
        self._counts: list[int] = []  # self.records before each batch
        self._times: list[float] = []

    def wrote(self, end: Position, records: int, now: float) -> None:
        """A batch of ``records`` records ending at ``end`` was written at ``now``."""
        if records <= 0:
            return  # a segment header: no record, nobody waits for it
        self._ends.append(end)
        self._counts.append(self.records)
        self._times.append(now)
        self.records += records
        if len(self._ends) > self._limit + self._limit // 8:
            # In chunks: deleting from the front of the lists on every write would cost
            # their length each time.
            self.prune(self._ends[len(self._ends) - self._limit - 1])

    def lag(self, acked: Position, now: float) -> tuple[int | None, float]:
        """Records written past ``acked`` (None: unknown, it lacks some of what the log held
        at open) and the age of the oldest of them (seconds; at least, when unknown)."""
        if acked < self.start:
            return None, max(0.0, now - self.opened)
        first = bisect_right(self._ends, acked)  # the first batch that ends past acked
        if first == len(self._ends):
            return 0, 0.0
        return self.records - self._counts[first], max(0.0, now - self._times[first])

    def prune(self, low: Position) -> None:
        """Forget batches ending at or before ``low`` (every follower has them)."""
        drop = bisect_right(self._ends, low)
        if drop:
            del self._ends[:drop], self._counts[:drop], self._times[:drop]
