"""MTA-STS (RFC 8461) end to end: a real DNS server on loopback serves ``_mta-sts`` TXT
records, a real HTTPS server (aiohttp, a certificate from a test CA) serves the policy, real
receiving servers present good or wrong certificates. Enforce refuses what it must (never
clear text, never an MX host the policy does not name, never an unverified certificate),
testing delivers and counts, the cache survives a restart and outlives the TXT record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trustme

from harness.poll import wait_until
from tests.support.certs import server_context
from tests.support.tlspolicy import POLICY, PolicyServer, sts_count, sts_zone
from tests.support.world import World

DOMAIN = "sts.test"

@pytest.fixture
async def policy_server(ca: tuple[trustme.CA, str]) -> Any:
    server = PolicyServer(server_context(ca[0], f"mta-sts.{DOMAIN}"))
    await server.start()
    yield server
    await server.stop()


async def start(world: World, ca_file: str, server: PolicyServer, **delivery: Any) -> None:
    await world.start(tls_ca_file=ca_file, mta_sts_port=server.port, **delivery)


async def test_enforce_delivers_over_a_verified_certificate_to_a_named_mx(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer) -> None:
    authority, ca_file = ca
    world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.dest.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    [got] = await sink.wait_for(1)
    assert got.tls
    [record] = await world.wait_records("Delivery", 1)
    assert record["tls"].endswith(" verified"), record
    assert sts_count(world, "enforce", "ok") == 1
    assert world.node is not None
    assert world.node.metrics.mta_sts_fetches.labels("fetched")._value.get() == 1


@pytest.mark.parametrize(("names", "why"), [
    (("mx.other.test",), "Hostname mismatch"),
    (None, "does not offer STARTTLS"),
])
async def test_enforce_defers_rather_than_send_unverified_or_in_clear(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer,
        names: tuple[str, ...] | None, why: str) -> None:
    authority, ca_file = ca
    world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, *names)
                      if names else None)
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "4.7.5" in fail["response"] and why in fail["response"], fail
    assert "MTA-STS" in fail["response"], fail
    assert not sink.messages
    assert sts_count(world, "enforce", "failed") >= 1


async def test_enforce_skips_mx_hosts_the_policy_does_not_name(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer) -> None:
    authority, ca_file = ca
    # The preferred MX is not in the policy (an attacker's, say): mail goes to the other.
    world.zone(sts_zone(mx=("mx.rogue.test", "mx.dest.test")))
    ctx = server_context(authority, "mx.dest.test", "mx.rogue.test")
    rogue = world.sink("127.0.0.3", tls_context=ctx)
    good = world.sink("127.0.0.2", tls_context=ctx)
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await good.wait_for(1)
    assert not rogue.messages


async def test_enforce_with_no_named_mx_defers(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer) -> None:
    authority, ca_file = ca
    world.zone(sts_zone(mx=("mx.rogue.test",)))
    rogue = world.sink("127.0.0.3", tls_context=server_context(authority, "mx.rogue.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "4.7.5 No MX host" in fail["response"] and "mx.dest.test" in fail["response"]
    assert not rogue.messages


async def test_testing_mode_delivers_and_counts_what_enforce_would_refuse(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer) -> None:
    authority, ca_file = ca
    policy_server.reply["body"] = POLICY.format(mode="testing", mx="mx.dest.test")
    world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    [record] = await world.wait_records("Delivery", 1)
    assert record["tls"].endswith(" unverified"), record
    assert sts_count(world, "testing", "failed") == 1
    assert sts_count(world, "testing", "ok") == 0


@pytest.mark.parametrize("reply", [
    {"status": 404},
    {"type": "text/html"},
    {"location": "https://elsewhere.test/policy"},
    {"body": "version: STSv1\nmode: enforce\n"},
    {"body": "x" * (65 * 1024)},
], ids=["404", "html", "redirect", "invalid", "too-large"])
async def test_a_policy_that_cannot_be_fetched_is_no_policy(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer,
        reply: dict[str, Any]) -> None:
    # RFC 8461 5.1: no valid policy and none cached -> delivered as without MTA-STS.
    authority, ca_file = ca
    policy_server.reply.update(reply)
    world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    assert world.node is not None
    assert world.node.metrics.mta_sts_fetches.labels("failed")._value.get() == 1
    assert policy_server.requests == 1


async def test_a_policy_server_with_an_untrusted_certificate_is_no_policy(
        world: World, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    server = PolicyServer(server_context(trustme.CA(), f"mta-sts.{DOMAIN}"))
    await server.start()
    try:
        world.zone(sts_zone())
        sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
        await start(world, ca_file, server)
        await world.submit([f"a@{DOMAIN}"])
        await sink.wait_for(1)
        assert world.node is not None
        assert world.node.metrics.mta_sts_fetches.labels("failed")._value.get() == 1
        assert server.requests == 0  # the handshake failed: nothing was asked
    finally:
        await server.stop()


async def test_the_cached_policy_survives_a_restart_and_outlives_its_txt_record(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer,
        tmp_path: Path) -> None:
    authority, ca_file = ca
    dns = world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.dest.test"))
    cache = tmp_path / "sts-cache.json"  # the same node's file across the restart
    await start(world, ca_file, policy_server, mta_sts_cache=str(cache))
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    assert world.node is not None
    await world.node.stop()
    world.node = None
    saved = json.loads(cache.read_text())
    assert saved[DOMAIN]["mode"] == "enforce" and saved[DOMAIN]["id"] == "1"
    # An attacker strips the TXT record, takes the policy server down and presents a
    # certificate for another name: the restarted node still enforces what it had learnt.
    del dns.zone[f"_mta-sts.{DOMAIN}"]
    await policy_server.stop()
    sink.stop()
    impostor = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server, mta_sts_cache=str(cache))
    await world.submit([f"b@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1, timeout=30)
    assert fail["recipient"] == f"b@{DOMAIN}" and "MTA-STS" in fail["response"], fail
    assert not impostor.messages


async def test_a_new_txt_id_fetches_the_policy_again(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer) -> None:
    authority, ca_file = ca
    policy_server.reply["body"] = POLICY.format(mode="testing", mx="mx.dest.test")
    dns = world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    # Same id: the cached policy is used, not fetched again.
    await world.submit([f"b@{DOMAIN}"], n=1)
    await sink.wait_for(2)
    assert policy_server.requests == 1
    # The domain publishes enforce under a new id: fetched, and enforced.
    policy_server.reply["body"] = POLICY.format(mode="enforce", mx="mx.dest.test")
    dns.zone[f"_mta-sts.{DOMAIN}"] = {"TXT": ['"v=STSv1; id=2"']}
    assert world.node is not None and world.node.engine is not None
    world.node.engine.router.resolver.cache.flush()  # as if the TXT record's TTL ran out
    await world.submit([f"c@{DOMAIN}"], n=2)
    [fail] = await world.wait_records("TransientFailure", 1)
    assert fail["recipient"] == f"c@{DOMAIN}" and "MTA-STS" in fail["response"], fail
    assert policy_server.requests == 2
    assert len(sink.messages) == 2


async def test_mta_sts_off_and_smarthosts_never_look_it_up(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer) -> None:
    authority, ca_file = ca
    dns = world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server, mta_sts=False)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    assert (f"_mta-sts.{DOMAIN}", "TXT") not in dns.queries
    assert policy_server.requests == 0


async def test_a_damaged_cache_file_is_an_empty_cache(
        world: World, ca: tuple[trustme.CA, str], policy_server: PolicyServer,
        tmp_path: Path) -> None:
    authority, ca_file = ca
    cache = tmp_path / "sts-cache.json"
    cache.write_text('{"sts.test": {"mode": "enforce"')
    world.zone(sts_zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.dest.test"))
    await start(world, ca_file, policy_server, mta_sts_cache=str(cache))
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    def saved() -> bool:
        try:  # the damaged text stays until the first save replaces it
            return DOMAIN in json.loads(cache.read_text())
        except ValueError:
            return False
    await wait_until(saved, 10, "the cache file rewritten with the fetched policy")
