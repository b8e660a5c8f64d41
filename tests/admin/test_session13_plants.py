"""Mutants planted in the loop's lock-free counter and histogram (mta/metrics.py
``LoopCounter``, ``LoopHistogram``) that the suite let through: each test here fails with its
mutant and passes without it."""

from __future__ import annotations

import math
import re
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from mta.metrics import LoopCounter, LoopHistogram


def _made_at_t(text: str) -> str:
    """The _created samples say when each was made: the same but for a few microseconds."""
    return re.sub(r"(?m)^(\w+_created) .*$", r"\1 T", text)


def test_a_histogram_given_the_inf_bucket_scrapes_as_prometheus_clients() -> None:
    """Buckets that already end in +Inf (prometheus_client accepts them): one +Inf bucket,
    not two. Planted: +Inf always appended."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = LoopHistogram("t_seconds", "Time taken", buckets=(0.1, 1.0, math.inf),
                         registry=ours)
    lib = Histogram("t_seconds", "Time taken", buckets=(0.1, 1.0, math.inf), registry=theirs)
    for value in (0.05, 0.1, 0.5, 3.0, 1e9):
        mine.observe(value)
        lib.observe(value)
    text = generate_latest(ours).decode()
    assert _made_at_t(text) == _made_at_t(generate_latest(theirs).decode())
    assert text.count('le="+Inf"') == 1, text
    assert 't_seconds_bucket{le="+Inf"} 5.0\n' in text, text


def test_a_histogram_refuses_unsorted_buckets_as_prometheus_clients_does() -> None:
    """Planted: the buckets sorted (a typo in a bucket list silently accepted)."""
    with pytest.raises(ValueError, match="sorted"):
        Histogram("t_bad", "Bad", buckets=(1.0, 0.1), registry=None)
    with pytest.raises(ValueError, match="sorted"):
        LoopHistogram("t_bad", "Bad", buckets=(1.0, 0.1), registry=CollectorRegistry())


def test_a_counters_created_is_when_it_was_made() -> None:
    """``_created`` is the time the counter was made, not its value. Planted: every
    sample of the family given the counter's value."""
    registry = CollectorRegistry()
    before = time.time()
    counter = LoopCounter("t_things", "Things", registry=registry)
    counter.inc(5)
    assert registry.get_sample_value("t_things_total") == 5.0
    created = registry.get_sample_value("t_things_created")
    assert created is None or before - 1 <= created <= time.time() + 1, created
