"""The loop's lock-free counter and histogram (mta/metrics.py ``LoopCounter``,
``LoopHistogram``) scrape as prometheus_client's own Counter and Histogram fed the same
values: the same families, help, types, buckets, counts and sums, ``_created`` included or
left out as the library is told; and the SLO tracker's read of the latency buckets finds
them."""

from __future__ import annotations

import os
import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mta.metrics import SUBMIT_BUCKETS, LoopCounter, LoopHistogram, NodeMetrics
from mta.slo import _buckets

# Bounds themselves (a value equal to a bound is in that bucket), between them, beyond the
# last, zero and below.
_OBSERVED = (0.0005, 0.0004, 0.001, 0.0010001, 0.003, 2.5, 2.6, 0.0, -0.25, 0.125, 1e9)


def _fed() -> tuple[bytes, bytes]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter, histogram = (LoopCounter("t_things", "Things counted", registry=ours),
                          LoopHistogram("t_seconds", "Time taken", buckets=SUBMIT_BUCKETS,
                                        registry=ours))
    counter2, histogram2 = (Counter("t_things", "Things counted", registry=theirs),
                            Histogram("t_seconds", "Time taken", buckets=SUBMIT_BUCKETS,
                                      registry=theirs))
    for value in _OBSERVED:
        counter.inc()
        counter2.inc()
        counter.inc(abs(value))
        counter2.inc(abs(value))
        histogram.observe(value)
        histogram2.observe(value)
    return _made_at_t(generate_latest(ours)), _made_at_t(generate_latest(theirs))


def _made_at_t(text: bytes) -> bytes:
    """The _created samples say when each was made: the same but for a few microseconds."""
    return re.sub(rb"(?m)^(\w+_created) .*$", rb"\1 T", text)


def test_they_scrape_as_prometheus_clients_own_fed_the_same() -> None:
    ours, theirs = _fed()
    assert ours == theirs
    text = ours.decode()
    assert "# HELP t_things_total Things counted\n# TYPE t_things_total counter\n" in text
    assert 't_seconds_bucket{le="0.0005"} 4.0\n' in text  # -0.25, 0.0, 0.0004 and 0.0005
    assert "t_seconds_count 11.0\n" in text
    assert "t_things_created T\n" in text and "t_seconds_created T\n" in text


def test_a_counter_refuses_to_go_down_as_prometheus_clients_does() -> None:
    counter = LoopCounter("t_down", "Never down", registry=CollectorRegistry())
    with pytest.raises(ValueError, match="non-negative"):
        Counter("t_down", "Never down", registry=None).inc(-1)
    with pytest.raises(ValueError, match="non-negative"):
        counter.inc(-1)
    assert counter.value == 0


@pytest.mark.skipif(bool(os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES")),
                    reason="the library already leaves _created out")
def test_they_leave_created_out_when_the_library_does() -> None:
    prometheus_client.disable_created_metrics()
    try:
        ours, theirs = _fed()
    finally:
        prometheus_client.enable_created_metrics()
    assert ours == theirs
    assert b"_created" not in ours


def test_the_nodes_families_and_the_slo_read_of_the_latency_buckets() -> None:
    metrics = NodeMetrics()
    metrics.received.inc()
    metrics.received_bytes.inc(5321)
    for seconds in (0.0004, 0.003, 0.003, 7.0):
        metrics.submit_latency.observe(seconds)
    registry = metrics.registry
    assert registry.get_sample_value("mta_received_messages_total") == 1.0
    assert registry.get_sample_value("mta_received_bytes_total") == 5321.0
    assert registry.get_sample_value("mta_submit_seconds_count") == 4.0
    assert registry.get_sample_value("mta_submit_seconds_sum") == pytest.approx(7.0064)
    assert registry.get_sample_value("mta_submit_seconds_bucket", {"le": "0.005"}) == 3.0
    text = generate_latest(registry).decode()
    for name, kind, doc in (
            ("mta_received_messages", "counter", "Messages accepted (250 sent)"),
            ("mta_received_bytes", "counter", "Bytes of accepted messages"),
            ("mta_submit_seconds", "histogram", "End of DATA to durable, per message")):
        total = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {total} {doc}\n# TYPE {total} {kind}\n" in text, name
    # What the SLO tracker reads each tick (per bucket, not cumulative; the last is +Inf).
    assert _buckets(registry) == [1.0, 0.0, 0.0, 2.0, *[0.0] * 8, 1.0]
