"""Runtime suspensions and throttles by wildcard (``*.example.test``) and by site, against a
real DNS server and SMTP sinks on loopback: what is held is not sent and counts no attempt,
goes out on resume, and nothing else is held; the most specific throttle wins."""

from __future__ import annotations

import time
from typing import Any

import pytest

from mta.coordinator import RuntimeSettings
from mta.node import Node
from tests.support import SinkScript, World, wait_until

SHARED_MX = "mx1.shared.test"


def _zone(world: World) -> None:
    """example.test and its subdomains, a look-alike, and two domains sharing one MX host
    (127.0.0.2); other.test and three.test elsewhere (127.0.0.3)."""
    mx = {"MX": [(10, "mx.example.test")]}
    shared = {"MX": [(10, SHARED_MX)]}
    world.zone({"example.test": mx, "a.example.test": mx, "b.c.example.test": mx,
                "notexample.test": mx, "mx.example.test": {"A": ["127.0.0.2"]},
                "one.test": shared, "two.test": shared, SHARED_MX: {"A": ["127.0.0.2"]},
                "other.test": {"MX": [(10, "mx.other.test")]},
                "three.test": {"MX": [(10, "mx.other.test")]},
                "mx.other.test": {"A": ["127.0.0.3"]}})


def _delivered(world: World) -> set[str]:
    return {r for sink in world.sinks for m in sink.messages for r in m.recipients}


async def _held(node: Node, began: float, *ids: str) -> None:
    """Each message's attempt has run and put it off, counting no attempt and recording no
    TransientFailure."""
    engine = node.engine
    assert engine is not None
    await wait_until(lambda: all((engine.next_attempt(m) or 0) > began for m in ids),
                     what=f"the attempts that held {ids}")
    for mid in ids:
        ref = node.spool.live_ref(mid)
        assert ref is not None, f"{mid} left the queue"
        assert (ref.state or {}).get("att", 0) == 0, ref.state


def _no_deferrals(world: World) -> None:
    assert not [r for r in world.accounting() if r["type"] == "TransientFailure"]


async def test_wildcard_suspension_holds_every_subdomain_and_nothing_else(world: World
                                                                          ) -> None:
    _zone(world)
    world.sink("127.0.0.2")
    world.sink("127.0.0.3")
    # Held mail is looked at again only after retry_initial: what goes out within the
    # wait below after a resume went because the resume released it.
    node = await world.start(retry_initial="30s")
    await node.coordinator.change_runtime(suspended={"*.example.test": True})
    began = time.time()
    held = [await world.submit(["x@a.example.test"], n=0),
            await world.submit(["y@b.c.example.test"], n=1)]
    for n, rcpt in enumerate(("p@example.test", "q@notexample.test", "r@other.test"), 2):
        await world.submit([rcpt], n=n)
    # example.test itself is not under *.example.test, nor is notexample.test.
    await wait_until(lambda: {"p@example.test", "q@notexample.test", "r@other.test"}
                     <= _delivered(world), what="the mail nothing holds")
    await _held(node, began, *held)
    assert node.engine is not None
    assert node.engine.held_by("b.c.example.test") == "*.example.test"
    assert node.engine.held_by("example.test") is None
    assert not {"x@a.example.test", "y@b.c.example.test"} & _delivered(world)
    _no_deferrals(world)
    await node.coordinator.change_runtime(suspended={"*.example.test": False})
    # Released at once by the resume (the periodic look is 200 ms away at the earliest).
    await wait_until(lambda: {"x@a.example.test", "y@b.c.example.test"} <= _delivered(world),
                     timeout=5, what="the held mail after the resume")
    await wait_until(lambda: node.spool.live_count() == 0, what="an empty queue")
    _no_deferrals(world)


@pytest.mark.parametrize("key", [f"site:{SHARED_MX}", "site:*.shared.test",
                                 f"site:{SHARED_MX}:{{port}}"])
async def test_site_suspension_holds_every_domain_routed_there(world: World, key: str
                                                               ) -> None:
    _zone(world)
    world.sink("127.0.0.2")
    world.sink("127.0.0.3")
    node = await world.start(retry_initial="30s")
    key = key.format(port=world.port)
    await node.coordinator.change_runtime(suspended={key: True})
    began = time.time()
    held = [await world.submit(["a@one.test"], n=0), await world.submit(["b@two.test"], n=1)]
    mixed = await world.submit(["c@one.test", "d@three.test"], n=2)
    await wait_until(lambda: "d@three.test" in _delivered(world), what="three.test's mail")
    await _held(node, began, *held)
    assert node.engine is not None
    assert node.engine.held_by("two.test") == key
    assert node.engine.sites[SHARED_MX].held_by == key
    assert not {"a@one.test", "b@two.test", "c@one.test"} & _delivered(world)
    # The message with a recipient delivered and one held waits for the held one.
    assert node.spool.live_ref(mixed) is not None
    _no_deferrals(world)
    await node.coordinator.change_runtime(suspended={key: False})
    await wait_until(lambda: {"a@one.test", "b@two.test", "c@one.test"} <= _delivered(world),
                     timeout=5, what="the held mail after the resume")
    await wait_until(lambda: node.spool.live_count() == 0, what="an empty queue")
    _no_deferrals(world)


async def test_a_site_suspension_gives_back_jobs_already_queued_there(world: World) -> None:
    _zone(world)
    sink = world.sink("127.0.0.2", SinkScript(data_delay=1.0))
    node = await world.start(sites={SHARED_MX: {"max_connections": 1}}, retry_initial="30s")
    assert node.engine is not None
    first = await world.submit(["a@one.test"], n=0)
    sites = node.engine.sites
    await wait_until(lambda: (s := sites.get(SHARED_MX)) is not None and s.connections == 1,
                     what="the first message on its way")
    began = time.time()
    queued = await world.submit(["b@two.test"], n=1)
    site = node.engine.sites[SHARED_MX]
    await wait_until(lambda: len(site.ready) == 1, what="the second job queued at the site")
    await node.coordinator.change_runtime(suspended={f"site:{SHARED_MX}": True})
    assert len(site.ready) == 0  # given back at once, not sent when the connection frees
    await _held(node, began, queued)
    await sink.wait_for(1)  # the transaction already in DATA finishes
    assert [m.recipients for m in sink.messages] == [["a@one.test"]]
    await wait_until(lambda: node.spool.live_ref(first) is None, what="the first one done")
    _no_deferrals(world)
    await node.coordinator.change_runtime(suspended={f"site:{SHARED_MX}": False})
    await sink.wait_for(2, timeout=5)


async def test_wildcard_throttles_most_specific_wins(world: World) -> None:
    _zone(world)
    world.sink("127.0.0.2")
    node = await world.start(domains={"*.example.test": {"rate": "1/s"},
                                      "c.example.test": {"rate": "3/s"}})
    engine = node.engine
    assert engine is not None
    assert engine.domain_rate("a.example.test") == 1.0  # config wildcard
    await node.coordinator.change_runtime(throttles={"*.example.test": 10.0,
                                                     "b.example.test": 2.0})
    assert engine.domain_rate("a.example.test") == 10.0  # runtime beats config
    assert engine.domain_rate("x.y.example.test") == 10.0  # any depth
    assert engine.domain_rate("b.example.test") == 2.0  # exact beats the wildcard
    assert engine.domain_rate("c.example.test") == 10.0  # runtime wildcard beats config
    assert engine.domain_rate("example.test") is None  # not under *.example.test
    assert engine.domain_rate("notexample.test") is None
    # The rate applies per matching domain: each gets its own throttle at that rate.
    await world.submit(["x@a.example.test", "y@b.c.example.test"], n=0)
    await wait_until(lambda: node.spool.live_count() == 0, what="both delivered")
    throttles = engine.dispatcher._domain_throttles
    assert throttles["a.example.test"].throttle.rate == pytest.approx(10.0)
    assert throttles["b.c.example.test"].throttle.rate == pytest.approx(10.0)
    await node.coordinator.change_runtime(throttles={"*.example.test": None})
    assert engine.domain_rate("a.example.test") == 1.0


@pytest.mark.parametrize(("throttles", "expected"), [
    ({"site:*.shared.test": 7.0}, 7.0),
    ({"site:*.shared.test": 7.0, f"site:{SHARED_MX}": 4.0}, 4.0),  # exact host wins
    ({SHARED_MX: 6.0, "site:*.shared.test": 7.0}, 6.0),  # a key stored before sites: kept
])
async def test_site_throttles_by_host_and_wildcard(world: World, throttles: dict[str, Any],
                                                   expected: float) -> None:
    _zone(world)
    world.sink("127.0.0.2")
    node = await world.start(rate="50/s")
    assert node.engine is not None
    await node.coordinator.change_runtime(throttles=throttles)
    await world.submit(["a@one.test"], n=0)
    await wait_until(lambda: node.spool.live_count() == 0, what="delivered")
    site = node.engine.sites[SHARED_MX]
    assert site.rate_override == expected
    assert site._effective_rate() == pytest.approx(expected)
    await node.coordinator.change_runtime(throttles=dict.fromkeys(throttles))
    assert site.rate_override is None and site._effective_rate() == pytest.approx(50.0)


async def test_runtime_settings_without_site_keys_read_as_before(world: World) -> None:
    """Settings stored before wildcards and sites (bare domains) mean what they meant."""
    _zone(world)
    world.sink("127.0.0.2")
    node = await world.start()
    assert node.engine is not None
    node.engine.dispatcher.apply_runtime(RuntimeSettings({"one.test": 3.0},
                                                         frozenset({"two.test"})))
    assert node.engine.dispatcher.suspended("two.test")
    assert not node.engine.dispatcher.suspended("a.two.test")
    assert node.engine.domain_rate("one.test") == 3.0
    assert node.engine.domain_rate("a.one.test") is None
