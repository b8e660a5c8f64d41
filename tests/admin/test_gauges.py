"""Gauges are read when scraped: a scrape says what is true at that moment, a reaped site
leaves no series behind, and a gauge that cannot be read costs its own family, not the scrape.

A real node with delivery, a real DNS server and SMTP sink on loopback, /metrics over HTTP."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from mta.node import Node
from tests.support import SINK_HOSTS, World, greylisting_script, wait_until

_SITE_FAMILIES = ("mta_site_queue_depth", "mta_site_connections", "mta_site_breaker_open")

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


async def _scrape(node: Node) -> Samples:
    """GET /metrics; every sample by name, then by its sorted labels."""
    assert node.admin is not None
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{node.admin.port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, {})  # a family without samples is still listed
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


async def _held_site(world: World, **delivery: Any) -> tuple[Node, str]:
    """A node whose one message is deferred at a site (held.test greylists for ever) and
    then waits an hour: its counts stay put while the test looks."""
    world.zone({"held.test": {"MX": [(10, "mx.held.test")]},
                "mx.held.test": {"A": [SINK_HOSTS[0]]}})
    world.sink(SINK_HOSTS[0], greylisting_script())
    node = await world.start(retry_initial="1h", retry_max="1h", site_idle="1h",
                             idle_timeout="1h", **delivery)
    await world.submit(["r@held.test"])
    await world.wait_records("TransientFailure", 1)
    assert node.engine is not None
    await wait_until(lambda: len(node.engine.scheduler) == 1, what="the retry scheduled")
    (key,) = node.engine.sites
    return node, key


async def test_a_scrape_reads_what_is_true_now(world: World) -> None:
    node, key = await _held_site(world)
    assert node.engine is not None
    site = node.engine.sites[key]
    got = await _scrape(node)
    # Nothing refreshes these between scrapes any more: the values are the scrape's own.
    assert _value(got, "mta_spool_live_messages") == 1
    assert _value(got, "mta_queue_scheduled") == 1
    assert _value(got, "mta_spool_segments") >= 1
    assert _value(got, "mta_spool_bytes") > 0
    assert _value(got, "mta_queue_oldest_message_age_seconds") > 0
    assert 0 < _value(got, "mta_spool_disk_used_ratio") < 1
    assert _value(got, "mta_shards_owned") == _value(got, "mta_cluster_shards") == 4
    assert _value(got, "mta_cluster_lease_healthy") == 1
    assert _value(got, "mta_cluster_is_leader") == 1
    assert _value(got, "mta_node_ready") == 1
    assert _value(got, "mta_site_queue_depth", site=key) == len(site.ready) == 0
    assert _value(got, "mta_site_connections", site=key) == site.connections
    assert _value(got, "mta_outbound_connections") == site.connections
    assert _value(got, "mta_site_breaker_open", site=key) == 0
    for family in _SITE_FAMILIES:
        assert _value(got, "mta_gauge_read_errors_total", gauge=family) == 0
    # A fenced node says so at the next scrape, without waiting for anything.
    node.fence("test")
    got = await _scrape(node)
    assert _value(got, "mta_cluster_lease_healthy") == 0
    assert _value(got, "mta_cluster_is_leader") == 0
    assert _value(got, "mta_node_ready") == 0


class _UnreadableBreaker:
    @property
    def state(self) -> str:
        raise RuntimeError("a breaker that cannot say its state")


async def test_a_gauge_that_cannot_be_read_costs_its_family_not_the_scrape(
        world: World) -> None:
    node, key = await _held_site(world)
    assert node.engine is not None
    site = node.engine.sites[key]
    breaker, site.breaker = site.breaker, _UnreadableBreaker()
    try:
        with capture_logs() as logs:
            got = await _scrape(node)
    finally:
        site.breaker = breaker
    assert "mta_site_breaker_open" not in got
    assert _value(got, "mta_gauge_read_errors_total", gauge="mta_site_breaker_open") == 1
    failed = [e for e in logs if e["event"] == "metrics.gauge_failed"]
    assert [e["gauge"] for e in failed] == ["mta_site_breaker_open"]
    # Every other family, the site's other series among them, is there.
    assert _value(got, "mta_site_connections", site=key) == site.connections
    assert _value(got, "mta_spool_live_messages") == 1
    assert _value(got, "mta_received_messages_total") == 1
    # Repaired: the family is back; the count says it failed once.
    got = await _scrape(node)
    assert _value(got, "mta_site_breaker_open", site=key) == 0
    assert _value(got, "mta_gauge_read_errors_total", gauge="mta_site_breaker_open") == 1


async def test_a_reaped_site_leaves_no_series(world: World) -> None:
    world.zone({"fine.test": {"MX": [(10, "mx.fine.test")]},
                "mx.fine.test": {"A": [SINK_HOSTS[1]]}})
    sink = world.sink(SINK_HOSTS[1])
    node = await world.start(site_idle="300ms", idle_timeout="100ms")
    assert node.engine is not None
    engine = node.engine
    await world.submit(["r@fine.test"])
    await sink.wait_for(1)
    (key,) = engine.sites
    got = await _scrape(node)
    for family in _SITE_FAMILIES:
        assert (("site", key),) in got[family]
    await wait_until(lambda: not engine.sites, what="the idle site reaped")
    got = await _scrape(node)
    for family in _SITE_FAMILIES:
        assert got[family] == {}, family  # the family is described, with no series
