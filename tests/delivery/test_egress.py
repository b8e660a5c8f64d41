"""Egress sources and pools (issue 18): mail leaves from the addresses of its pool (a tenant's,
a domain's or the default), by weight, within each source's own limits at a site, within
its warm-up cap of the day, and a source a site blocks backs off there alone. Sources are
bound to 127.0.0.11-13; the sink records each session's client address and EHLO name."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness.sink import AnyAddress, SinkScript
from mta.config import ConfigError, EgressConfig, config_from_dict
from mta.delivery.egress import Egress
from tests.support.ctl import ctl
from tests.support.egress import (
    BLOCKED,
    IP1,
    IP2,
    IP3,
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


@ONE_LOOP
async def test_sources_take_turns_by_weight_each_with_its_own_address_and_ehlo(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start({"egress": egress(tmp_path, {"main": {"sources": {"ip1": 3, "ip2": 1}}},
                                        default_pool="main")})
    await send(world, 40)
    await sink.wait_for(40, 30)
    assert peers(world) == {IP1: 30, IP2: 10}
    assert {(m.peer, m.helo) for m in sink.messages} == {(IP1, "one.sender.test"),
                                                         (IP2, "two.sender.test")}
    records = await world.wait_records("Delivery", 40)
    assert Counter(r["source"] for r in records) == {"ip1": 30, "ip2": 10}


@ONE_LOOP
async def test_a_tenants_pool_beats_the_domains_which_beats_the_default(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    pools = {"p1": {"sources": ["ip1"]}, "p2": {"sources": ["ip2"]}, "p3": {"sources": ["ip3"]}}
    await world.start({"egress": egress(tmp_path, pools, default_pool="p3"),
                       "tenants": {"acme": {"pool": "p1"}}},
                      domains={"other.test": {"pool": "p2"}})
    await send(world, 2, "dest.test", tenant="acme")
    await send(world, 2, "other.test", tenant="acme", start=10)
    await send(world, 2, "other.test", start=20)
    await send(world, 2, "dest.test", start=30)
    await sink.wait_for(8, 20)
    by = {m.recipients[0]: m.peer for m in sink.messages}
    assert by == {"r0@dest.test": IP1, "r1@dest.test": IP1, "r10@other.test": IP1,
                  "r11@other.test": IP1, "r20@other.test": IP2, "r21@other.test": IP2,
                  "r30@dest.test": IP3, "r31@dest.test": IP3}


@ONE_LOOP
async def test_connection_limits_and_rates_hold_per_source(world: World,
                                                          tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(data_delay=0.05))
    srcs = sources(ip1={"sites": {"mx.dest.test": {"max_connections": 1, "rate": "10/s",
                                                   "max_messages_per_connection": 2}}})
    await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                        sources=srcs, default_pool="main")},
                      sites={"mx.dest.test": {"max_connections": 3}})
    await send(world, 40)
    await sink.wait_for(40, 30)
    assert peers(world) == {IP1: 20, IP2: 20}
    # ip1: its own entry (1 connection, 2 messages each); ip2: the site's 3, its own.
    assert sink.max_active_by_peer[IP1] == 1
    assert sink.max_active_by_peer[IP2] <= 3
    assert sink.peers.count(IP1) >= 10
    times = sorted(m.at for m in sink.messages if m.peer == IP1)
    # 20 messages at ip1's 10/s cannot take less than 19 intervals (load only slows it).
    assert times[-1] - times[0] >= 19 / 10 * 0.9


@ONE_LOOP
async def test_a_site_rate_is_shared_by_its_sources(world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2", "ip3"]}},
                                        default_pool="main")},
                      sites={"mx.dest.test": {"rate": "20/s"}})
    await send(world, 30)
    await sink.wait_for(30, 30)
    assert peers(world) == {IP1: 10, IP2: 10, IP3: 10}
    times = sorted(m.at for m in sink.messages)
    # 20/s for the site as a whole: three sources do not make it 60/s.
    assert times[-1] - times[0] >= 29 / 20 * 0.9


@ONE_LOOP
async def test_a_warm_up_cap_spills_to_another_source(world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    srcs = sources(ip1={"warmup": [5, "50/d"], "warmup_start": today()})
    await world.start({"egress": egress(tmp_path, {"main": {"sources": ["ip1", "ip2"]}},
                                        sources=srcs, default_pool="main")})
    await send(world, 20)
    await sink.wait_for(20, 30)
    assert peers(world) == {IP1: 5, IP2: 15}
    assert not [r for r in world.accounting() if r["type"] == "TransientFailure"]


@ONE_LOOP
async def test_over_its_cap_mail_waits_and_the_count_survives_a_restart(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    section = {"egress": warm_wait(tmp_path, "5/d")}
    await world.start(section)
    await send(world, 8)
    failures = await world.wait_records("TransientFailure", 3, 20)
    assert all("warm-up cap (5 today)" in r["response"] for r in failures), failures
    assert peers(world) == {IP1: 5}
    assert world.node is not None
    await world.node.stop()
    state = json.loads((tmp_path / "egress.json").read_text())
    assert state["day"] == today() and sum(state["counts"]["ip1"].values()) == 5
    world.node = None
    await world.start(section)
    seen = len(failures)
    # The day's count came back from disk: new mail waits too.
    fresh = [await world.submit([f"late{n}@dest.test"], n=50 + n) for n in range(2)]
    records = await world.wait_records("TransientFailure", seen + 2, 20)
    assert {r["message_id"] for r in records[seen:]} >= set(fresh)
    assert peers(world) == {IP1: 5}


@ONE_LOOP
async def test_a_blocked_source_backs_off_alone_and_its_mail_goes_through_another(
        world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(
        greeting_reply=lambda peer: BLOCKED if peer == IP1 else None))
    node = await world.start({"egress": egress(
        tmp_path, {"main": {"sources": ["ip1", "ip2"]}}, default_pool="main")})
    await send(world, 20)
    await sink.wait_for(20, 30)
    assert peers(world) == {IP2: 20}
    tried = sink.peers.count(IP1)
    assert tried >= 1
    # Backing off: ip1 is not tried again at that site, and nothing was deferred or bounced.
    await send(world, 20, start=100)
    await sink.wait_for(40, 30)
    assert sink.peers.count(IP1) == tried
    assert not [r for r in world.accounting() if r["type"] in ("TransientFailure", "Bounce")]
    assert node.metrics.egress_blocks.labels("ip1")._value.get() == 1
    assert node.admin is not None
    res = await asyncio.to_thread(ctl, f"http://127.0.0.1:{node.admin.port}", "queue",
                                  "--local")
    [row] = [line for line in res.stdout.splitlines() if line.startswith("mx.dest.test@ip1")]
    assert re.search(r"\s(9m\d+s|10m)\s", row), row  # BLOCKED: about 10 minutes left
    [other] = [line for line in res.stdout.splitlines() if line.startswith("mx.dest.test@ip2")]
    assert " - " in other


@ONE_LOOP
async def test_a_block_at_rcpt_defers_instead_of_bouncing_and_waits_out_the_backoff(
        world: World, tmp_path: Path) -> None:
    # No egress configured: the default address is the only source, and its block holds the
    # site's mail back (deferred, never bounced) until the back-off ends.
    blocked = {"on": True}
    refusals: list[float] = []

    def rcpt(_address: str, _attempt: int) -> str | None:
        if blocked["on"]:
            blocked["on"] = False  # the next attempt that reaches the site gets through
            refusals.append(asyncio.get_running_loop().time())
            return "550 5.7.1 Client host rejected: blocked using b.barracudacentral.org"
        return None

    world.zone(ZONE)
    sink = world.sink("127.0.0.2", SinkScript(rcpt=AnyAddress(rcpt)))
    await world.start({"egress": {"state": str(tmp_path / "egress.json"),
                                  "block_backoff": "2s"}})
    mid = await world.submit(["a@dest.test"])
    [got] = await sink.wait_for(1, 30)
    await world.wait_records("Delivery", 1)
    records = [r for r in world.accounting() if r["message_id"] == mid]
    kinds = [r["type"] for r in records]
    assert "Bounce" not in kinds and kinds[-1] == "Delivery", kinds
    deferrals = [r for r in records if r["type"] == "TransientFailure"]
    assert "refuses source (default): 550 5.7.1" in deferrals[0]["response"]
    # Retries (every 200 ms to 1 s) during the back-off did not reach the site.
    assert len(refusals) == 1 and sink.sessions == 2
    assert any("is blocked" in r["response"] for r in deferrals[1:]), deferrals
    assert records[-1]["time"] - deferrals[0]["time"] >= 2 * 0.9
    assert got.recipients == ["a@dest.test"]


def test_weighted_turns_skip_blocked_and_capped_sources() -> None:
    now = [1_764_547_200.0]  # 2025-12-01 00:00 UTC
    cfg = config_from_dict({"egress": {
        "sources": {"a": {"warmup": [2, 4], "warmup_start": "2025-12-01"}, "b": {}, "c": {}},
        "pools": {"spill": {"sources": {"a": 2, "b": 1}},
                  "wait": {"sources": ["a"], "over_cap": "wait"}},
        "state": "/nonexistent/egress.json"}}).egress
    egress_ = Egress(cfg, clock=lambda: now[0])
    free = lambda _s: 0.0  # noqa: E731
    picks = [egress_.choose("spill", "mx", free).source for _ in range(6)]
    # a's weight 2 for its first two turns, then its cap (2 today) sends the rest to b.
    assert picks == ["a", "b", "a", "b", "b", "b"]
    refused = egress_.choose("wait", "mx", free).refused
    assert refused is not None and refused.code == 451 and "cap (2 today)" in refused.text
    booked = egress_.choose("wait", "other-mx", free)  # counted per site
    assert booked.source == "a" and booked.day == "2025-12-01"
    egress_.give_back(booked)
    assert egress_.ledger.count("a", "other-mx") == 0  # a turn given back is free again
    now[0] += 86_400  # the next day: the second step, a new count
    assert egress_.cap("a") == 4 and egress_.ledger.count("a", "mx") == 0
    now[0] += 86_400  # past the ramp: no cap
    assert egress_.cap("a") is None
    blocked = lambda s: 1e12 if s == "a" else 0.0  # noqa: E731
    assert {egress_.choose("spill", "mx", blocked).source for _ in range(5)} == {"b"}
    every = egress_.choose("spill", "mx", lambda _s: 1e12).refused
    assert every is not None and "blocked" in every.text


def test_the_ledger_keeps_only_todays_counts(tmp_path: Path) -> None:
    now = [1_764_547_200.0]
    cfg = EgressConfig(state=str(tmp_path / "e.json"))
    first = Egress(cfg, clock=lambda: now[0])
    first.ledger.add("a", "mx+dane", 3)
    asyncio.run(first.ledger.save())
    again = Egress(cfg, clock=lambda: now[0])
    again.ledger.load()
    assert again.ledger.count("a", "mx") == 3  # the DANE mark is the same provider
    now[0] += 86_400
    later = Egress(cfg, clock=lambda: now[0])
    later.ledger.load()
    assert later.ledger.count("a", "mx") == 0


@pytest.mark.parametrize(("raw", "where"), [
    ({"egress": {"pools": {"p": {"sources": ["nope"]}}}}, '[egress.pools."p"] sources'),
    ({"egress": {"sources": {"a": {"address": "192.0.2.55"}}}},
     '[egress.sources."a"] address: cannot send from 192.0.2.55'),
    ({"egress": {"sources": {"a": {"address": "not-an-ip"}}}}, "[egress] sources"),
    ({"egress": {"sources": {"a": {"warmup": ["200/d"]}}}}, '[egress.sources."a"] warmup_start'),
    ({"egress": {"sources": {"a": {"warmup": ["200/h"]}}}}, "daily cap"),
    ({"tenants": {"acme": {"pool": "gone"}}}, '[tenants."acme"] pool: no pool'),
    ({"delivery": {"domains": {"x.test": {"pool": "gone"}}}},
     '[delivery.domains."x.test"] pool'),
    ({"egress": {"default_pool": "gone"}}, "[egress] default_pool"),
    ({"egress": {"block_patterns": ["("]}}, "[egress] block_patterns"),
    ({"egress": {"pools": {"p": {"sources": {"a": 0}}}, "sources": {"a": {}}}}, "weight"),
])
def test_egress_config_errors_name_the_key(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        config_from_dict(raw)


def test_block_patterns_look_at_the_start_of_a_reply_only() -> None:
    # The operator's patterns (".*spamhaus" is quadratic) run on the event loop against a
    # reply of the remote's choosing, up to 32 KiB: only its first 1,000 characters count.
    egress_ = Egress(config_from_dict({"egress": {"block_patterns": [".*spamhaus"]}}).egress)
    assert egress_.is_block("554 5.7.1 " + "x" * 900 + " listed by Spamhaus")
    assert not egress_.is_block("554 5.7.1 " + "x" * 1000 + " listed by Spamhaus")
