"""The load client of the cluster tests (tests/support/cluster.py) against a sink: a node
answering ``421`` once (fenced for a moment under CPU load, or a shard handed over while
its DATA waited) must not take that node out of the load for the rest of the test."""

from __future__ import annotations

from tests.support import Sink, SinkScript
from tests.support import wait_until_sync as _poll
from tests.support.cluster import Load


def test_load_keeps_sending_to_a_node_after_a_421() -> None:
    sink = Sink("127.0.0.1", 0, SinkScript(
        data_reply=lambda _rcpts, n: "421 4.3.2 Not serving this shard now" if n == 0 else None))
    sink.start()
    load = Load().start([sink.port])
    try:
        _poll(lambda: len(load.acked) >= 5, 10, "250s after the 421")
        assert "0-1" not in load.acked  # the message answered 421 is not acknowledged
    finally:
        load.stop()
        sink.stop()
