"""Outbound TLS policy (issue 17): ``tls = "verify"`` delivers only over a certificate that
chains to the configured CA and names the MX host, defers otherwise (never clear text, never
an impostor), while opportunistic mail to the same host still goes; the accounting record
shows the connection's TLS. Real receiving servers on loopback with certificates from a test
CA (trustme): a good one, one for another name, an expired one."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trustme

from harness.sink import Sink
from tests.support.certs import server_context
from tests.support.world import World


async def start(world: World, ca_file: str, ctx: ssl.SSLContext, **delivery: Any) -> Sink:
    world.zone({"strict.test": {"MX": [(10, "mx.dest.test")]},
                "loose.test": {"MX": [(10, "mx.dest.test")]},
                "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(tls_ca_file=ca_file, domains={"strict.test": {"tls": "verify"}},
                      **delivery)
    return sink


async def test_a_certificate_that_verifies_carries_verify_mail(
        world: World, ca: tuple[trustme.CA, str]) -> None:
    authority, ca_file = ca
    sink = await start(world, ca_file, server_context(authority, "mx.dest.test"))
    await world.submit(["a@strict.test"])
    [got] = await sink.wait_for(1)
    assert got.tls
    [record] = await world.wait_records("Delivery", 1)
    assert record["tls"].startswith("TLSv1.") and record["tls"].endswith(" verified"), record
    assert world.node is not None
    assert world.node.metrics.outbound_tls.labels("verified")._value.get() >= 1


@pytest.mark.parametrize(("names", "expired", "why"), [
    (("mx.other.test",), False, "Hostname mismatch"),
    (("mx.dest.test",), True, "expired"),
])
async def test_a_certificate_that_does_not_verify_defers_verify_mail_only(
        world: World, ca: tuple[trustme.CA, str], names: tuple[str, ...], expired: bool,
        why: str) -> None:
    authority, ca_file = ca
    sink = await start(world, ca_file, server_context(authority, *names, expired=expired))
    await world.submit(["a@strict.test"])
    await world.submit(["b@loose.test"], n=1)
    # The opportunistic domain's mail goes, over TLS, recorded as unverified.
    [got] = await sink.wait_for(1)
    assert got.tls and b"X-Test-Id: 1" in got.content
    [delivered] = await world.wait_records("Delivery", 1)
    assert delivered["recipient"] == "b@loose.test"
    assert delivered["tls"].endswith(" unverified"), delivered
    # The strict one is deferred, saying why, and never sent.
    [fail] = await world.wait_records("TransientFailure", 1)
    assert fail["recipient"] == "a@strict.test" and "4.7.5" in fail["response"], fail
    assert why in fail["response"], fail
    assert all(b"X-Test-Id: 0" not in m.content for m in sink.messages)
    assert world.node is not None
    assert world.node.metrics.outbound_tls_policy_failures.labels("verify")._value.get() >= 1


async def test_a_site_policy_of_verify_applies_to_every_domain_it_serves(
        world: World, ca: tuple[trustme.CA, str]) -> None:
    _, ca_file = ca
    other = trustme.CA()  # the sink's certificate is from a CA we do not trust
    sink = await start(world, ca_file, server_context(other, "mx.dest.test"),
                       sites={"mx.dest.test": {"tls": "verify"}})
    await world.submit(["b@loose.test"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "4.7.5" in fail["response"] and "unable to get local issuer" in fail["response"]
    assert not sink.messages


async def test_clear_text_is_refused_when_tls_is_required(world: World,
                                                          ca: tuple[trustme.CA, str]) -> None:
    _, ca_file = ca
    world.zone({"strict.test": {"MX": [(10, "mx.dest.test")]},
                "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")  # no STARTTLS at all
    await world.start(tls_ca_file=ca_file, domains={"strict.test": {"tls": "verify"}})
    await world.submit(["a@strict.test"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "does not offer STARTTLS" in fail["response"]
    assert not sink.messages
