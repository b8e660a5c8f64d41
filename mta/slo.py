"""Service-level history of one node, per minute, kept for a day and persisted in the spool.

The counts (submitted, delivered, deferred, failed) come from the node's accounting log: each
tick reads the lines added since the last one and adds them to the minute of their ``time``.
The history is saved together with the log position it covers, in one atomic write (every
few ticks and on a graceful stop), so a restart, even after ``kill -9``, reads on from there:
nothing is lost or counted twice, and the figures reconcile with the log exactly. Only the
submission latencies still come from the Prometheus histogram (``mta_submit_seconds``), by
deltas, so those of the last few seconds before a kill are lost.

Readiness is sampled every tick on a fixed grid, plus once when a report is asked for; the
samples a node that was up all along would have taken come from the seconds elapsed since its
first start, so the current minute and the first one count pro rata. Time the node was down
counts as unavailable. Reports from several nodes merge by adding counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from mta.logs import describe
from mta.metrics import SUBMIT_BUCKETS

__all__ = ["LogPosition", "LogScanner", "SloTracker", "count_lines", "merge_reports"]

log = structlog.get_logger("mta.slo")

KEEP_MINUTES = 24 * 60
SAVE_TICKS = 3  # a kill loses at most this many readiness samples (never a count)
# Recipients bounced because the mailbox does not exist are the list's fault, not ours (an
# operator's own bounces are AdminBounce records, counted apart).
_NOT_OUR_FAILURE = (b"bad-mailbox", b"inactive-mailbox")
_COUNTERS = ("delivered", "deferred", "failed", "submits", "samples", "ready")
# Only the latency histogram is read from the registry (collecting all of it would also read
# every gauge, a walk over all delivery sites, each tick).
_SAMPLES = ("mta_submit_seconds_bucket",)

# Indexes of a minute's counts as count_lines() returns them.
SUBMITTED, DELIVERED, DEFERRED, FAILED = range(4)
_KINDS = {b"Reception": SUBMITTED, b"Delivery": DELIVERED, b"TransientFailure": DEFERRED,
          b"Expiration": FAILED}
# Our own encoder (mta.accounting) writes these two keys first, in this order and without
# spaces, so a line is classified without parsing it.
_LINE = re.compile(rb'^\{"type":"(\w+)","time":([-+.\deE]+)[,}]', re.MULTILINE)
_CLASS_KEY = b'"bounce_class":"'
_CHUNK = 4 << 20
_TAIL = 512  # bytes before the offset whose hash tells the same file content apart


def count_lines(data: bytes, into: dict[int, list[int]]) -> int:
    """Add the accounting lines in ``data`` (whole lines) to ``into``: minute -> [submitted,
    delivered, deferred, failed]. A Bounce is failed unless its class is the recipient's fault;
    AdminBounce and lines not in our format count nowhere. Returns the lines counted."""
    counted = 0
    for m in _LINE.finditer(data):
        kind = m.group(1)
        index = _KINDS.get(kind)
        if index is None:
            if kind != b"Bounce" or _bounce_class(data, m.end()) in _NOT_OUR_FAILURE:
                continue
            index = FAILED
        try:
            minute = int(float(m.group(2)) // 60)
        except ValueError:
            continue
        counts = into.get(minute)
        if counts is None:
            counts = into[minute] = [0, 0, 0, 0]
        counts[index] += 1
        counted += 1
    return counted


def _bounce_class(data: bytes, start: int) -> bytes:
    # The class is the line's last key; a key cannot occur inside a JSON string (its quotes
    # would be escaped), so the last occurrence on the line is the key itself.
    end = data.find(b"\n", start)
    at = data.rfind(_CLASS_KEY, start, len(data) if end < 0 else end)
    if at < 0:
        return b""
    at += len(_CLASS_KEY)
    return data[at:data.find(b'"', at)]


@dataclass(frozen=True)
class LogPosition:
    """Where the next unread line of the accounting log starts: the file (``dev:ino``), the
    offset, and a hash of the bytes before it (an inode number can be reused)."""

    ident: str = ""
    offset: int = 0
    tail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ident": self.ident, "offset": self.offset, "tail": self.tail}

    @classmethod
    def from_json(cls, raw: Any) -> LogPosition:
        """ValueError unless ``raw`` is what :meth:`to_json` wrote."""
        if not isinstance(raw, dict):
            raise ValueError("the log position is not an object")
        ident, offset, tail = raw.get("ident"), raw.get("offset"), raw.get("tail")
        if not (isinstance(ident, str) and isinstance(tail, str) and type(offset) is int
                and offset >= 0):
            raise ValueError("the log position is malformed")
        return cls(ident, offset, tail)


def _ident(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _tail_hash(fd: int, offset: int) -> str:
    start = max(0, offset - _TAIL)
    return hashlib.blake2b(os.pread(fd, offset - start, start), digest_size=12).hexdigest()


def _holds(fd: int, pos: LogPosition) -> bool:
    """Whether ``pos`` is a position in this open file: its inode, and its bytes before the
    offset."""
    st = os.fstat(fd)
    return (pos.ident == _ident(st) and pos.offset <= st.st_size
            and _tail_hash(fd, pos.offset) == pos.tail)


class LogScanner:
    """Reads the accounting log's new whole lines from a :class:`LogPosition` (in a thread).

    It follows the file it has open: a log renamed away keeps being read, since the node
    keeps writing to it, until a different, non-empty file appears at the path (the writer
    has moved on). At the first scan, a position in a file renamed away (into another name in
    the log's directory: a restart after a rotation) is read on from there first. A position
    in another file, or past the end of this one (truncated), or over different bytes, starts
    this file from 0. A missing file is nothing new yet.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()  # the loop's thread and a stop may scan at once
        self._resumed = False  # the renamed file of a saved position is looked for once

    def scan(self, pos: LogPosition) -> tuple[dict[int, list[int]], LogPosition]:
        """The counts of the lines after ``pos`` and the position after them."""
        counts: dict[int, list[int]] = {}
        with self._lock:
            if self._fd is None and not self._open(pos):
                return counts, pos
            assert self._fd is not None
            pos = self._read(self._fd, self._resume(self._fd, pos), counts)
            if self._moved_on():
                # Whatever the writer put in the old file came before its first line in
                # the new one: read the old one to its end, then the new one.
                pos = self._read(self._fd, pos, counts)
                self.close()
                if self._open():
                    assert self._fd is not None
                    pos = self._read(self._fd, self._resume(self._fd, pos), counts)
        return counts, pos

    def close(self) -> None:
        """Close the open file (the next scan opens the path again)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _open(self, pos: LogPosition | None = None) -> bool:
        """Open the file ``pos`` is in if it was renamed away (a restart after a rotation:
        the lines the writer added to it since are read before the new file's), else the
        path."""
        if pos is not None and pos.ident and not self._resumed:
            self._resumed = True  # at start only: not a directory listing a tick
            if (fd := self._find_renamed(pos)) is not None:
                self._fd = fd
                return True
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        return True

    def _find_renamed(self, pos: LogPosition) -> int | None:
        """An open descriptor of the file in the log's directory that ``pos`` is in, when
        it is no longer the file at the path; None if there is none."""
        try:
            if _ident(os.stat(self.path)) == pos.ident:
                return None
        except FileNotFoundError:
            pass
        ino = pos.ident.rpartition(":")[2]
        try:
            with os.scandir(os.path.dirname(self.path) or ".") as entries:
                candidates = [e.path for e in entries
                              if str(e.inode()) == ino and e.is_file(follow_symlinks=False)]
        except OSError:
            return None
        for candidate in candidates:
            try:
                fd = os.open(candidate, os.O_RDONLY)
            except OSError:
                continue
            if _holds(fd, pos):
                return fd
            os.close(fd)
        return None

    def _moved_on(self) -> bool:
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return st.st_size > 0 and _ident(st) != _ident(os.fstat(self._fd))

    @staticmethod
    def _resume(fd: int, pos: LogPosition) -> LogPosition:
        if _holds(fd, pos):
            return pos
        return LogPosition(_ident(os.fstat(fd)), 0, _tail_hash(fd, 0))

    @staticmethod
    def _read(fd: int, pos: LogPosition, counts: dict[int, list[int]]) -> LogPosition:
        offset, size = pos.offset, _CHUNK
        while data := os.pread(fd, size, offset):
            cut = data.rfind(b"\n") + 1
            if not cut:
                if len(data) < size:
                    break  # a line still being written: next time
                size *= 2  # a line longer than a chunk
                continue
            count_lines(data[:cut] if cut < len(data) else data, counts)
            offset += cut
            size = _CHUNK
        if offset == pos.offset:
            return pos
        return LogPosition(pos.ident, offset, _tail_hash(fd, offset))


@dataclass
class _Minute:
    delivered: int = 0
    deferred: int = 0
    failed: int = 0  # expired, or bounced for a reason that is not the recipient's
    submits: int = 0
    samples: int = 0
    ready: int = 0
    submit_buckets: list[int] = field(default_factory=lambda: [0] * (len(SUBMIT_BUCKETS) + 1))

    def to_json(self) -> list[Any]:
        return [self.delivered, self.deferred, self.failed, self.submits, self.samples,
                self.ready, self.submit_buckets]

    @classmethod
    def from_json(cls, raw: Any) -> _Minute:
        """ValueError unless ``raw`` is what :meth:`to_json` wrote: six counts, then a count
        per latency bucket, no more ready samples than samples."""
        if (not isinstance(raw, list) or len(raw) != 7 or not isinstance(raw[6], list)
                or len(raw[6]) != len(SUBMIT_BUCKETS) + 1):
            raise ValueError("malformed minute")
        minute = cls(*map(_count, raw[:6]), submit_buckets=[_count(v) for v in raw[6]])
        if minute.ready > minute.samples:
            raise ValueError("more ready samples than samples")
        return minute

    def add(self, counts: list[int]) -> None:
        self.submits += counts[SUBMITTED]
        self.delivered += counts[DELIVERED]
        self.deferred += counts[DEFERRED]
        self.failed += counts[FAILED]


def _buckets(registry: CollectorRegistry) -> list[float]:
    """Per-bucket counts of ``mta_submit_seconds`` (not cumulative), via the public API."""
    cumulative = [0.0] * (len(SUBMIT_BUCKETS) + 1)
    bounds = {str(b): i for i, b in enumerate(SUBMIT_BUCKETS)}
    for metric in registry.restricted_registry(_SAMPLES).collect():
        for sample in metric.samples:
            if sample.name != "mta_submit_seconds_bucket":
                continue
            le = sample.labels.get("le", "")
            index = bounds.get(le, len(SUBMIT_BUCKETS) if le == "+Inf" else -1)
            if index >= 0:
                cumulative[index] = sample.value
    return [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]


_MAX_COUNT = 2**53  # more in one minute is not a count this node took


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0 <= value <= _MAX_COUNT):  # NaN compares false
        raise ValueError(f"not a count: {value!r}")
    return int(value)


def _time(value: Any, now: float) -> float | None:
    """A saved time: finite, and not after ``now``; None if it is not."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= now:
        return None
    return float(value)


def _first_at(raw: dict[str, Any], now: float) -> float | None:
    if "first_at" in raw:
        return _time(raw["first_at"], now)
    first = raw.get("first")  # files of an older version: a minute
    return _time(first * 60.0, now) if type(first) is int else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _saved_minutes(raw: Any, now: float) -> tuple[dict[int, _Minute], int]:
    """The well-formed minutes of a saved history within a day of ``now`` (either way: the
    clock may have been stepped back), and how many entries were not."""
    if not isinstance(raw, dict):
        raise ValueError("minutes is not an object")
    now_minute = int(now // 60)
    minutes: dict[int, _Minute] = {}
    bad = 0
    for key, value in raw.items():
        try:
            minute, bucket = int(key), _Minute.from_json(value)
        except ValueError:
            bad += 1
            continue
        if abs(minute - now_minute) < KEEP_MINUTES:
            minutes[minute] = bucket
    return minutes, bad


class SloTracker:
    """Counts the node's accounting log and samples its readiness every ``tick`` seconds into
    per-minute buckets, saved with the log position in ``path``."""

    def __init__(self, path: str, registry: CollectorRegistry, ready: Callable[[], bool],
                 accounting_log: str, tick: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.registry = registry
        self.ready = ready
        self.tick = tick
        self.clock = clock
        self.minutes: dict[int, _Minute] = {}
        # When the node first took a sample (None: never yet): availability is counted from
        # there, not from the start of its first minute.
        self.first: float | None = None
        # When each process took its first sample: it samples both ends of the time it is
        # up, one more than the ticks in between, which the expected count must allow for.
        self.starts: list[float] = []
        self._sampled = False
        self.scanner = LogScanner(accounting_log)
        self.position = LogPosition()  # of the accounting log, covered by self.minutes
        self._last_buckets = _buckets(registry)
        self._loaded = False
        # A save cancelled with the loop may still be writing when the final one starts.
        self._save_lock = threading.Lock()

    # --- persistence -----------------------------------------------------------------------

    def load(self) -> None:
        """Read the saved history (a missing or damaged file loses the readiness history; the
        counts are read again from the accounting log, as far back as it goes)."""
        self._loaded = True
        self._sampled = False
        now = self.clock()
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = json.load(fh)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            minutes, bad = _saved_minutes(raw.get("minutes"), now)
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            # Whatever is in the file, the node starts: without the readiness history.
            log.warning("slo.history_ignored", path=self.path, error=describe(exc)[:200])
            return
        if bad:
            log.warning("slo.history_entries_dropped", path=self.path, minutes=bad)
        first = _first_at(raw, now)
        # Files written before the counts came from the log have minutes in "first" and no
        # position: keep their readiness, read the counts from the log's start (so does a
        # damaged position: the counts are read again, none twice).
        try:
            position = LogPosition.from_json(raw["log"]) if "log" in raw else None
        except ValueError:
            log.warning("slo.history_position_dropped", path=self.path)
            position = None
        if first is None and raw.get("first_at") is not None:
            log.warning("slo.history_first_dropped", path=self.path,
                        first_at=str(raw["first_at"])[:40])
        starts = [t for v in _list(raw.get("starts")) if (t := _time(v, now)) is not None]
        if position is None:
            for m in minutes.values():
                m.delivered = m.deferred = m.failed = m.submits = 0
        self.minutes, self.first, self.starts = minutes, first, starts
        self.position = position or LogPosition()

    def _save_sync(self, data: bytes) -> None:
        tmp = self.path + ".tmp"
        with self._save_lock:
            with open(tmp, "wb") as fh:
                fh.write(data)
                # The position must never outlive the history it goes with: all or nothing.
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)

    def _encode(self) -> bytes:
        first = self.first
        return json.dumps({
            "first_at": first, "first": None if first is None else int(first // 60),
            "log": {"path": self.scanner.path, **self.position.to_json()},
            "starts": self.starts,
            "minutes": {str(k): v.to_json() for k, v in self.minutes.items()},
        }, separators=(",", ":")).encode()

    async def save(self) -> None:
        """Write the history and the log position it covers, atomically (off the loop)."""
        data = self._encode()
        try:
            await asyncio.to_thread(self._save_sync, data)
        except OSError as exc:
            log.warning("slo.save_failed", path=self.path, error=describe(exc))

    # --- sampling --------------------------------------------------------------------------

    def _minute(self, minute: int) -> _Minute:
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = _Minute()
        return bucket

    def _apply(self, start: LogPosition, counts: dict[int, list[int]],
               end: LogPosition) -> None:
        if start != self.position:
            return  # another scan got there first: these lines are counted already
        now_minute = int(self.clock() // 60)
        for minute, c in counts.items():
            if minute > now_minute - KEEP_MINUTES:
                # A line stamped ahead of this clock (another node's) counts as now.
                self._minute(min(minute, now_minute)).add(c)
        self.position = end

    def _sample_ready(self) -> None:
        now = self.clock()
        minute = int(now // 60)
        if minute not in self.minutes:
            for old in [m for m in self.minutes if m <= minute - KEEP_MINUTES]:
                del self.minutes[old]
            self.starts = [t for t in self.starts if t > now - KEEP_MINUTES * 60]
        bucket = self._minute(minute)
        buckets = _buckets(self.registry)
        for i, (a, b) in enumerate(zip(buckets, self._last_buckets, strict=True)):
            bucket.submit_buckets[i] += max(0, int(a - b))
        self._last_buckets = buckets
        bucket.samples += 1
        bucket.ready += 1 if self.ready() else 0
        if not self._sampled:
            self._sampled = True
            self.starts.append(now)
            if self.first is None:
                self.first = now

    def _scan(self, start: LogPosition) -> tuple[dict[int, list[int]], LogPosition]:
        try:
            return self.scanner.scan(start)
        except OSError as exc:
            # Readiness is still sampled; the lines are read when the file can be again.
            log.warning("slo.log_read_failed", path=self.scanner.path, error=describe(exc))
            return {}, start

    def sample(self) -> None:
        """Count the log's new lines and take one readiness sample, in the calling thread
        (the loop reads the log in a worker thread instead)."""
        start = self.position
        self._apply(start, *self._scan(start))
        self._sample_ready()

    async def _sample_async(self) -> None:
        start = self.position
        counts, end = await asyncio.to_thread(self._scan, start)
        self._apply(start, counts, end)
        self._sample_ready()

    async def run(self) -> None:
        """Sample now, then every ``tick`` on a fixed grid (sleep drift does not add up to
        missing samples); save every few ticks."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        for n in itertools.count(1):
            await self._sample_async()
            if n % SAVE_TICKS == 0:
                await self.save()
            due += self.tick
            now = loop.time()
            if now - due > self.tick:
                due = now  # ticks missed by a stalled loop are not made up: it was not answering
            await asyncio.sleep(max(0.0, due - now))

    async def stop(self) -> None:
        """Graceful stop, after the loop is cancelled and the accounting log closed: count
        up to now and save. Nothing if the history was never loaded (a failed start)."""
        if not self._loaded:
            return
        self._loaded = False
        await self._sample_async()
        await self.save()
        self.scanner.close()

    # --- reports ---------------------------------------------------------------------------

    def raw(self, window: float) -> dict[str, Any]:
        """Counts over the last ``window`` seconds, in a form :func:`merge_reports` adds up.

        The node's readiness now is one more sample (of the current, partial minute)."""
        now = self.clock()
        now_minute = int(now // 60)
        start = now_minute - int(window // 60) + 1
        totals = dict.fromkeys(_COUNTERS, 0)
        buckets = [0] * (len(SUBMIT_BUCKETS) + 1)
        ready_minutes = []
        for minute in range(start, now_minute + 1):
            m = self.minutes.get(minute)
            if m is None:
                continue
            for key in _COUNTERS:
                totals[key] += getattr(m, key)
            buckets = [a + b for a, b in zip(buckets, m.submit_buckets, strict=True)]
            if m.ready:
                ready_minutes.append(minute)
        totals["samples"] += 1
        if self.ready():
            totals["ready"] += 1
            if not ready_minutes or ready_minutes[-1] != now_minute:
                ready_minutes.append(now_minute)
        # Availability runs from the window's start or the node's first sample, if later.
        begin = now if self.first is None else min(now, max(start * 60.0, self.first))
        # What a node up all along would have taken: a sample a tick over that span, one
        # more at each start (both ends of an up time are sampled) and the one just taken.
        starts = sum(1 for t in self.starts if begin <= t <= now)
        expected = int((now - begin) / self.tick) + starts + 1
        return {**totals, "expected": max(expected, totals["samples"]),
                "submit_buckets": buckets, "ready_minutes": ready_minutes,
                "minutes": now_minute - int(begin // 60) + 1, "begin": begin, "now": now}


def _p99(buckets: list[int]) -> float | None:
    total = sum(buckets)
    if not total:
        return None
    need, seen = 0.99 * total, 0
    for bound, count in zip((*SUBMIT_BUCKETS, float("inf")), buckets, strict=True):
        seen += count
        if seen >= need:
            return bound
    return float("inf")


def _service_availability(raws: list[dict[str, Any]], ready: set[int]) -> float:
    """The share of the time since the first node's first sample (within the window) that
    lies in a minute in which at least one node was ready; the first and the current minute
    count for the part of them that has elapsed."""
    if not raws:
        return 0.0
    if not all("begin" in r and "now" in r for r in raws):  # a node of an older version
        minutes = max(int(r["minutes"]) for r in raws)
        return len(ready) / minutes if minutes else 0.0
    begin = min(float(r["begin"]) for r in raws)
    now = max(float(r["now"]) for r in raws)
    if now <= begin:
        return 1.0 if ready else 0.0
    covered = sum(max(0.0, min(m * 60.0 + 60.0, now) - max(m * 60.0, begin)) for m in ready)
    return min(1.0, covered / (now - begin))


def merge_reports(raws: Iterable[dict[str, Any]], objectives: dict[str, float],
                  window: float) -> dict[str, Any]:
    """One SLO report from the raw counts of one or more nodes."""
    raws = list(raws)
    total = dict.fromkeys(_COUNTERS, 0)
    buckets = [0] * (len(SUBMIT_BUCKETS) + 1)
    expected = 0
    any_ready: set[int] = set()
    for raw in raws:
        for key in _COUNTERS:
            total[key] += int(raw.get(key, 0))
        buckets = [a + b for a, b in zip(buckets, raw["submit_buckets"], strict=True)]
        expected += int(raw["expected"])
        any_ready.update(raw["ready_minutes"])
    node_availability = total["ready"] / expected if expected else 0.0
    # The service is available in a minute when at least one node was ready in it.
    service_availability = _service_availability(raws, any_ready)
    finals = total["delivered"] + total["failed"]
    success = total["delivered"] / finals if finals else None
    attempts = total["delivered"] + total["deferred"] + total["failed"]
    p99 = _p99(buckets)
    checks = {
        "availability": {"value": round(service_availability, 6),
                         "objective": objectives["availability"],
                         "met": service_availability >= objectives["availability"]},
        "submit_p99_seconds": {"value": p99, "objective": objectives["submit_p99"],
                               "met": p99 is None or p99 <= objectives["submit_p99"]},
        "delivery_success": {"value": None if success is None else round(success, 6),
                             "objective": objectives["delivery_success"],
                             "met": success is None or success >= objectives["delivery_success"]},
    }
    return {
        "window_seconds": window,
        "nodes": len(raws),
        "objectives_met": all(c["met"] for c in checks.values()),
        "checks": checks,
        "node_availability": round(node_availability, 6),
        "submitted": total["submits"],
        "delivered": total["delivered"],
        "deferred": total["deferred"],
        "failed": total["failed"],
        "deferral_rate": round(total["deferred"] / attempts, 6) if attempts else None,
    }
