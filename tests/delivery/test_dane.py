"""DANE for SMTP (RFC 7672) end to end: a real DNS server on loopback serves MX, A and TLSA
answers, with the AD bit a validating resolver sets on DNSSEC-validated data, and real
receiving servers present certificates from test CAs. TLSA records decide who the server is
(no PKIX trust needed), a mismatch is a temporary failure and never a delivery, answers
without AD are ignored, a failed TLSA lookup takes the host out."""

from __future__ import annotations

from typing import Any

import pytest
import trustme

from tests.support.tlspolicy import issued
from tests.support.world import World

DOMAIN = "dane.test"


def dane_zone(world: World, tlsa: list[str] | str | None, secure: bool = True,
              mx_secure: bool = True, more: dict[str, Any] | None = None) -> None:
    name = f"_{world.port}._tcp.mx.dest.test"
    z: dict[str, Any] = {DOMAIN: {"MX": [(10, "mx.dest.test")], "SECURE": mx_secure},
                         "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True}}
    if isinstance(tlsa, str):
        z[name] = tlsa
    elif tlsa is not None:
        z[name] = {"TLSA": tlsa, "SECURE": secure}
    world.zone({**z, **(more or {})})


@pytest.mark.parametrize("name", ["mx.dest.test", "someone.else.test"])
async def test_a_dane_ee_match_delivers_without_any_pkix_trust(world: World, name: str) -> None:
    # The certificate is from a CA nobody trusts, and may even name another host: the
    # TLSA record is what authenticates it (RFC 7672 3.1.1).
    ctx, leaf, _ = issued(trustme.CA(), name)
    dane_zone(world, [f"3 1 1 {leaf.hex()}"])
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    [got] = await sink.wait_for(1)
    assert got.tls
    [record] = await world.wait_records("Delivery", 1)
    assert record["tls"].endswith(" dane-ee"), record
    assert world.node is not None
    assert world.node.metrics.outbound_tls.labels("dane-ee")._value.get() >= 1


async def test_a_dane_ta_match_checks_the_chain_and_the_name(world: World) -> None:
    inter = trustme.CA().create_child_ca()
    ctx, _, issuer = issued(inter, "mx.dest.test")
    dane_zone(world, [f"2 1 1 {issuer.hex()}"])
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    [record] = await world.wait_records("Delivery", 1)
    assert record["tls"].endswith(" dane-ta"), record


@pytest.mark.parametrize("case", ["other-key", "ta-wrong-name"])
async def test_a_certificate_the_tlsa_records_do_not_match_is_never_sent_to(
        world: World, case: str) -> None:
    if case == "other-key":
        ctx, _, _ = issued(trustme.CA(), "mx.dest.test")
        _, other, _ = issued(trustme.CA(), "mx.dest.test")
        records, why = [f"3 1 1 {other.hex()}"], "no TLSA record"
    else:
        ctx, _, issuer = issued(trustme.CA().create_child_ca(), "mx.wrong.test")
        records, why = [f"2 1 1 {issuer.hex()}"], "DANE-TA"
    dane_zone(world, records)
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "4.7.5 DANE" in fail["response"] and why in fail["response"], fail
    assert not sink.messages
    assert world.node is not None
    assert world.node.metrics.outbound_tls_policy_failures.labels("dane")._value.get() >= 1


async def test_a_host_with_tlsa_that_offers_no_starttls_gets_nothing(world: World) -> None:
    _, leaf, _ = issued(trustme.CA(), "mx.dest.test")
    dane_zone(world, [f"3 1 1 {leaf.hex()}"])
    sink = world.sink("127.0.0.2")  # no STARTTLS
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "does not offer STARTTLS" in fail["response"], fail
    assert not sink.messages


@pytest.mark.parametrize(("secure", "mx_secure"), [(False, True), (True, False)],
                         ids=["tlsa-not-validated", "mx-not-validated"])
async def test_answers_without_the_ad_bit_are_ignored(world: World, secure: bool,
                                                      mx_secure: bool) -> None:
    ctx, _, _ = issued(trustme.CA(), "mx.dest.test")
    dane_zone(world, [f"3 1 1 {bytes(32).hex()}"], secure=secure, mx_secure=mx_secure)
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    [record] = await world.wait_records("Delivery", 1)
    assert record["tls"].endswith(" unverified"), record
    assert world.dns is not None
    tlsa_asked = any(t == "TLSA" for _, t in world.dns.queries)
    assert tlsa_asked == mx_secure  # an unvalidated MX answer is not even followed


async def test_a_failed_tlsa_lookup_takes_the_host_out(world: World) -> None:
    ctx, _, _ = issued(trustme.CA(), "mx.dest.test")
    # mx.dest.test's TLSA lookup fails (SERVFAIL): the second MX takes the mail.
    dane_zone(world, "SERVFAIL", more={
        DOMAIN: {"MX": [(10, "mx.dest.test"), (20, "mx.two.test")], "SECURE": True},
        "mx.two.test": {"A": ["127.0.0.3"], "SECURE": True}})
    first = world.sink("127.0.0.2", tls_context=ctx)
    second = world.sink("127.0.0.3", tls_context=ctx)
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    await second.wait_for(1)
    assert not first.messages


async def test_a_failed_tlsa_lookup_on_every_host_defers(world: World) -> None:
    ctx, _, _ = issued(trustme.CA(), "mx.dest.test")
    dane_zone(world, "SERVFAIL")
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "4.7.5 DANE: TLSA lookup failed" in fail["response"], fail
    assert not sink.messages


async def test_unusable_tlsa_records_still_make_tls_mandatory(world: World) -> None:
    # Only PKIX-EE (usage 1), which SMTP clients do not use: TLS, not authenticated.
    dane_zone(world, [f"1 1 1 {bytes(32).hex()}"])
    sink = world.sink("127.0.0.2")  # no STARTTLS
    await world.start(dane=True)
    await world.submit([f"a@{DOMAIN}"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "does not offer STARTTLS" in fail["response"], fail
    assert not sink.messages


async def test_dane_off_asks_for_no_tlsa(world: World) -> None:
    ctx, _, _ = issued(trustme.CA(), "mx.dest.test")
    dane_zone(world, [f"3 1 1 {bytes(32).hex()}"])
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start()
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    assert world.dns is not None
    assert not any(t == "TLSA" for _, t in world.dns.queries)
