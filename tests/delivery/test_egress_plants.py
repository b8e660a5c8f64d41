"""Egress sources and pools (issue 18), the cases test_egress.py leaves open: turns kept per
site, ramps not started yet, refunds across midnight, spill past blocked sources; a block
at MAIL, RCPT or DATA and what it does to queued and waiting jobs, its doubling back-off, its
ceiling and its reset, the reaper keeping it; warm-up counts per site, given back for what
never went out, written while the node runs; a source's own rate under a runtime site
throttle; a source's defaults; a reload's pools; runtime tenant throttles on tenants that
have no [tenants] entry or already have a throttle, and the scheduler woken when one is
cleared, and a tenant's rate held cluster-wide. Real sockets on loopback; sources bound to
127.0.0.11-12; two node processes on a real etcd for the cluster's share."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from harness.etcd import EtcdServer
from harness.mail import message
from harness.poll import wait_until, wait_until_sync
from harness.sink import AnyAddress, Sink, SinkScript
from mta.config import ConfigError, EgressConfig, config_from_dict
from mta.delivery.breaker import Breaker
from mta.delivery.egress import Egress
from mta.delivery.limits import site_limits
from mta.delivery.routes import Route
from mta.delivery.site import Job, Site
from mta.node import Node
from tests.support.cluster import Cluster
from tests.support.ctl import ctl, ctl_json
from tests.support.egress import (
    BLOCKED,
    IP1,
    IP2,
    SITE,
    ZONE,
    egress,
    peers,
    send,
    sources,
    today,
    warm_wait,
)
from tests.support.world import World

ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])
BLOCKED_RCPT = "550 5.7.1 Client host rejected: blocked using b.barracudacentral.org"
DAY = 1_764_547_200.0  # 2025-12-01 00:00 UTC


async def send_fast(world: World, count: int, tenant: str, domain: str = "dest.test",
                    connections: int = 3) -> None:
    """``count`` messages for ``tenant`` over a few reused client connections."""
    assert world.node is not None and world.node.ingress is not None
    port = world.node.ingress.port

    async def one(numbers: range) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        for n in numbers:
            await smtp.sendmail("app@sender.test", [f"{tenant}{n}@{domain}"],
                                message(n, 300, extra_headers=f"X-MTA-Tenant: {tenant}\r\n"))
        await smtp.quit()

    await asyncio.gather(*(one(range(i, count, connections)) for i in range(connections)))


def engine(node: Node) -> Any:
    assert node.engine is not None
    return node.engine


def records(world: World, kind: str) -> list[dict[str, Any]]:
    return [r for r in world.accounting() if r["type"] == kind]


def span(times: list[float]) -> float:
    return max(times) - min(times)


# --- Egress and its ledger, on a fake clock -----------------------------------------------


def _egress(raw: dict[str, Any], clock: list[float]) -> Egress:
    cfg = config_from_dict({"egress": {**raw, "state": "/nonexistent/egress.json"}}).egress
    return Egress(cfg, clock=lambda: clock[0])


def free(_source: str) -> float:
    return 0.0


def test_turns_are_taken_per_site() -> None:
    # Each site sees the pool's shares: turns at one site do not use up another's.
    e = _egress({"sources": {"a": {}, "b": {}}, "pools": {"p": {"sources": ["a", "b"]}}},
                [DAY])
    picks: dict[str, list[str]] = {"mx1": [], "mx2": []}
    for _ in range(4):
        for site in ("mx1", "mx2"):
            picks[site].append(e.choose("p", site, free).source)
    assert Counter(picks["mx1"]) == Counter(picks["mx2"]) == {"a": 2, "b": 2}, picks


def test_a_ramp_not_started_yet_caps_at_its_first_step() -> None:
    e = _egress({"sources": {"a": {"warmup": [2, 50, 500], "warmup_start": "2025-12-03"}}},
                [DAY])
    assert e.cap("a") == 2


def test_a_refund_after_midnight_gives_no_extra_room() -> None:
    clock = [DAY + 86_400 - 1]  # 23:59:59 UTC
    e = _egress({"sources": {"a": {"warmup": [1, 1], "warmup_start": "2025-12-01"}},
                 "pools": {"p": {"sources": ["a"], "over_cap": "wait"}}}, clock)
    booked = e.choose("p", "mx", free)
    assert booked.source == "a"  # booked yesterday
    clock[0] += 2  # the new day; the attempt found nothing went out
    e.give_back(booked)
    e.ledger.add("a", "mx", -1)  # and however a count is lowered, it stays at 0
    assert e.ledger.count("a", "mx") == 0
    assert e.choose("p", "mx", free).source == "a"
    # One today (the cap), however the refund of yesterday's booking came in.
    assert e.choose("p", "mx", free).refused is not None


def test_spill_passes_over_blocked_sources() -> None:
    e = _egress({"sources": {"a": {"warmup": [1], "warmup_start": "2025-12-01"}, "b": {},
                             "c": {}},
                 "pools": {"p": {"sources": {"a": 4, "b": 1, "c": 1}}}}, [DAY])
    e.ledger.add("a", "mx", 1)  # a: at its cap today
    blocked = lambda s: 1e12 if s == "b" else 0.0  # noqa: E731
    assert {e.choose("p", "mx", blocked).source for _ in range(6)} == {"c"}


def test_a_reconfigured_egress_uses_the_new_pools() -> None:
    e = _egress({"sources": {"a": {}, "b": {}}, "pools": {"p": {"sources": ["a"]}}}, [DAY])
    assert e.choose("p", "mx", free).source == "a"
    e.reconfigure(config_from_dict({"egress": {
        "sources": {"a": {}, "b": {}}, "pools": {"p": {"sources": ["b"]}},
        "state": "/nonexistent/egress.json"}}).egress)
    assert e.choose("p", "mx", free).source == "b"


def test_block_patterns_ignore_case() -> None:
    e = Egress(EgressConfig(state="/nonexistent/egress.json"))
    assert e.is_block("554 5.7.1 Client host [192.0.2.1] BLOCKED USING Spamhaus ZEN")
    assert e.is_block("550 Your IP is Blacklisted")
    assert not e.is_block("550 5.1.1 No such user")


@pytest.mark.parametrize(("raw", "where"), [
    ({"egress": {"sources": {"a": {"warmup": [0], "warmup_start": "2026-01-01"}}}},
     "got 0"),
    ({"egress": {"sources": {"a": {"warmup": ["0/d"], "warmup_start": "2026-01-01"}}}},
     "got 0"),
    ({"egress": {"sources": {"bad name": {}}}}, "[egress] sources: 'bad name': a name is"),
    ({"egress": {"sources": {"a": {}}, "pools": {"p/1": {"sources": ["a"]}}}},
     "[egress] pools: 'p/1': a name is"),
])
def test_more_egress_config_errors(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        config_from_dict(raw)


# --- blocks -------------------------------------------------------------------------------


@ONE_LOOP
async def test_when_every_source_is_blocked_mail_is_deferred_counted_and_no_breaker_opens(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2", SinkScript(greeting_reply=BLOCKED))
    srcs = sources(ip1={"warmup": [50], "warmup_start": today()})
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                               sources=srcs),
                              "tenants": {"t": {"pool": "main"}}},
                             breaker_failures=1)
    [pooled] = await send(world, 1, tenant="t")
    [plain] = await send(world, 1, start=1)  # no pool: the default address

    def first(mid: str) -> dict[str, Any] | None:
        return next((r for r in records(world, "TransientFailure")
                     if r["message_id"] == mid), None)

    await wait_until(lambda: first(pooled) and first(plain), 10, "both deferred")
    assert f"Every source of pool main is blocked at {SITE}" in first(pooled)["response"]
    assert f"Sending to {SITE} is blocked" in first(plain)["response"]
    assert node.metrics.egress_deferrals.labels("blocked")._value.get() >= 2
    sites = engine(node).dispatcher.sites
    for key in (f"{SITE}@ip1", f"{SITE}@ip2", SITE):
        assert sites[key].blocked(), key
        assert sites[key].breaker.state == "closed", key  # a block is not the site down
    assert engine(node).dispatcher.egress.ledger.count("ip1", SITE) == 0  # nothing went out
    assert not records(world, "Bounce")


@ONE_LOOP
async def test_a_block_at_mail_sends_the_message_through_another_source(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    accepted = {IP1: 0}

    async def mail(_server: Any, session: Any, envelope: Any, address: str,
                   options: list[str]) -> str:
        if session.peer[0] == IP1:
            if accepted[IP1] >= 2:  # ip1's first two messages go, then it is refused
                return BLOCKED
            accepted[IP1] += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    sink.handler.handle_MAIL = mail  # aiosmtpd reads the hooks at each new session
    srcs = sources(ip1={"warmup": [100], "warmup_start": today()})
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                               sources=srcs, default_pool="main")})
    await send(world, 10)
    await sink.wait_for(10, 20)
    assert peers(world) == {IP1: 2, IP2: 8}
    assert not records(world, "TransientFailure") and not records(world, "Bounce")
    assert node.metrics.egress_blocks.labels("ip1")._value.get() == 1
    # Counted: the two that went out through ip1, not the one it was refused for.
    assert engine(node).dispatcher.egress.ledger.count("ip1", SITE) == 2


@ONE_LOOP
async def test_a_block_at_data_on_two_connections_is_one_block_and_a_deferral(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(
        data_delay=0.2,  # both messages are in DATA at once, on two connections
        data_reply=lambda _rcpts, n: BLOCKED if n < 2 else None))
    node = await world.start({"egress": {"state": str(tmp_path / "egress.json"),
                                         "block_backoff": "500ms"}})
    mids = await asyncio.gather(*(world.submit([f"r{n}@dest.test"], n=n) for n in range(2)))
    await sink.wait_for(2, 20)
    await world.wait_records("Delivery", 2)
    assert not records(world, "Bounce")
    deferred = records(world, "TransientFailure")
    assert {r["message_id"] for r in deferred} == set(mids)
    assert all("refuses source (default): 554 5.7.1" in r["response"] or "is blocked" in
               r["response"] for r in deferred), deferred
    site = engine(node).dispatcher.sites[SITE]
    # The second refusal came while the first block was in force: it did not lengthen it.
    assert site.block_reply.startswith("554") and node.metrics.egress_blocks.labels(
        "")._value.get() == 1


@ONE_LOOP
async def test_a_block_doubles_up_to_its_ceiling_and_a_delivery_resets_it(
        world: World, tmp_path: Path) -> None:
    refused: list[float] = []
    block = {"on": True}

    def rcpt(_address: str, _attempt: int) -> str | None:
        if block["on"]:
            refused.append(time.monotonic())
            return "450 4.7.1 Client host rejected: blocked using b.barracudacentral.org"
        return None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(rcpt=AnyAddress(rcpt)))
    node = await world.start(
        {"egress": egress(tmp_path, {"main": {"sources": ["ip1"]}}, default_pool="main",
                          block_backoff="300ms", block_backoff_max="600ms")},
        # A new connection for every attempt: connecting is no reply that accepts mail.
        max_messages_per_connection=1, retry_initial="100ms", retry_max="300ms")
    sites = engine(node).dispatcher.sites
    lengths: list[float] = []
    levels: list[int] = []

    async def next_block() -> None:
        n = len(lengths)

        def seen() -> bool:
            site = sites.get(f"{SITE}@ip1")
            return len(refused) > n and site is not None and site.blocked_until > refused[n]
        await wait_until(seen, 10, f"block {n + 1}")
        site = sites[f"{SITE}@ip1"]
        # From the refusal at the sink: a little more than the block's length.
        lengths.append(site.blocked_until - refused[n])
        levels.append(site.block_level)

    await world.submit(["a@dest.test"])
    for _ in range(5):
        await next_block()
    # Five 4xx in a row, all blocks: the source's block, not the site's back-off as well.
    assert sites[f"{SITE}@ip1"].backoff.factor == 1.0
    block["on"] = False
    await sink.wait_for(1, 10)  # accepted: the next block starts from the beginning
    block["on"] = True
    await world.submit(["b@dest.test"], n=1)
    await next_block()
    assert levels == [1, 2, 3, 4, 5, 1]
    expected = [0.3, 0.6, 0.6, 0.6, 0.6, 0.3]
    assert all(e <= got < e + 0.25 for e, got in zip(expected, lengths, strict=True)), lengths
    assert not records(world, "Bounce")


@ONE_LOOP
async def test_jobs_queued_behind_a_block_go_back_without_reaching_the_site(
        world: World, tmp_path: Path) -> None:
    release = threading.Event()
    offered: list[str] = []

    def rcpt(address: str, _attempt: int) -> str:
        offered.append(address)
        if len(offered) == 1:
            release.wait(10)  # holds the sink until the others queue behind this one
        return BLOCKED_RCPT

    world.zone(ZONE)
    world.sink("127.0.0.2", SinkScript(rcpt=AnyAddress(rcpt)))
    srcs = sources(ip1={"sites": {SITE: {"max_connections": 1}}})
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1"]}},
                                               sources=srcs, default_pool="main")})
    sites = engine(node).dispatcher.sites
    try:
        mids = await send(world, 1)
        await wait_until(lambda: offered, 10, "the first RCPT")
        mids += await send(world, 3, start=1)
        await wait_until(lambda: len(sites[f"{SITE}@ip1"].ready) == 3, 10, "3 queued")
    finally:
        release.set()
    await wait_until(lambda: {r["message_id"] for r in records(world, "TransientFailure")}
                     >= set(mids), 10, "all four deferred")
    assert offered == ["r0@dest.test"]
    later = [r for r in records(world, "TransientFailure") if r["message_id"] != mids[0]]
    assert all("Every source of pool main is blocked" in r["response"] for r in later), later


@ONE_LOOP
async def test_a_job_waiting_on_the_site_rate_when_its_source_is_blocked_never_reaches_it(
        world: World, tmp_path: Path) -> None:
    offered: list[str] = []

    def rcpt(address: str, _attempt: int) -> str:
        offered.append(address)
        return BLOCKED_RCPT

    world.zone(ZONE)
    world.sink("127.0.0.2", SinkScript(rcpt=AnyAddress(rcpt)))
    await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1"]}},
                                        default_pool="main")},
                      sites={SITE: {"rate": "2/s"}})
    # The second waits half a second for the site's rate, chosen ip1 before the block.
    mids = await asyncio.gather(*(world.submit([f"r{n}@dest.test"], n=n) for n in range(2)))
    await wait_until(lambda: {r["message_id"] for r in records(world, "TransientFailure")}
                     >= set(mids), 10, "both deferred")
    assert len(offered) == 1, offered


@ONE_LOOP
async def test_the_reaper_does_not_forget_a_blocked_source(world: World,
                                                         tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(
        greeting_reply=lambda peer: BLOCKED if peer == IP1 else None))
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                               default_pool="main")},
                             site_idle="200ms", idle_timeout="100ms")
    sites = engine(node).dispatcher.sites
    await send(world, 4)
    await sink.wait_for(4, 10)
    tried = sink.peers.count(IP1)
    # ip2's site, idle after ip1's, is forgotten: the reaper has looked at ip1's too.
    await wait_until(lambda: f"{SITE}@ip2" not in sites, 10, "ip2's idle site reaped")
    assert sites[f"{SITE}@ip1"].blocked()
    await send(world, 4, start=10)
    await sink.wait_for(8, 10)
    assert sink.peers.count(IP1) == tried
    assert peers(world) == {IP2: 8}


# --- warm-up counts -----------------------------------------------------------------------


@ONE_LOOP
async def test_a_cap_counts_per_site_for_every_domain_there_and_is_written_while_running(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    node = await world.start({"egress": warm_wait(tmp_path, 4)})
    await send(world, 3, "dest.test")
    await send(world, 3, "other.test", start=10)  # the same MX: the same provider
    await sink.wait_for(4, 10)
    failures = await world.wait_records("TransientFailure", 2, 10)
    assert all("warm-up cap (4 today)" in r["response"] for r in failures), failures
    assert peers(world) == {IP1: 4}
    assert engine(node).dispatcher.egress.ledger.count("ip1", SITE) == 4
    state = tmp_path / "egress.json"

    def written() -> bool:
        try:
            data = json.loads(state.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return data["day"] == today() and data["counts"] == {"ip1": {SITE: 4}}
    await wait_until(written, 5, "the counts written while the node runs")


@ONE_LOOP
async def test_attempts_that_sent_nothing_give_their_warm_up_turn_back(
        world: World, tmp_path: Path) -> None:
    greeted = [0]

    def greeting(peer: str) -> str | None:
        if peer != IP1:
            return None  # the sink's own readiness probe
        greeted[0] += 1
        return "421 4.3.2 Too busy, try again later" if greeted[0] <= 3 else None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(greeting_reply=greeting))
    node = await world.start({"egress": warm_wait(tmp_path, 3)})
    await send(world, 3)
    await sink.wait_for(3, 15)
    assert greeted[0] > 3  # the first attempts were turned away at the greeting
    assert engine(node).dispatcher.egress.ledger.count("ip1", SITE) == 3


@ONE_LOOP
async def test_mail_held_by_a_site_suspension_uses_no_warm_up_turn(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    node = await world.start({"egress": warm_wait(tmp_path, 5)})
    dispatcher = engine(node).dispatcher
    await node.coordinator.change_runtime(suspended={f"site:{SITE}": True})
    await send(world, 2)
    await wait_until(lambda: dispatcher.held_by("dest.test") == f"site:{SITE}", 10, "held")
    assert dispatcher.egress.ledger.count("ip1", SITE) == 0
    await node.coordinator.change_runtime(suspended={f"site:{SITE}": False})
    await sink.wait_for(2, 10)
    assert dispatcher.egress.ledger.count("ip1", SITE) == 2


# --- limits and rates ---------------------------------------------------------------------


@ONE_LOOP
async def test_a_sources_own_rate_holds_under_a_runtime_site_throttle_which_they_share(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    own = {"sites": {SITE: {"rate": "5/s"}}}
    node = await world.start(
        {"egress": egress(tmp_path, {"p1": {"sources": ["ip1"]}, "p2": {"sources": ["ip2"]}},
                          sources=sources(ip1=own, ip2=own))},
        domains={"dest.test": {"pool": "p1"}, "other.test": {"pool": "p2"}})
    await send(world, 1)  # ip1's site exists before the runtime throttle, ip2's after
    await sink.wait_for(1, 10)
    # A generous site rate: it does not lift either source's own 5/s.
    await node.coordinator.change_runtime(throttles={f"site:{SITE}": 1000.0})
    sent = time.monotonic()  # no slot of either rate before this
    await send(world, 6, "dest.test", start=10)
    await send(world, 6, "other.test", start=20)
    await sink.wait_for(13, 20)
    for peer in (IP1, IP2):
        times = [m.at for m in sink.messages[1:] if m.peer == peer]
        assert len(times) == 6 and max(times) - sent >= 5 / 5 * 0.95, (peer, times)
    # A tight one holds for both sources together.
    await node.coordinator.change_runtime(throttles={f"site:{SITE}": 4.0})
    sent = time.monotonic()
    await send(world, 4, "dest.test", start=30)
    await send(world, 4, "other.test", start=40)
    await sink.wait_for(21, 20)
    times = [m.at for m in sink.messages[13:]]
    assert max(times) - sent >= 7 / 4 * 0.95, times


async def test_a_sources_own_rate_is_this_nodes_not_a_share_of_the_clusters() -> None:
    # On a node with half the cluster's shards: a site's rate is the cluster's (this node
    # takes half), a source's own rate is its address's, and an address is on one node.
    sink = Sink("127.0.0.2")
    sink.start()
    try:
        cfg = config_from_dict({
            "delivery": {"sites": {"*": {"rate": "10/s"}}},
            "egress": {"sources": {"ip1": {"address": IP1, "sites": {"*": {"rate": "10/s"}}}},
                       "state": "/nonexistent/egress.json"}})
        route = Route(SITE, (("127.0.0.2", sink.port, SITE),))
        sites = [Site(key, route, site_limits(cfg.delivery, route, "me.test", source),
                      Breaker(5, 60.0), lambda: 0.5, "n1")
                 for key, source in ((f"{SITE}@ip1", cfg.egress.sources["ip1"]),
                                     (SITE, None))]
        for n, site in enumerate(sites):
            job = Job(f"m{n}", "dest.test", "app@sender.test", [f"r{n}@dest.test"],
                      message(n, 300), False, False)
            [result] = await site.deliver(job)
            assert result.code == 250, result
        assert [s.throttle.rate for s in sites] == [10.0, 5.0]
        assert [m.peer for m in sink.messages] == [IP1, "127.0.0.1"]
        for site in sites:
            await site.close()
    finally:
        sink.stop()


@ONE_LOOP
async def test_a_sources_defaults_helo_and_wildcard_site_entry(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    srcs = {"ip1": {"address": IP1,  # no ehlo: [delivery] helo
                    "sites": {"*": {"max_connections": 1, "max_messages_per_connection": 1}}}}
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1"]}},
                                               sources=srcs, default_pool="main")},
                             helo="relay.sender.test")
    await send(world, 5)
    await sink.wait_for(5, 10)
    assert {(m.peer, m.helo) for m in sink.messages} == {(IP1, "relay.sender.test")}
    # Its "*" entry is its entry at every site: one message per connection, one at a time.
    assert sink.peers.count(IP1) == 5 and sink.max_active_by_peer[IP1] == 1
    assert node.metrics.egress_transactions.labels("ip1")._value.get() == 5


@ONE_LOOP
async def test_a_reload_changes_the_pools(world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    pools = {"p1": {"sources": ["ip1"]}, "p2": {"sources": ["ip2"]}}
    node = await world.start({"egress": egress(tmp_path, pools, default_pool="p1")})
    await send(world, 2)
    await sink.wait_for(2, 10)
    cfg = dataclasses.replace(node.cfg, egress=dataclasses.replace(node.cfg.egress,
                                                                   default_pool="p2"))
    engine(node).reload(cfg)  # what SIGHUP applies
    await send(world, 2, start=10)
    await sink.wait_for(4, 10)
    assert peers(world) == {IP1: 2, IP2: 2}


# --- runtime tenant throttles -------------------------------------------------------------


def tenant_times(world: World, tenant: str) -> list[float]:
    return [r["time"] for r in records(world, "Delivery") if r.get("tenant") == tenant]


@ONE_LOOP
async def test_a_runtime_tenant_throttle_needs_no_tenants_entry_and_applies_to_one_in_use(
        world: World) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    node = await world.start({"tenants": {"slow": {"rate": "1000/s"}}})
    await send_fast(world, 3, "slow")  # "slow" has a throttle (at 1000/s) from now on
    await wait_until(lambda: len(tenant_times(world, "slow")) == 3, 10)
    await node.coordinator.change_runtime(throttles={"tenant:slow": 20.0,
                                                     "tenant:ghost": 20.0})
    before = len(records(world, "Delivery"))
    await asyncio.gather(send_fast(world, 15, "slow"), send_fast(world, 15, "ghost"))
    await wait_until(lambda: len(records(world, "Delivery")) == before + 30, 20)
    assert span(tenant_times(world, "slow")[3:]) >= 14 / 20 * 0.95
    assert span(tenant_times(world, "ghost")) >= 14 / 20 * 0.95
    assert node.admin is not None
    res = await asyncio.to_thread(ctl, f"http://127.0.0.1:{node.admin.port}", "throttle",
                                  "show")
    assert res.returncode == 0, res.stderr
    assert re.search(r"tenant:slow\s+1000\.000\s+config", res.stdout), res.stdout
    assert re.search(r"tenant:ghost\s+20\.000\s+runtime, tenant", res.stdout), res.stdout


@ONE_LOOP
async def test_clearing_a_tenant_throttle_releases_its_waiting_mail_at_once(
        world: World) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    node = await world.start()
    await node.coordinator.change_runtime(throttles={"tenant:ghost": 1 / 60})  # 1/m
    await send_fast(world, 2, "ghost", connections=1)
    await wait_until(lambda: len(tenant_times(world, "ghost")) == 1, 10)
    await node.coordinator.change_runtime(throttles={"tenant:ghost": None})
    await wait_until(lambda: len(tenant_times(world, "ghost")) == 2, 10,
                     "the second message, most of a minute early")


def test_a_runtime_tenant_throttle_holds_for_the_cluster_as_a_whole(
        tmp_path: Path, etcd: EtcdServer) -> None:
    # Two node processes, half the shards each: each sends its share of the tenant's rate.
    sink = Sink("127.0.0.1", 0)
    sink.start()
    rate, total = 6.0, 18
    c = Cluster(tmp_path, etcd, enabled=True, smarthost=f"127.0.0.1:{sink.port}")
    try:
        c.start_nodes(["n1", "n2"])
        c.wait(c.settled({"n1", "n2"}), 20, "settled")
        res = ctl(c.nodes["n1"], "throttle", "set", "--tenant", "bulk", f"{rate:g}/s")
        assert res.returncode == 0, res.stderr
        wait_until_sync(lambda: ctl_json(c.nodes["n2"], "throttle", "show")["runtime"]
                        == {"tenant:bulk": rate}, 10, "n2 sees the throttle")
        for i in range(total):
            node = c.nodes[("n1", "n2")[i % 2]]
            with smtplib.SMTP("127.0.0.1", node.smtp_port) as s:
                s.sendmail("app@sender.test", [f"r{i}@bulk.test"],
                           message(i, 300, extra_headers="X-MTA-Tenant: bulk\r\n"))
        wait_until_sync(lambda: len(sink.messages) >= total, 30, "all delivered")
        times = sorted(m.at for m in sink.messages)
        # Together at most `rate` a second (plus a first message per node, free at once).
        assert times[-1] - times[0] >= (total - 2) / rate * 0.8, times
    finally:
        c.stop()
        sink.stop()


@ONE_LOOP
async def test_raising_a_tenant_rate_releases_its_waiting_mail_at_once(world: World) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    node = await world.start()
    await node.coordinator.change_runtime(throttles={"tenant:ghost": 1 / 60})
    await send(world, 2, tenant="ghost")

    def delivered() -> int:
        return len([r for r in world.accounting() if r["type"] == "Delivery"])

    await wait_until(lambda: delivered() == 1, 10, "the first, in the 1/m slot")
    await node.coordinator.change_runtime(throttles={"tenant:ghost": 1000.0})
    # Not in the minute the old rate booked for it.
    await wait_until(lambda: delivered() == 2, 10, "the second, at 1000/s")


@ONE_LOOP
async def test_a_recurring_block_doubles_though_the_blocked_site_sat_idle(
        world: World, tmp_path: Path) -> None:
    refused: list[float] = []

    def rcpt(_address: str, _attempt: int) -> str:
        refused.append(time.monotonic())
        return BLOCKED_RCPT

    world.zone(ZONE)
    world.sink("127.0.0.2", SinkScript(rcpt=AnyAddress(rcpt)))
    # site_idle far below the back-off: the blocked source's site is idle through each block.
    node = await world.start({"egress": egress(
        tmp_path, {"main": {"sources": ["ip1"]}}, default_pool="main",
        block_backoff="300ms", block_backoff_max="10s")},
        site_idle="200ms", idle_timeout="100ms", retry_initial="500ms", retry_max="500ms")
    assert node.engine is not None
    sites = node.engine.dispatcher.sites
    key = f"{SITE}@ip1"
    levels = []
    await world.submit(["a@dest.test"])
    for n in range(3):
        await wait_until(lambda n=n: len(refused) > n and key in sites  # type: ignore[misc]
                         and sites[key].blocked_until > refused[n], 15, f"block {n + 1}")
        levels.append(sites[key].block_level)
    assert levels == [1, 2, 3]
