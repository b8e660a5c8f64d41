"""Delivery memory stays bounded however many domains are reached: idle sites are reaped,
routes are cached for their DNS TTLs in a bounded LRU, and a moved MX is followed.

Real DNS server and SMTP sinks on loopback, a real in-process node."""

from __future__ import annotations

import time
import traceback
from typing import Any

import pytest

from mta.config import ConfigError, config_from_dict
from mta.delivery.errors import PermanentError, TemporaryError
from mta.delivery.routes import Router
from mta.node import Node
from tests.support import SINK_HOSTS, DNSServer, World, wait_until

_HOSTS = SINK_HOSTS

# Slow (seconds of waiting on throttles, timeouts and retries): uvloop only, the loop a node
# picks when it is installed; what the loop changes is covered by the faster tests.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


async def _start(world: World, zone: dict[str, Any], ttl: int, **delivery: Any) -> Node:
    """Serve ``zone`` with answers of ``ttl`` seconds (negative ones too), start the node."""
    world.zone(zone, ttl=ttl, negative_ttl=ttl)
    return await world.start(**{"idle_timeout": "200ms", **delivery})


def _series(node: Node, name: str) -> int:
    """Labelled samples a metric holds in the node's registry."""
    return sum(len(m.samples) for m in node.metrics.registry.collect() if m.name == name)


@ONE_LOOP
async def test_many_domains_leave_no_site_or_route_behind(world: World) -> None:
    """1,000 domains, each with an MX host of its own (so a site of its own), over 4 sinks;
    a route cache bounded at 50. Every message is delivered, the route cache never holds
    more than its bound, and once idle every site, route, domain throttle and per-site
    metric series goes."""
    domains = 1000
    zone: dict[str, Any] = {"sender.test": {"MX": [(10, "mx.sender.test")]},
                            "mx.sender.test": {"A": [_HOSTS[0]]}}
    for n in range(domains):
        zone[f"d{n}.test"] = {"MX": [(10, f"mx.d{n}.test")]}
        zone[f"mx.d{n}.test"] = {"A": [_HOSTS[n % len(_HOSTS)]]}
    for host in _HOSTS:
        world.sink(host)
    node = await _start(
        world, zone, ttl=2, site_idle="300ms", route_cache_size=50, route_ttl_min="1s",
        max_inflight=200,
        # Every domain gets a throttle of its own, which must be forgotten too.
        domains={"*": {"rate": "1000/s"}})
    engine = node.engine
    assert engine is not None
    peak_sites = 0
    peak_gauge_series = 0

    def sample() -> bool:
        nonlocal peak_sites, peak_gauge_series
        peak_sites = max(peak_sites, len(engine.sites))
        # Collecting is what a scrape does: a series per site.
        peak_gauge_series = max(peak_gauge_series, _series(node, "mta_site_connections"))
        return world.delivered() >= domains

    per_message = 50
    for first in range(0, domains, per_message):
        await world.submit([f"r@d{n}.test" for n in range(first, first + per_message)],
                           n=first)
        sample()
    await wait_until(sample, timeout=60, what=f"{domains} recipients delivered")
    assert peak_sites > 50, peak_sites  # many sites were alive at once
    await wait_until(lambda: node.spool.live_count() == 0, what="every message done")

    def shrunk() -> bool:
        return not any(engine.dispatcher.sizes().values())

    await wait_until(shrunk, timeout=15, what="site and route tables empty")
    # The route cache filled to its bound and never held more.
    assert engine.router.peak == engine.router.size == 50
    assert _series(node, "mta_site_connections") == 0 < peak_gauge_series
    assert engine.site_of("d0.test") is None
    assert world.delivered() == domains


async def test_a_moved_mx_is_followed_once_its_ttl_runs_out(world: World) -> None:
    """The MX of a domain moves (TTL 1 s) and the old host is switched off: the next message
    goes to the new MX, not for ever to the cached old one."""
    zone: dict[str, Any] = {"moved.test": {"MX": [(10, "mx1.moved.test")]},
                            "mx1.moved.test": {"A": [_HOSTS[0]]},
                            "mx2.moved.test": {"A": [_HOSTS[1]]}}
    old, new = world.sink(_HOSTS[0]), world.sink(_HOSTS[1])
    node = await _start(world, zone, ttl=1, route_ttl_min="1s")
    assert node.engine is not None
    await world.submit(["a@moved.test"], n=0)
    await old.wait_for(1)
    assert world.dns is not None
    world.dns.zone["moved.test"] = {"MX": [(10, "mx2.moved.test")]}
    old.stop()
    await world.submit(["b@moved.test"], n=1)
    [got] = await new.wait_for(1, timeout=10)
    assert got.recipients == ["b@moved.test"] and b"X-Test-Id: 1" in got.content
    assert len(old.messages) == 1
    assert node.engine.site_of("moved.test") == "mx2.moved.test"
    assert world.dns.queries.count(("moved.test", "MX")) >= 2


@ONE_LOOP
async def test_a_down_site_is_remembered_past_site_idle(world: World) -> None:
    """A healthy site goes after site_idle; one whose breaker is open stays (its state must
    outlive its cooldown, or the next message would hit it at full width) and goes later."""
    zone: dict[str, Any] = {"up.test": {"MX": [(10, "mx.up.test")]},
                            "mx.up.test": {"A": [_HOSTS[0]]},
                            "down.test": {"MX": [(10, "mx.down.test")]},
                            "mx.down.test": {"A": [_HOSTS[1]]}}
    up = world.sink(_HOSTS[0])  # nothing listens on the down host: connection refused
    node = await _start(world, zone, ttl=60, site_idle="200ms", breaker_failures=1,
                        breaker_cooldown="200ms", retry_initial="1h", retry_max="1h")
    engine = node.engine
    assert engine is not None
    await world.submit(["a@down.test"], n=0)
    await wait_until(lambda: "mx.down.test" in engine.sites
                     and engine.sites["mx.down.test"].breaker.state == "open",
                     what="the down site's breaker open")
    await world.submit(["a@up.test"], n=1)
    await up.wait_for(1)
    # The healthy site is reaped after site_idle (200 ms); at that moment the down one,
    # idle for longer, is still known: it is kept for 16 x breaker_cooldown (3.2 s).
    await wait_until(lambda: "mx.up.test" not in engine.sites, what="healthy site reaped")
    assert "mx.down.test" in engine.sites
    assert engine.sites["mx.down.test"].breaker.state == "open"
    await wait_until(lambda: "mx.down.test" not in engine.sites, timeout=5,
                     what="down site reaped after its longest cooldown")
    assert node.spool.live_count() == 1  # its message still waits for its retry


async def test_route_ttls_follow_dns_within_floor_and_ceiling_in_a_bounded_lru() -> None:
    """The Router alone against the DNS server: each cached route lives its answers' TTL
    (negative ones their SOA's), clamped, and the cache keeps the most recent routes."""
    zone: dict[str, Any] = {
        "short.test": {"MX": [(10, "mx.short.test")], "TTL": 1},
        "mx.short.test": {"A": ["127.0.0.2"], "TTL": 1},
        "mid.test": {"MX": [(10, "mx.mid.test")], "TTL": 20},
        "mx.mid.test": {"A": ["127.0.0.2"], "TTL": 15},
        "long.test": {"MX": [(10, "mx.long.test")], "TTL": 86400},
        "mx.long.test": {"A": ["127.0.0.2"], "AAAA": ["::1"], "TTL": 86400},
        "broken.test": "SERVFAIL",
    }
    dns_server = DNSServer(zone, ttl=86400, negative_ttl=18)
    try:
        cfg = config_from_dict({"delivery": {
            "nameservers": [f"127.0.0.1:{dns_server.port}"], "route_cache_size": 3,
            "route_ttl_min": "3s", "route_ttl_max": "30s"}}).delivery
        router = Router(cfg, timeout=2.0)

        def lives(domain: str) -> float:
            return router._cache[domain][0] - time.monotonic()

        assert (await router.route("short.test")).site == "mx.short.test"
        assert 2.0 < lives("short.test") <= 3.0  # TTL 1 s: the floor
        await router.route("mid.test")
        # The shortest of its answers: MX 20 s, A 15 s, no AAAA (SOA) 18 s.
        assert 13.0 < lives("mid.test") <= 15.0
        await router.route("long.test")
        assert 29.0 < lives("long.test") <= 30.0  # a day: the ceiling
        with pytest.raises(PermanentError, match="NXDOMAIN"):
            await router.route("nowhere.test")
        assert 16.0 < lives("nowhere.test") <= 18.0  # RFC 2308: the SOA's
        assert len(router) == 3 and "short.test" not in router  # least recently used out
        with pytest.raises(TemporaryError, match=r"4\.4\.3"):
            await router.route("broken.test")
        assert 2.0 < lives("broken.test") <= 3.0  # SERVFAIL: only the floor
        queries = len(dns_server.queries)
        depths = []
        for _ in range(3):  # from the cache, each raise with a traceback of its own
            with pytest.raises(TemporaryError, match=r"4\.4\.3") as caught:
                await router.route("broken.test")
            depths.append(len(traceback.extract_tb(caught.value.__traceback__)))
        assert len(dns_server.queries) == queries
        assert depths[0] == depths[1] == depths[2]
        assert len(router) == 3 and router.peak == 3
    finally:
        dns_server.close()


@pytest.mark.parametrize(("raw", "key"), [
    ({"site_idle": "soon"}, "site_idle"), ({"site_idle": 0}, "site_idle"),
    ({"route_cache_size": 0}, "route_cache_size"), ({"route_ttl_max": "-1s"}, "route_ttl_max"),
    ({"route_ttl_min": "2h", "route_ttl_max": "1h"}, "route_ttl_min")])
def test_bad_reaping_and_route_cache_settings_name_the_file_and_key(
        raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^mta\.toml: \[delivery\] {key}: expected"):
        config_from_dict({"delivery": raw}, "mta.toml")


async def test_mx_hosts_shared_by_many_domains_are_looked_up_once() -> None:
    """A big provider's MX hosts serve many domains: their addresses come from the answer
    cache (dnspython's, bounded like the routes), not a lookup per domain."""
    zone: dict[str, Any] = {f"c{n}.test": {"MX": [(10, "mx.big.test")]} for n in range(50)}
    zone["mx.big.test"] = {"A": ["127.0.0.2"]}
    dns_server = DNSServer(zone, ttl=60, negative_ttl=60)
    try:
        cfg = config_from_dict({"delivery": {
            "nameservers": [f"127.0.0.1:{dns_server.port}"], "route_cache_size": 10}}).delivery
        router = Router(cfg, timeout=2.0)
        for n in range(50):
            route = await router.route(f"c{n}.test")
            assert route.site == "mx.big.test" and route.hosts[0][0] == "127.0.0.2"
        assert dns_server.queries.count(("mx.big.test", "A")) == 1
        assert dns_server.queries.count(("mx.big.test", "AAAA")) == 1  # the "none" too
        assert len(router) == 10 and router.peak == 10
    finally:
        dns_server.close()
