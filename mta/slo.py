"""Service-level history of one node, per minute, kept for a day and persisted in the spool.

Each tick samples readiness and takes the deltas of the node's Prometheus counters, so the
figures are the same ones Prometheus sees. A minute with no record while the node existed
(it was down) counts as unavailable. Reports from several nodes merge by adding counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from mta.metrics import SUBMIT_BUCKETS

__all__ = ["SloTracker", "merge_reports"]

KEEP_MINUTES = 24 * 60
# Recipients bounced because the mailbox does not exist are the list's fault, not ours (an
# operator's own bounces are AdminBounce records, counted apart).
_NOT_OUR_FAILURE = ("bad-mailbox", "inactive-mailbox")
_COUNTERS = ("delivered", "deferred", "failed", "submits", "samples", "ready")


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
    def from_json(cls, raw: list[Any]) -> _Minute:
        return cls(*raw[:6], submit_buckets=list(raw[6]))


def _counters(registry: CollectorRegistry) -> dict[str, Any]:
    """Cumulative values of the counters the SLO needs, read through the public API."""
    out: dict[str, Any] = {"delivered": 0.0, "deferred": 0.0, "failed": 0.0, "submits": 0.0,
                           "buckets": [0.0] * (len(SUBMIT_BUCKETS) + 1)}
    bounds = {str(b): i for i, b in enumerate(SUBMIT_BUCKETS)}
    for metric in registry.collect():
        for sample in metric.samples:
            name = sample.name
            if name == "mta_delivered_recipients_total":
                out["delivered"] += sample.value
            elif name == "mta_deferred_recipients_total":
                out["deferred"] += sample.value
            elif name == "mta_expired_recipients_total":
                out["failed"] += sample.value
            elif name == "mta_bounced_recipients_total":
                if sample.labels.get("bounce_class") not in _NOT_OUR_FAILURE:
                    out["failed"] += sample.value
            elif name == "mta_submit_seconds_count":
                out["submits"] += sample.value
            elif name == "mta_submit_seconds_bucket":
                le = sample.labels.get("le", "")
                index = bounds.get(le, len(SUBMIT_BUCKETS) if le == "+Inf" else -1)
                if index >= 0:
                    out["buckets"][index] = sample.value
    cumulative = out["buckets"]  # Prometheus buckets count everything up to their bound
    out["buckets"] = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
    return out


class SloTracker:
    """Samples a node every ``tick`` seconds into per-minute buckets."""

    def __init__(self, path: str, registry: CollectorRegistry, ready: Callable[[], bool],
                 tick: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.registry = registry
        self.ready = ready
        self.tick = tick
        self.clock = clock
        self.minutes: dict[int, _Minute] = {}
        self.first_minute = int(clock() // 60)
        self._last = _counters(registry)
        self._task: asyncio.Task[None] | None = None

    # --- persistence -----------------------------------------------------------------------

    def load(self) -> None:
        """Read the saved history (a missing or damaged file only loses history)."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                raw = json.load(fh)
            self.first_minute = int(raw["first"])
            self.minutes = {int(k): _Minute.from_json(v) for k, v in raw["minutes"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return

    def _save_sync(self, data: bytes) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, self.path)

    async def save(self) -> None:
        data = json.dumps({"first": self.first_minute,
                           "minutes": {str(k): v.to_json() for k, v in self.minutes.items()}},
                          separators=(",", ":")).encode()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._save_sync, data)

    # --- sampling --------------------------------------------------------------------------

    def sample(self) -> None:
        """Add one readiness sample and the counter deltas since the previous one."""
        minute = int(self.clock() // 60)
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = _Minute()
            for old in [m for m in self.minutes if m <= minute - KEEP_MINUTES]:
                del self.minutes[old]
        now = _counters(self.registry)
        last = self._last
        self._last = now
        for key in ("delivered", "deferred", "failed", "submits"):
            setattr(bucket, key, getattr(bucket, key) + max(0, int(now[key] - last[key])))
        for i, (a, b) in enumerate(zip(now["buckets"], last["buckets"], strict=True)):
            bucket.submit_buckets[i] += max(0, int(a - b))
        bucket.samples += 1
        bucket.ready += 1 if self.ready() else 0

    async def run(self) -> None:
        last_saved = -1
        while True:
            await asyncio.sleep(self.tick)
            self.sample()
            minute = int(self.clock() // 60)
            if minute != last_saved:
                last_saved = minute
                await self.save()

    # --- reports ---------------------------------------------------------------------------

    def raw(self, window: float) -> dict[str, Any]:
        """Counts over the last ``window`` seconds, in a form :func:`merge_reports` adds up."""
        now_minute = int(self.clock() // 60)
        start = max(now_minute - int(window // 60) + 1, self.first_minute)
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
        # Samples a node that was up would have taken: the window it existed in.
        expected = max(1, int((now_minute - start + 1) * 60 / self.tick))
        return {**totals, "expected": max(expected, totals["samples"]),
                "submit_buckets": buckets, "ready_minutes": ready_minutes,
                "minutes": now_minute - start + 1}


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


def merge_reports(raws: Iterable[dict[str, Any]], objectives: dict[str, float],
                  window: float) -> dict[str, Any]:
    """One SLO report from the raw counts of one or more nodes."""
    raws = list(raws)
    total = dict.fromkeys(_COUNTERS, 0)
    buckets = [0] * (len(SUBMIT_BUCKETS) + 1)
    expected = 0
    any_ready: set[int] = set()
    minutes = 0
    for raw in raws:
        for key in _COUNTERS:
            total[key] += int(raw.get(key, 0))
        buckets = [a + b for a, b in zip(buckets, raw["submit_buckets"], strict=True)]
        expected += int(raw["expected"])
        any_ready.update(raw["ready_minutes"])
        minutes = max(minutes, int(raw["minutes"]))
    node_availability = total["ready"] / expected if expected else 0.0
    # The service is available in a minute when at least one node was ready in it.
    service_availability = len(any_ready) / minutes if minutes else 0.0
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
