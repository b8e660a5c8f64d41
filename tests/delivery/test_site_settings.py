"""Connection settings belong to the receiving hosts ([delivery.sites]), not to whichever domain
reached a shared site first; domains keep their rate, TLS requirement and smarthost."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from mta.config import ConfigError, config_from_dict
from mta.delivery.limits import site_limits, site_policy
from mta.delivery.routes import Route
from tests.support import SinkScript, World


def _route(*names: str, site: str = "") -> Route:
    return Route(site or ",".join(sorted(set(names))),
                 tuple((f"127.0.0.{i + 2}", 25, n) for i, n in enumerate(names)))


def test_the_most_specific_site_entry_of_the_route_hosts_wins() -> None:
    sites = config_from_dict({"delivery": {"sites": {
        "*": {"max_connections": 1},
        "*.google.com": {"max_connections": 2},
        "alt1.aspmx.l.google.com": {"max_connections": 3},
        "relay.example.net": {"max_connections": 4},
        "[192.0.2.7]": {"max_connections": 5},
    }}}).delivery.sites

    def conns(route: Route) -> int | None:
        policy = site_policy(route, sites)
        return policy.max_connections if policy else None

    # The exact name of one MX beats a wildcard matching the first one.
    assert conns(_route("aspmx.l.google.com", "alt1.aspmx.l.google.com")) == 3
    assert conns(_route("aspmx.l.google.com")) == 2
    assert conns(_route("MX.Other.test")) == 1  # only "*"
    assert conns(Route("smarthost:relay.example.net:25",
                       (("relay.example.net", 25, "relay.example.net"),))) == 4
    assert conns(Route("[192.0.2.7]", (("192.0.2.7", 25, "192.0.2.7"),))) == 5
    assert site_policy(_route("mx.test"), {}) is None


def test_site_limits_fall_back_to_the_delivery_defaults() -> None:
    cfg = config_from_dict({"delivery": {
        "max_connections": 7, "max_messages_per_connection": 9, "rate": "3/s",
        "sites": {"*.shared.test": {"max_messages_per_connection": 2, "tls": "disabled"}}}})
    limits = site_limits(cfg.delivery, _route("mx.shared.test"), "me.test")
    assert (limits.max_connections, limits.max_messages_per_connection, limits.rate,
            limits.tls, limits.helo) == (7, 2, 3.0, "disabled", "me.test")
    other = site_limits(cfg.delivery, _route("mx.other.test"), "me.test")
    assert (other.max_messages_per_connection, other.tls) == (9, "opportunistic")
    # [delivery] tls = "required" is enforced per message; the connection STARTTLSes.
    required = config_from_dict({"delivery": {"tls": "required"}})
    assert site_limits(required.delivery, _route("mx.test"), "h").tls == "opportunistic"


@pytest.mark.parametrize(("table", "named", "says"), [
    ({"domains": {"a.test": {"max_connections": 3}}}, "'a.test'.max_connections",
     '[delivery.sites."<MX host or *.suffix>"]'),
    ({"domains": {"a.test": {"max_messages_per_connection": 3}}},
     "'a.test'.max_messages_per_connection", "[delivery.sites."),
    ({"domains": {"a.test": {"tls": "disabled"}}}, "'a.test'.tls", "[delivery.sites."),
    ({"sites": {"mx.test": {"tls": "strict"}}}, "'mx.test'.tls",
     "opportunistic, required, verify, disabled"),
    ({"sites": {"mx.test": {"smarthost": "x:25"}}}, "'mx.test'.smarthost", "unknown key"),
    ({"sites": {"mx.test": {"max_connections": 0}}}, "'mx.test'.max_connections", ""),
    ({"sites": {"mx.test": 5}}, "'mx.test'", "expected a table"),
    ({"sites": "mx.test"}, "[delivery] sites", "expected tables"),
])
def test_misplaced_and_bad_site_settings_name_the_key_and_where_it_belongs(
        table: dict[str, Any], named: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"delivery": table}, "/etc/mta/node.toml")
    text = str(err.value)
    assert text.startswith("/etc/mta/node.toml: [delivery] "), text
    assert named in text and says in text, text
    assert "\n" not in text


def _shared_mx(world: World) -> None:
    """Two domains whose mail goes to one MX host: one site."""
    world.zone({"a.test": {"MX": [(10, "mx.shared.test")]},
                "b.test": {"MX": [(10, "mx.shared.test")]},
                "mx.shared.test": {"A": ["127.0.0.2"]}})


async def test_a_shared_site_takes_its_limits_from_the_site_entry_whichever_domain_came_first(
        world: World) -> None:
    _shared_mx(world)
    sink = world.sink("127.0.0.2", SinkScript(data_delay=0.1))
    node = await world.start(max_connections=10, sites={"*.shared.test": {"max_connections": 2}},
                             domains={"a.test": {"rate": "1000/s"}})
    # b.test (no domain entry) reaches the site first, then both domains together.
    await world.submit(["first@b.test"])
    await sink.wait_for(1)
    await asyncio.gather(*(world.submit([f"r{n}@{'ab'[n % 2]}.test"], n=n) for n in range(12)))
    await sink.wait_for(13)
    assert sink.max_active == 2  # the site's limit, used fully, never more
    assert node.engine is not None
    [site] = [s for key, s in node.engine.sites.items() if key == "mx.shared.test"]
    assert site.limits.max_connections == 2


async def test_reload_gives_an_existing_site_its_new_limits(world: World) -> None:
    _shared_mx(world)
    sink = world.sink("127.0.0.2")
    node = await world.start(max_connections=10, sites={"mx.shared.test": {
        "max_connections": 2, "max_messages_per_connection": 5}})
    await world.submit(["x@a.test"])
    await sink.wait_for(1)
    assert node.engine is not None
    site = node.engine.sites["mx.shared.test"]
    assert (site.limits.max_connections, site.limits.max_messages_per_connection) == (2, 5)
    sites = config_from_dict({"delivery": {"sites": {
        "mx.shared.test": {"max_connections": 4}}}}).delivery.sites
    node.engine.reload(dataclasses.replace(node.cfg, delivery=dataclasses.replace(
        node.cfg.delivery, sites=sites)))
    assert node.engine.sites["mx.shared.test"] is site  # same site, connections kept
    # The override of messages per connection went with the reload: the default again.
    assert (site.limits.max_connections, site.limits.max_messages_per_connection) == (4, 100)


def test_the_longest_wildcard_suffix_wins_over_a_shorter_one() -> None:
    sites = config_from_dict({"delivery": {"sites": {
        "*.google.com": {"max_connections": 2},
        "*.l.google.com": {"max_connections": 3},
    }}}).delivery.sites
    policy = site_policy(_route("aspmx.l.google.com"), sites)
    assert policy is not None and policy.max_connections == 3


def test_on_a_tie_the_more_preferred_route_host_decides() -> None:
    sites = config_from_dict({"delivery": {"sites": {
        "mx1.tie.test": {"max_connections": 1},
        "mx2.tie.test": {"max_connections": 2},
    }}}).delivery.sites
    first = site_policy(_route("mx1.tie.test", "mx2.tie.test", site="tie"), sites)
    assert first is not None and first.max_connections == 1
    second = site_policy(_route("mx2.tie.test", "mx1.tie.test", site="tie"), sites)
    assert second is not None and second.max_connections == 2


def test_a_site_rate_overrides_the_delivery_rate() -> None:
    cfg = config_from_dict({"delivery": {
        "rate": "3/s", "sites": {"mx.slow.test": {"rate": "1/s"}}}})
    assert site_limits(cfg.delivery, _route("mx.slow.test"), "me.test").rate == 1.0
    assert site_limits(cfg.delivery, _route("mx.other.test"), "me.test").rate == 3.0
