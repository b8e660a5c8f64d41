"""Egress sources and pools under attack (issue 18): a hostile client choosing the addresses a
remote echoes back, a hostile or unlucky operator reloading while mail is in flight, rates that
must hold across every source of a site, warm-up bookings that must come back, blocks that
recur for days, IPv6 sources and IPv4-only sites. Real sockets on loopback (sources bound to
127.0.0.11-13), as in test_egress.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.mail import message
from harness.poll import wait_until
from harness.sink import AnyAddress, Sink, SinkScript, _SinkHandler
from mta.config import config_from_dict
from mta.delivery.breaker import Breaker
from mta.delivery.egress import Egress, WarmupLedger
from mta.delivery.limits import site_limits
from mta.delivery.routes import Route
from mta.delivery.site import Job, Site, SourceBlockedError
from tests.support.egress import (
    BLOCKED,
    IP1,
    IP2,
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


class _Hooks(_SinkHandler):
    """The sink's handler, with a say at MAIL (a Postfix that checks senders)."""

    def __init__(self, sink: Sink, mail: Callable[[str], str | None]) -> None:
        super().__init__(sink)
        self._mail = mail

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self._mail(address)
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


def _reload(world: World, **raw: Any) -> None:
    """What SIGHUP does with a re-read file whose [egress] (and [tenants]) are ``raw``."""
    node = world.node
    assert node is not None and node.engine is not None
    new = config_from_dict(raw)
    cfg = dataclasses.replace(node.cfg, egress=new.egress, tenants=new.tenants)
    node.engine.reload(cfg)
    node.cfg = cfg


def _kinds(world: World, kind: str) -> list[dict[str, Any]]:
    """Records of ``kind`` for mail to dest.test (not the DSNs, whose host has no sink)."""
    return [r for r in world.accounting()
            if r["type"] == kind and r.get("recipient", "").endswith("@dest.test")]


# --- a hostile client writes the block reply ------------------------------------------------


@ONE_LOOP
async def test_a_recipient_address_echoed_in_a_refusal_does_not_block_the_site(
        world: World, tmp_path: Path) -> None:
    # Postfix echoes the address it refuses: "<blacklisted@dest.test>: Recipient address
    # rejected". A client that picks that local part must not make the site refuse our
    # address for everybody's mail (10 minutes, doubling), nor turn a hard bounce into
    # deferrals until max_age. No [egress] pools at all: every install has block_patterns.
    def rcpt(address: str, _attempt: int) -> str | None:
        if address.startswith("blacklisted"):
            return (f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in "
                    "virtual mailbox table")
        return None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(rcpt=AnyAddress(rcpt)))
    node = await world.start({"egress": {"state": str(tmp_path / "egress.json")}})
    hostile = await world.submit(["blacklisted@dest.test"])
    await wait_until(lambda: sink.refused, 10, "the refusal")
    legit = await world.submit(["someone@dest.test"], n=1)
    await sink.wait_for(1, 15)
    bounces = await world.wait_records("Bounce", 1, 15)
    assert [b["message_id"] for b in bounces] == [hostile]
    assert "550 5.1.1" in bounces[0]["response"]
    delivered = await world.wait_records("Delivery", 1, 15)
    assert [r["message_id"] for r in delivered] == [legit]
    assert not _kinds(world, "TransientFailure")
    assert node.metrics.egress_blocks.labels("")._value.get() == 0


@ONE_LOOP
async def test_a_sender_address_echoed_at_mail_does_not_block_every_source_of_the_pool(
        world: World, tmp_path: Path) -> None:
    # One message from "spamhaus@..." to a site that checks senders and echoes them: each
    # source in turn is refused at MAIL with the sender in the text, and was blocked there.
    def mail(address: str) -> str | None:
        if address.startswith("spamhaus"):
            return f"553 5.7.1 <{address}>: Sender address rejected: Access denied"
        return None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", start=False)
    sink.handler = _Hooks(sink, mail)
    sink.start()
    node = await world.start({"egress": egress(
        tmp_path, {"main": {"sources": ["ip1", "ip2", "ip3"]}}, default_pool="main")})
    hostile = await world.submit(["a@dest.test"], sender="spamhaus@sender.test")
    bounced = await world.wait_records("Bounce", 1, 15)
    assert bounced[0]["message_id"] == hostile and "553 5.7.1" in bounced[0]["response"]
    await send(world, 6)
    await sink.wait_for(6, 15)
    assert sum(peers(world).values()) == 6
    assert not _kinds(world, "TransientFailure"), "mail was deferred"
    assert sum(node.metrics.egress_blocks.labels(s)._value.get()
               for s in ("ip1", "ip2", "ip3")) == 0


# --- rates that must hold for a site as a whole -------------------------------------------


@ONE_LOOP
async def test_a_site_rate_holds_for_pool_mail_and_default_address_mail_together(
        world: World, tmp_path: Path) -> None:
    # acme's mail leaves through a pool, everyone else's from the default address: the
    # site's 4/s is for both together, not 4/s each.
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start({"egress": egress(tmp_path, {"p1": {"sources": ["ip1"]}}),
                       "tenants": {"acme": {"pool": "p1"}}},
                      sites={"mx.dest.test": {"rate": "4/s"}})
    await asyncio.gather(send(world, 4, tenant="acme"), send(world, 4, start=10))
    await sink.wait_for(8, 20)
    assert peers(world)[IP1] == 4
    times = sorted(m.at for m in sink.messages)
    assert times[-1] - times[0] >= 7 / 4 * 0.9, times


@ONE_LOOP
async def test_an_unrelated_runtime_change_does_not_reset_a_sites_shared_rate(
        world: World, tmp_path: Path) -> None:
    # Pool mail waits for the site's rate in the dispatcher; a runtime change anywhere
    # (here a tenant throttle for someone else) must not hand out that rate's slots again.
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                               default_pool="main")},
                             sites={"mx.dest.test": {"rate": "4/s"}})
    await send(world, 4)
    assert node.admin is not None
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{node.admin.port}/api/v1/throttles",
            json={"tenant": "someone-else", "spec": "5/s"},
            headers={"Authorization": "Bearer t0ken"}) as res:
        assert res.status == 200, await res.text()
    await send(world, 4, start=10)
    await sink.wait_for(8, 20)
    times = sorted(m.at for m in sink.messages)
    assert times[-1] - times[0] >= 7 / 4 * 0.9, times


# --- warm-up bookings ---------------------------------------------------------------------


@ONE_LOOP
async def test_an_attempt_cancelled_at_shutdown_gives_its_warm_up_booking_back(
        world: World, tmp_path: Path) -> None:
    # Picks are booked against the cap at once; attempts still waiting for the site's rate
    # when the node stops are cancelled. Their bookings must not survive into the saved
    # counts, or the day's cap is spent on mail that never went (over_cap = "wait": it
    # then waits for tomorrow).
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start({"egress": warm_wait(tmp_path, 50),
                       "smtp": {"shutdown_grace": "100ms"}},
                      sites={"mx.dest.test": {"rate": "2/s"}})
    await send(world, 5)
    await sink.wait_for(1, 15)
    assert world.node is not None
    await world.node.stop()
    world.node = None
    state = json.loads((tmp_path / "egress.json").read_text())
    assert state["counts"]["ip1"]["mx.dest.test"] == len(sink.messages) < 5


def test_a_large_warm_up_ledger_survives_a_restart(tmp_path: Path) -> None:
    # One entry per source and provider (MX set) reached today: a sender reaching a few
    # hundred thousand small domains with its warm-up sources writes more than 16 MiB.
    # Read back truncated, the whole day's counts were lost (caps exceeded after restart).
    path = str(tmp_path / "egress.json")
    ledger = WarmupLedger(path)
    for n in range(260_000):
        ledger.add("ip1", f"mx{n:06d}.a-small-business-with-its-own-mail-server.example", 1)
    ledger.add("ip1", "gmail-smtp-in.l.google.com", 200)
    asyncio.run(ledger.save())
    assert Path(path).stat().st_size > 16 << 20
    again = WarmupLedger(path)
    again.load()
    assert again.count("ip1", "gmail-smtp-in.l.google.com") == 200


@ONE_LOOP
async def test_a_warm_up_cap_holds_for_a_provider_whose_domains_each_have_their_own_mx(
        world: World, tmp_path: Path) -> None:
    # Microsoft 365 gives each customer domain its own MX host (<domain>.mail.protection.
    # outlook.com), as do Proofpoint and Barracuda: one provider, one site per domain. The
    # operator names the provider in [delivery.sites]; the cap was counted per MX set, so
    # a fresh address sent its step to each customer domain (here 3 domains: 2x its cap).
    zone = {f"{d}.test": {"MX": [(10, f"{d}-test.mail.protection.outlook.test")]}
            for d in "abc"}
    zone.update({f"{d}-test.mail.protection.outlook.test": {"A": ["127.0.0.2"]}
                 for d in "abc"})
    world.zone(zone)
    sink = world.sink("127.0.0.2")
    srcs = sources(ip1={"warmup": [3], "warmup_start": today()})
    await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                        sources=srcs, default_pool="main")},
                      sites={"*.mail.protection.outlook.test": {"max_connections": 4}})
    for n in range(9):
        await world.submit([f"r{n}@{'abc'[n % 3]}.test"], n=n)
    await sink.wait_for(9, 10)
    assert peers(world) == {IP1: 3, IP2: 6}


def test_a_booking_of_yesterday_given_back_today_does_not_raise_todays_cap() -> None:
    # A pick booked at 23:59:59 whose attempt fails after midnight was given back from the
    # new day's count: one more message than the cap that day per such attempt (a backlog
    # waiting on a slow site rate at midnight: as many as were waiting).
    now = [1_764_633_599.0]  # 2025-12-01 23:59:59 UTC
    cfg = config_from_dict({"egress": {
        "sources": {"a": {"warmup": [2, 2], "warmup_start": "2025-12-01"}},
        "pools": {"wait": {"sources": ["a"], "over_cap": "wait"}},
        "state": "/nonexistent/egress.json"}}).egress
    egress_ = Egress(cfg, clock=lambda: now[0])
    free = lambda _s: 0.0  # noqa: E731
    yesterday = egress_.choose("wait", "mx", free)
    assert yesterday.source == "a"
    now[0] += 2  # 2025-12-02 00:00:01
    assert [egress_.choose("wait", "mx", free).source for _ in range(2)] == ["a", "a"]
    egress_.give_back(yesterday)  # its attempt failed: nothing went out through it
    assert egress_.choose("wait", "mx", free).refused is not None, "3 today, cap 2"


# --- reloads while mail is in flight ------------------------------------------------------


@ONE_LOOP
async def test_a_source_removed_by_a_reload_never_sends_from_the_default_address(
        world: World, tmp_path: Path) -> None:
    # A job queued at mx@ip2 when ip2 leaves the config went out on a new connection from
    # the system's address (127.0.0.1, [delivery] helo) and was recorded as "ip2".
    entered, release = threading.Event(), threading.Event()

    def data_reply(_rcpts: list[str], n: int) -> str | None:
        if n == 0:
            entered.set()
            release.wait(10)  # the sink's loop stands still: nothing else gets in
        return None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(data_reply=data_reply))
    srcs = sources(ip2={"sites": {"mx.dest.test": {"max_connections": 1,
                                                   "max_messages_per_connection": 1}}})
    node = await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip2"]}},
                                               sources=srcs, default_pool="main")},
                             sites={"mx.dest.test": {"max_messages_per_connection": 1}})
    await send(world, 2)
    assert node.engine is not None
    sites = node.engine.dispatcher.sites
    await wait_until(lambda: entered.is_set() and "mx.dest.test@ip2" in sites
                     and len(sites["mx.dest.test@ip2"].ready) == 1, 10, "one in DATA, one queued")
    only_ip1 = {k: v for k, v in sources().items() if k == "ip1"}
    _reload(world, egress=egress(tmp_path, {"main": {"sources": ["ip1"]}}, sources=only_ip1,
                                 default_pool="main"))
    release.set()
    await sink.wait_for(2, 10)
    assert set(peers(world)) <= {IP1, IP2}, peers(world)
    by_source = {r["source"] for r in await world.wait_records("Delivery", 2)}
    assert by_source <= {"ip1", "ip2"}
    assert {(m.peer, m.helo) for m in sink.messages} <= {(IP1, "one.sender.test"),
                                                         (IP2, "two.sender.test")}


@ONE_LOOP
async def test_a_reload_that_removes_the_pool_mid_attempt_is_no_internal_error(
        world: World, tmp_path: Path) -> None:
    # ip1 is refused at the greeting while a reload takes its pool away: the attempt went
    # on to the next source of a pool that no longer exists (KeyError, a traceback, "4.3.0
    # Internal error").
    entered, release = threading.Event(), threading.Event()

    def greeting(peer: str) -> str | None:
        if peer == IP1 and not entered.is_set():
            entered.set()
            release.wait(10)
            return BLOCKED
        return None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(greeting_reply=greeting))
    pools = {"main": {"sources": ["ip1", "ip3"]}, "other": {"sources": ["ip2"]}}
    await world.start({"egress": egress(tmp_path, pools, default_pool="main")})
    await world.submit(["a@dest.test"])
    await wait_until(entered.is_set, 10, "ip1's greeting")
    _reload(world, egress=egress(tmp_path, {"other": {"sources": ["ip2"]}},
                                 default_pool="other"))
    release.set()
    await sink.wait_for(1, 15)
    assert peers(world) == {IP2: 1}
    crashed = [r for r in _kinds(world, "TransientFailure") if "Internal error" in r["response"]]
    assert not crashed, crashed


# --- sources that cannot reach a site -----------------------------------------------------


@ONE_LOOP
async def test_an_ipv6_source_is_passed_over_at_an_ipv4_only_site(
        world: World, tmp_path: Path) -> None:
    # "::1" passes the start-up check (this host can bind it) but cannot reach 127.0.0.2:
    # every turn it got was a connection failure (a deferral, and a breaker opened), never
    # the pool's next source.
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    srcs = {**sources(), "v6": {"address": "::1", "ehlo": "six.sender.test"}}
    await world.start({"egress": egress(tmp_path, {"main": {"sources": ["v6", "ip1"]}},
                                        sources=srcs, default_pool="main")})
    await send(world, 6)
    await sink.wait_for(6, 15)
    assert peers(world) == {IP1: 6}
    assert not _kinds(world, "TransientFailure"), _kinds(world, "TransientFailure")


# --- blocks that recur ----------------------------------------------------------------------


@ONE_LOOP
async def test_a_block_that_recurs_a_thousand_times_is_still_a_block() -> None:
    # The block's length is block_backoff * 2 ** (level - 1), capped: past level 1024 that
    # product overflowed a float before the cap applied (OverflowError in the worker: the
    # job "interrupted", the source no longer blocked nor passed over). With a block of a
    # minute at most that is 17 hours of a listing; here 1 us, on a real connection each.
    sink = Sink("127.0.0.2", 0, SinkScript(greeting_reply=BLOCKED))
    sink.start()
    try:
        route = Route("mx.dest.test", (("127.0.0.2", sink.port, "mx.dest.test"),), mx=True)
        cfg = config_from_dict({"egress": {"sources": {"ip1": {"address": IP1}},
                                           "state": "/nonexistent/egress.json"}})
        source = cfg.egress.sources["ip1"]
        site = Site("mx.dest.test@ip1", route,
                    site_limits(cfg.delivery, route, "mta.test", source),
                    Breaker(5, 60.0), lambda: 1.0, "n1")
        site.source = "ip1"
        site.is_block = Egress(cfg.egress).is_block
        site.block_backoff = (1e-6, 1e-6)
        for n in range(1030):
            await wait_until(lambda: not site.blocked(), 5, "the block's end", step=0)
            job = Job(f"m{n}", "dest.test", "a@sender.test", ["b@dest.test"],
                      message(1, 300), False, False)
            with pytest.raises(SourceBlockedError):
                await site.deliver(job)
        assert sink.sessions >= 1030 and site.blocked_until > 0
    finally:
        sink.stop()
