"""The loop's histogram and counter (mta/metrics.py) fed values no clock gives but a caller
could: NaN, infinities, negatives, huge, subnormal. Each scrapes as prometheus_client's own
fed the same: in particular a NaN, which no bound is at least, is in no bucket (and so not
counted; the sum takes it), not in the fastest bucket, where the SLO tracker would read it
as a submission within its target."""

from __future__ import annotations

import math
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mta.metrics import SUBMIT_BUCKETS, LoopCounter, LoopHistogram
from mta.slo import _buckets


def _scraped(values: list[float]) -> tuple[bytes, bytes]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("mta_submit_seconds", "Latency", buckets=SUBMIT_BUCKETS,
                         registry=ours)
    ref = Histogram("mta_submit_seconds", "Latency", buckets=SUBMIT_BUCKETS, registry=theirs)
    count, ref_count = (LoopCounter("t_bytes", "Bytes", registry=ours),
                        Counter("t_bytes", "Bytes", registry=theirs))
    for value in values:
        mine.observe(value)
        ref.observe(value)
        if not value < 0:
            count.inc(value)
            ref_count.inc(value)
    made = re.compile(rb"(?m)^(\w+_created) .*$")
    return made.sub(rb"\1 T", generate_latest(ours)), made.sub(rb"\1 T", generate_latest(theirs))


@pytest.mark.parametrize("values", [
    [math.nan], [math.nan, 0.003], [math.inf], [-math.inf], [-1.0, 0.0], [1e308, 1e308],
    [5e-324], [0.0005, math.nextafter(0.0005, 1.0)], [2.5, math.nextafter(2.5, 3.0)],
])
def test_edge_values_scrape_as_prometheus_clients_own(values: list[float]) -> None:
    ours, theirs = _scraped(values)
    assert ours == theirs


def test_a_nan_latency_is_not_read_as_a_fast_submission() -> None:
    registry = CollectorRegistry()
    LoopHistogram("mta_submit_seconds", "Latency", buckets=SUBMIT_BUCKETS,
                  registry=registry).observe(math.nan)
    assert _buckets(registry) == [0.0] * (len(SUBMIT_BUCKETS) + 1)
    assert registry.get_sample_value("mta_submit_seconds_count") == 0.0
