"""Tenants and campaigns (issue 18, first part): who a message is sent for comes from the
AUTH user's users-file entry or the ``X-MTA-Tenant`` header, its campaign from
``X-MTA-Campaign``; both headers are removed at reception and both names are in every
accounting record. Tenants take turns (by weight) for the node's attempts and for a shared
site's connections, so one tenant's backlog never holds up another's mail; a tenant's rate
throttles its own mail only. A real node, real SMTP on loopback, a real DNS server."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from harness.mail import message
from harness.poll import wait_until
from mta.config import ConfigError, config_from_dict
from mta.ingress.auth import hash_password
from tests.support.world import World

ZONE = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}

# Slow (seconds of waiting on throttles, timeouts and retries): uvloop only, the loop a node
# picks when it is installed; what the loop changes is covered by the faster tests.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


def tagged(n: int, tenant: str = "", campaign: str = "") -> bytes:
    extra = (f"X-MTA-Tenant: {tenant}\r\n" if tenant else "") + (
        f"X-MTA-Campaign: {campaign}\r\n" if campaign else "")
    return message(n, 600, extra_headers=extra)


async def send_many(world: World, count: int, tenant: str, start: int = 0,
                    connections: int = 4) -> None:
    """``count`` messages for ``tenant`` to dest.test over a few reused connections."""
    assert world.node is not None and world.node.ingress is not None
    port = world.node.ingress.port

    async def one_connection(numbers: range) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await smtp.connect()
        for n in numbers:
            await smtp.sendmail("app@sender.test", [f"{tenant}{n}@dest.test"],
                                tagged(n, tenant))
        await smtp.quit()

    await asyncio.gather(*(one_connection(range(start + i, start + count, connections))
                           for i in range(connections)))


def delivered_for(world: World, tenant: str) -> int:
    return sum(1 for s in world.sinks for m in s.messages
               if all(r.startswith(tenant) for r in m.recipients))


@ONE_LOOP
@pytest.mark.parametrize("max_inflight", [1000, 20], ids=["site-turns", "scheduler-turns"])
async def test_one_tenants_backlog_does_not_hold_up_anothers_mail(
        world: World, max_inflight: int) -> None:
    # Tenant "bulk" queues 600 messages to a site that takes 50 a second; tenant "alerts"
    # then sends 40. With turns, alerts' mail goes at about half the site's pace while most
    # of bulk's backlog still waits; first come, first served would put it behind all 600
    # (12 s). max_inflight 20 keeps most of the backlog in the scheduler (its turns), 1000
    # puts all of it in the site's ready queue (the site's turns).
    world.zone(ZONE)
    world.sink("127.0.0.2")
    await world.start({"smtp": {"shutdown_grace": "1s"}}, max_inflight=max_inflight,
                      sites={"mx.dest.test": {"rate": "50/s"}}, max_connections=4)
    await send_many(world, 600, "bulk")
    await send_many(world, 40, "alerts", connections=2)
    await wait_until(lambda: delivered_for(world, "alerts") == 40, 60,
                     "all of alerts' mail delivered")
    assert delivered_for(world, "bulk") < 300, "alerts waited behind bulk's backlog"


@ONE_LOOP
async def test_weights_share_the_turns(world: World, tmp_path: Path) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    await world.start({"tenants": {"gold": {"weight": 3}}, "smtp": {"shutdown_grace": "1s"}},
                      max_inflight=20,
                      sites={"mx.dest.test": {"rate": "100/s"}}, max_connections=2)
    await asyncio.gather(send_many(world, 300, "gold"), send_many(world, 300, "plain"))
    # While both have a backlog, gold gets about three turns to plain's one.
    await wait_until(lambda: delivered_for(world, "gold") >= 200, 60, "200 of gold's")
    plain = delivered_for(world, "plain")
    assert plain < 140, f"plain got {plain} turns to gold's 200: weights not applied"
    assert plain > 25, f"plain got {plain}: starved"


@ONE_LOOP
async def test_a_tenant_rate_throttles_that_tenant_only(world: World) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    await world.start({"tenants": {"slow": {"rate": "20/s"}}})
    await send_many(world, 30, "slow")
    await send_many(world, 30, "fast")
    await wait_until(lambda: world.delivered() == 60, 30, "all delivered")
    times = {t: sorted(r["time"] for r in world.accounting()
                       if r["type"] == "Delivery" and r.get("tenant") == t)
             for t in ("slow", "fast")}
    # 30 messages at 20/s cannot take less than 29 intervals of 50 ms (load only slows).
    assert times["slow"][-1] - times["slow"][0] >= 29 / 20 * 0.95, times["slow"]
    assert len(times["fast"]) == 30


@ONE_LOOP
async def test_a_runtime_tenant_throttle_overrides_the_configured_rate(world: World) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    # Configured at 1000/s (no limit to speak of); the runtime throttle makes it 20/s.
    node = await world.start({"tenants": {"slow": {"rate": "1000/s"}}})
    await node.coordinator.change_runtime(throttles={"tenant:slow": 20.0})
    await send_many(world, 30, "slow")
    await send_many(world, 30, "fast")
    await wait_until(lambda: world.delivered() == 60, 30, "all delivered")
    times = sorted(r["time"] for r in world.accounting()
                   if r["type"] == "Delivery" and r.get("tenant") == "slow")
    assert times[-1] - times[0] >= 29 / 20 * 0.95, times
    assert node.engine is not None and node.engine.dispatcher.tenant_rate("slow") == 20.0
    await node.coordinator.change_runtime(throttles={"tenant:slow": None})
    assert node.engine.dispatcher.tenant_rate("slow") == 1000.0


async def test_headers_are_removed_and_names_are_in_every_record(world: World) -> None:
    world.zone({**ZONE, "bad.test": {"MX": [(10, "mx.dest.test")]}})
    sink = world.sink("127.0.0.2")
    await world.start()
    body = tagged(1, "acme", "spring-sale")
    mid = await world.submit(["a@dest.test"], body=body)
    [got] = await sink.wait_for(1)
    assert b"X-MTA-Tenant" not in got.content and b"X-MTA-Campaign" not in got.content
    assert b"X-Test-Id: 1" in got.content
    [reception] = await world.wait_records("Reception", 1)
    [delivery] = await world.wait_records("Delivery", 1)
    for record in (reception, delivery):
        assert record["message_id"] == mid
        assert (record["tenant"], record["campaign"]) == ("acme", "spring-sale"), record


@pytest.mark.parametrize("value", ["two words", "-lead", "x" * 65, "caf\u00e9"])
async def test_a_header_that_is_not_a_name_is_refused(world: World, value: str) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    await world.start()
    assert world.node is not None and world.node.ingress is not None
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.node.ingress.port)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await smtp.sendmail("app@sender.test", ["a@dest.test"],
                            message(1, 600, extra_headers=f"X-MTA-Campaign: {value}\r\n"))
    await smtp.quit()
    assert err.value.code == 550 and "X-MTA-Campaign" in err.value.message


async def test_the_auth_users_tenant_wins_over_the_header(world: World,
                                                         tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('s3cret', ln=10)}:acme\n"
                     f"bob:{hash_password('s3cret', ln=10)}\n")
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start({"smtp": {"users_file": str(users), "relay_networks": [],
                                "auth_allow_insecure": True}})
    assert world.node is not None and world.node.ingress is not None
    for user, n in (("alice", 1), ("bob", 2)):
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.node.ingress.port)
        await smtp.connect()
        await smtp.login(user, "s3cret")
        await smtp.sendmail("app@sender.test", [f"{user}@dest.test"], tagged(n, "claimed"))
        await smtp.quit()
    await sink.wait_for(2)
    records = {r["recipient"]: r for r in await world.wait_records("Delivery", 2)}
    # alice's users-file tenant beats the header; bob has none, so the header decides.
    assert records["alice@dest.test"]["tenant"] == "acme"
    assert records["bob@dest.test"]["tenant"] == "claimed"
    assert all(b"X-MTA-Tenant" not in m.content for m in sink.messages)


def test_tenant_config_errors_name_the_table() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"a b": {}}, '[tenants."a b"]'),
        ({"acme": {"rat": "1/s"}}, '[tenants."acme"]: rat: unknown key'),
        ({"acme": {"weight": 0}}, "weight 1-1000"),
        ({"header": "bad header"}, "[tenants] header"),
    ]
    for raw, why in cases:
        with pytest.raises(ConfigError, match=re.escape(why)):
            config_from_dict({"tenants": raw})


@pytest.mark.parametrize(("key", "held_for"), [("tenant:bulk", "bulk"),
                                               ("campaign:spring", "bulk")])
async def test_a_suspended_tenant_or_campaign_waits_and_goes_on_resume(
        world: World, key: str, held_for: str) -> None:
    world.zone(ZONE)
    world.sink("127.0.0.2")
    node = await world.start(retry_initial="30s")
    await node.coordinator.change_runtime(suspended={key: True})
    for n in range(3):
        await world.submit([f"bulk{n}@dest.test"],
                           body=tagged(n, "bulk", "spring"))
        await world.submit([f"other{n}@dest.test"], body=tagged(10 + n, "other", "autumn"))
    await wait_until(lambda: delivered_for(world, "other") == 3, 10, "other's mail")
    assert delivered_for(world, held_for) == 0
    assert not [r for r in world.accounting() if r["type"] == "TransientFailure"]
    assert node.engine is not None
    await node.coordinator.change_runtime(suspended={key: False})
    # Retried at once on resume, not after retry_initial (30 s).
    await wait_until(lambda: delivered_for(world, held_for) == 3, 10, "the held mail")
