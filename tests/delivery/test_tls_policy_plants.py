"""MTA-STS and DANE cases the main suites leave open, each one a mistake that would otherwise
go unseen: limits at their exact edge, the cache written at stop and kept over a failed
refetch, the failed-fetch backoff and the background refresh, redirects and odd statuses,
shielded fetches, the AD bit of address answers, the DO bit, DANE under "verify" and
MTA-STS enforce, testing mode's counting and logging. Real parts: the loopback DNS server,
an HTTPS policy server, receiving servers with trustme certificates."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.asyncresolver
import dns.flags
import dns.message
import dns.rdatatype
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from structlog.testing import capture_logs

from harness.dns import DNSServer
from harness.poll import wait_until
from mta.delivery import mtasts, stspolicies
from mta.delivery.dane import DaneError, Tlsa, authenticate
from mta.delivery.mtasts import MAX_AGE_LIMIT, StsPolicy, parse_policy
from mta.delivery.stspolicies import MAX_POLICY_BYTES, StsPolicies, StsSettings, StsStore
from tests.support.certs import server_context
from tests.support.tlspolicy import POLICY, PolicyServer, issued, sts_count
from tests.support.tlspolicy import STS_DOMAIN as DOMAIN
from tests.support.tlspolicy import sts_zone as zone
from tests.support.world import World

ENFORCE = POLICY.format(mode="enforce", mx="mx.dest.test")
TESTING = POLICY.format(mode="testing", mx="mx.dest.test")


class MovingPolicyServer(PolicyServer):
    """A policy server that also serves a valid policy at ``/moved`` (where a redirect may
    point), and can hold its answers until ``gate`` is set."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__(ctx)
        self.gate = asyncio.Event()
        self.gate.set()
        self.moved_body = ENFORCE

    async def _policy(self, request: web.Request) -> web.Response:
        self.requests += 1
        await self.gate.wait()
        r = self.reply
        if "location" in r:
            raise web.HTTPFound(r["location"])
        return web.Response(status=r["status"], body=r["body"].encode(),
                            content_type=r["type"])

    async def _moved(self, request: web.Request) -> web.Response:
        return web.Response(body=self.moved_body.encode(), content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        app.router.add_get("/moved", self._moved)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()


@pytest.fixture
async def policy_server(ca: tuple[trustme.CA, str]) -> Any:
    server = MovingPolicyServer(server_context(ca[0], f"mta-sts.{DOMAIN}"))
    await server.start()
    yield server
    await server.stop()


async def start(world: World, ca_file: str, server: PolicyServer, **delivery: Any) -> None:
    await world.start(tls_ca_file=ca_file, mta_sts_port=server.port, **delivery)


async def outcome_for(world: World, rcpt: str) -> dict[str, Any]:
    """The first Delivery or TransientFailure record of ``rcpt``."""
    def found() -> dict[str, Any] | None:
        for r in world.accounting():
            if r["type"] in ("Delivery", "TransientFailure") and r["recipient"] == rcpt:
                return r
        return None

    return await wait_until(found, 10, f"an outcome for {rcpt}")


def flush_dns(world: World) -> None:
    assert world.node is not None and world.node.engine is not None
    world.node.engine.router.resolver.cache.flush()


def sts_of(world: World) -> StsPolicies:
    assert world.node is not None and world.node.engine is not None
    return world.node.engine.dispatcher.sts


def enforced(record: dict[str, Any]) -> bool:
    return record["type"] == "TransientFailure" and "MTA-STS" in record["response"]


# --- policy limits -----------------------------------------------------------------------

def test_a_max_age_of_exactly_a_year_is_accepted() -> None:
    assert MAX_AGE_LIMIT == 31_557_600
    text = ENFORCE.replace("86400", "31557600")
    assert parse_policy(text).max_age == 31_557_600


def test_expired_policies_in_the_cache_file_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    old = StsPolicy("enforce", ("mx.dest.test",), 60, "1", time.time() - 3600)
    fresh = StsPolicy("enforce", ("mx.dest.test",), 86400, "1", time.time())
    path.write_text(json.dumps({"old.test": old.to_json(), "fresh.test": fresh.to_json()}))
    assert StsStore(str(path)).load() == {"fresh.test": fresh}


# --- fetching ----------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "kept"), [(MAX_POLICY_BYTES, True),
                                            (MAX_POLICY_BYTES + 1, False)])
async def test_a_policy_of_at_most_64_kib_counts_and_a_byte_more_is_refused_whole(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer,
        size: int, kept: bool) -> None:
    authority, ca_file = ca
    # Padding in an unknown key at the end: cutting it short would still parse.
    pad = "x-pad: "
    body = ENFORCE + pad + "x" * (size - len(ENFORCE) - len(pad) - 1) + "\n"
    assert len(body.encode()) == size
    policy_server.reply["body"] = body
    world.zone(zone())
    world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    record = await outcome_for(world, f"a@{DOMAIN}")
    assert enforced(record) == kept, record


@pytest.mark.parametrize("reply", [{"location": "/moved"}, {"status": 201}],
                         ids=["redirect-to-a-valid-policy", "status-201"])
async def test_only_a_direct_200_answer_is_a_policy(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer,
        reply: dict[str, Any]) -> None:
    # RFC 8461 3.3: HTTP 200, redirects not followed; the place redirected to serves a
    # valid enforce policy, which must not be taken.
    authority, ca_file = ca
    policy_server.reply.update(reply)
    world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    record = await outcome_for(world, f"a@{DOMAIN}")
    assert record["type"] == "Delivery", record
    assert len(sink.messages) == 1
    assert world.node is not None
    assert world.node.metrics.mta_sts_fetches.labels("failed")._value.get() == 1


async def test_a_failed_fetch_is_not_retried_for_every_message(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer) -> None:
    authority, ca_file = ca
    policy_server.reply["status"] = 404
    world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.dest.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    await world.submit([f"b@{DOMAIN}"], n=1)
    await sink.wait_for(2)
    assert policy_server.requests == 1


async def test_a_failed_fetch_is_retried_once_its_backoff_is_over(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stspolicies, "_FETCH_RETRY", 0.0)  # over at once
    authority, ca_file = ca
    policy_server.reply["status"] = 404
    world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    policy_server.reply["status"] = 200  # the server is fixed: the same id is fetched again
    await world.submit([f"b@{DOMAIN}"], n=1)
    record = await outcome_for(world, f"b@{DOMAIN}")
    assert enforced(record), record
    assert policy_server.requests == 2
    assert len(sink.messages) == 1


async def test_a_failed_refetch_for_a_new_id_keeps_the_cached_policy(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer) -> None:
    # RFC 8461 5.1: a new id whose policy cannot be fetched leaves the cached one in force.
    authority, ca_file = ca
    dns_server = world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.other.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    assert enforced(await outcome_for(world, f"a@{DOMAIN}"))
    policy_server.reply["status"] = 404
    dns_server.zone[f"_mta-sts.{DOMAIN}"] = {"TXT": ['"v=STSv1; id=2"']}
    flush_dns(world)
    await world.submit([f"b@{DOMAIN}"], n=1)
    record = await outcome_for(world, f"b@{DOMAIN}")
    assert enforced(record), record
    assert policy_server.requests == 2
    assert not sink.messages


async def test_a_policy_in_use_is_refreshed_in_the_background(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stspolicies, "_REFRESH_AFTER", 0.0)  # every use refreshes
    authority, ca_file = ca
    world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.dest.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    policy_server.reply["body"] = TESTING  # same id, new content: seen by the refresh
    await world.submit([f"b@{DOMAIN}"], n=1)
    await sink.wait_for(2)

    def refreshed() -> bool:
        cached = sts_of(world).cached(DOMAIN)
        return cached is not None and cached.mode == "testing"

    await wait_until(refreshed, 10, "the cached policy refreshed")
    assert policy_server.requests >= 2


async def test_a_delivery_giving_up_does_not_cancel_the_fetch(
        ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer,
        tmp_path: Path) -> None:
    _, ca_file = ca
    server = DNSServer(zone())
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    async def addresses(name: str) -> list[str]:
        return ["127.0.0.1"]

    sts = StsPolicies(StsStore(str(tmp_path / "cache.json")),
                      StsSettings(policy_server.port, 5.0, ca_file), lambda: resolver, addresses)
    await sts.open()
    try:
        policy_server.gate.clear()
        first = asyncio.create_task(sts.policy(DOMAIN))
        await wait_until(lambda: policy_server.requests == 1, 10, "the fetch under way")
        first.cancel()  # the delivery that asked gives up (its own timeout, a shutdown...)
        with contextlib.suppress(asyncio.CancelledError):
            await first
        policy_server.gate.set()
        # The fetch goes on for the others who need the policy, and its result is kept.
        await wait_until(lambda: sts.cached(DOMAIN) is not None, 5,
                         "the fetch the cancelled delivery had started to finish")
        policy = await sts.policy(DOMAIN)
        assert policy is not None and policy.mode == "enforce"
        assert policy_server.requests == 1
    finally:
        await sts.close()
        server.close()


async def test_a_cached_policy_that_has_expired_is_no_longer_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Loaded while valid; its max_age then runs out with the TXT record gone: no policy
    # (RFC 8461 5.1 keeps a cached policy only until it expires).
    cache = tmp_path / "cache.json"
    policy = StsPolicy("enforce", ("mx.dest.test",), 86400, "1", time.time())
    cache.write_text(json.dumps({DOMAIN: policy.to_json()}))
    server = DNSServer(zone(txt_id=None))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    async def addresses(name: str) -> list[str]:
        return []

    sts = StsPolicies(StsStore(str(cache)), StsSettings(), lambda: resolver, addresses)
    await sts.open()
    try:
        assert await sts.policy(DOMAIN) == policy  # in force while valid, TXT or not
        later = time.time() + 2 * 86400
        monkeypatch.setattr(mtasts, "time", SimpleNamespace(time=lambda: later))
        assert await sts.policy(DOMAIN) is None
        assert sts.cached(DOMAIN) is None
    finally:
        await sts.close()
        server.close()


async def test_what_changed_since_the_last_save_is_written_at_stop(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stspolicies, "_SAVE_EVERY", 3600.0)  # after one save, none till stop
    authority, ca_file = ca
    dns_server = world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "mx.dest.test"))
    cache = tmp_path / "sts-cache.json"
    await start(world, ca_file, policy_server, mta_sts_cache=str(cache))
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    await wait_until(lambda: cache.exists() and DOMAIN in json.loads(cache.read_text()), 10,
                     "the first save")
    policy_server.reply["body"] = TESTING
    dns_server.zone[f"_mta-sts.{DOMAIN}"] = {"TXT": ['"v=STSv1; id=2"']}
    flush_dns(world)
    await world.submit([f"b@{DOMAIN}"], n=1)
    await sink.wait_for(2)
    cached = sts_of(world).cached(DOMAIN)
    assert cached is not None and cached.id == "2"
    assert world.node is not None
    await world.node.stop()
    world.node = None
    saved = json.loads(cache.read_text())
    assert saved[DOMAIN]["id"] == "2" and saved[DOMAIN]["mode"] == "testing", saved


# --- enforce and testing -----------------------------------------------------------------

async def test_enforce_with_no_named_mx_is_counted(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer) -> None:
    authority, ca_file = ca
    world.zone(zone(mx=("mx.rogue.test",)))
    world.sink("127.0.0.3", tls_context=server_context(authority, "mx.rogue.test"))
    await start(world, ca_file, policy_server)
    await world.submit([f"a@{DOMAIN}"])
    record = await outcome_for(world, f"a@{DOMAIN}")
    assert "4.7.5 No MX host" in record["response"], record
    assert sts_count(world, "enforce", "failed") >= 1


async def test_testing_mode_sends_to_an_mx_the_policy_does_not_name_and_logs_it(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer) -> None:
    authority, ca_file = ca
    policy_server.reply["body"] = TESTING
    world.zone(zone(mx=("mx.rogue.test",)))
    rogue = world.sink("127.0.0.3", tls_context=server_context(authority, "mx.rogue.test"))
    await start(world, ca_file, policy_server)
    with capture_logs() as logs:
        await world.submit([f"a@{DOMAIN}"])
        await rogue.wait_for(1)
        record = await outcome_for(world, f"a@{DOMAIN}")
    assert record["type"] == "Delivery" and record["tls"].endswith(" verified"), record
    assert sts_count(world, "testing", "failed") == 1
    assert sts_count(world, "testing", "ok") == 0
    [event] = [e for e in logs if e["event"] == "delivery.mta_sts_testing_failure"]
    assert "not in the policy" in event["problem"], event


async def test_a_smarthost_never_looks_up_mta_sts(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer) -> None:
    authority, ca_file = ca
    dns_server = world.zone(zone())
    sink = world.sink("127.0.0.2", tls_context=server_context(authority, "relay.other.test"))
    await start(world, ca_file, policy_server, smarthost=f"127.0.0.2:{world.port}")
    await world.submit([f"a@{DOMAIN}"])
    await sink.wait_for(1)
    assert (f"_mta-sts.{DOMAIN}", "TXT") not in dns_server.queries
    assert policy_server.requests == 0


# --- DANE --------------------------------------------------------------------------------

def _spki_sha256(ctx_cert: trustme.LeafCert) -> tuple[list[bytes], bytes]:
    ders = [x509.load_pem_x509_certificate(p.bytes()).public_bytes(Encoding.DER)
            for p in ctx_cert.cert_chain_pems]
    spki = x509.load_der_x509_certificate(ders[0]).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return ders, hashlib.sha256(spki).digest()


def test_a_dane_ta_record_naming_the_leaf_anchors_nothing() -> None:
    ders, leaf = _spki_sha256(trustme.CA().create_child_ca().issue_cert("mx.dest.test"))
    with pytest.raises(DaneError):
        authenticate(ders, (Tlsa(2, 1, 1, leaf),), "mx.dest.test")


def dane_zone(world: World, tlsa: list[str]) -> dict[str, Any]:
    return {"sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.5"]},
            "dane.test": {"MX": [(10, "mx.dest.test")], "SECURE": True},
            "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True},
            f"_{world.port}._tcp.mx.dest.test": {"TLSA": tlsa, "SECURE": True}}


class PartlySecureDNS(DNSServer):
    """Leaves the AD bit off the answers of the (name, type) pairs in ``insecure``, set on
    the other answers of a "SECURE" name (an A RRset that did not validate beside an
    AAAA "no data" that did)."""

    def __init__(self, zone: dict[str, Any], insecure: set[tuple[str, str]]) -> None:
        self.insecure = insecure
        super().__init__(zone)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = super()._answer(query)
        q = query.question[0]
        if (q.name.to_text(omit_final_dot=True).lower(),
                dns.rdatatype.to_text(q.rdtype)) in self.insecure:
            resp.flags &= ~dns.flags.AD
        return resp


@pytest.mark.parametrize("insecure", ["A", "AAAA"])
async def test_an_unvalidated_address_answer_means_no_dane(world: World, insecure: str) -> None:
    # RFC 7672 2.2.2: TLSA records are looked up only for hosts whose address answers
    # (every one of them, with data or without) validated.
    ctx, _, _ = issued(trustme.CA(), "mx.dest.test")
    world.dns = PartlySecureDNS(dane_zone(world, [f"3 1 1 {bytes(32).hex()}"]),
                                {("mx.dest.test", insecure)})
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit(["a@dane.test"])
    record = await outcome_for(world, "a@dane.test")
    assert record["type"] == "Delivery" and record["tls"].endswith(" unverified"), record
    assert len(sink.messages) == 1
    assert not any(t == "TLSA" for _, t in world.dns.queries)


class FlagRecordingDNS(DNSServer):
    """Records whether each query asked for DNSSEC records (the DO bit)."""

    def __init__(self, zone: dict[str, Any]) -> None:
        self.dnssec_ok: list[tuple[str, bool]] = []
        super().__init__(zone)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        self.dnssec_ok.append((dns.rdatatype.to_text(query.question[0].rdtype),
                               bool(query.ednsflags & dns.flags.DO)))
        return super()._answer(query)


async def test_dane_asks_the_resolver_for_dnssec_and_authenticates_by_tlsa(
        world: World) -> None:
    ctx, leaf, _ = issued(trustme.CA(), "mx.dest.test")
    server = FlagRecordingDNS(dane_zone(world, [f"3 1 1 {leaf.hex()}"]))
    world.dns = server
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit(["a@dane.test"])
    record = await outcome_for(world, "a@dane.test")
    assert record["type"] == "Delivery" and record["tls"].endswith(" dane-ee"), record
    asked = {t for t, do in server.dnssec_ok}
    assert {"MX", "A", "TLSA"} <= asked
    assert all(do for _, do in server.dnssec_ok), server.dnssec_ok
    # TLSA decides: no PKIX attempt first (which fails here, and would cost a connection).
    assert sink.sessions == 1


async def test_dane_authenticates_mail_that_requires_a_verified_certificate(
        world: World) -> None:
    ctx, leaf, _ = issued(trustme.CA(), "mx.dest.test")  # from a CA nobody trusts
    world.dns = DNSServer(dane_zone(world, [f"3 1 1 {leaf.hex()}"]))
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True, domains={"dane.test": {"tls": "verify"}})
    await world.submit(["a@dane.test"])
    record = await outcome_for(world, "a@dane.test")
    assert record["type"] == "Delivery" and record["tls"].endswith(" dane-ee"), record
    assert len(sink.messages) == 1


async def test_a_site_set_to_tls_disabled_is_left_as_set_despite_tlsa(world: World) -> None:
    _, leaf, _ = issued(trustme.CA(), "mx.dest.test")
    world.dns = DNSServer(dane_zone(world, [f"3 1 1 {leaf.hex()}"]))
    sink = world.sink("127.0.0.2")  # no STARTTLS
    await world.start(dane=True, sites={"mx.dest.test": {"tls": "disabled"}})
    await world.submit(["a@dane.test"])
    record = await outcome_for(world, "a@dane.test")
    assert record["type"] == "Delivery", record
    assert len(sink.messages) == 1 and not sink.messages[0].tls


async def test_mta_sts_enforce_keeps_dane_on_the_mx_hosts_it_names(
        world: World, ca: tuple[trustme.CA, str], policy_server: MovingPolicyServer) -> None:
    # The policy leaves out the preferred MX; the one left is authenticated by its TLSA
    # record (its certificate is from a CA outside the trust store), which enforce accepts.
    authority, ca_file = ca
    ctx, leaf, _ = issued(trustme.CA(), "mx.dest.test")
    world.dns = DNSServer({
        "sender.test": {"MX": [(10, "mx.sender.test")]}, "mx.sender.test": {"A": ["127.0.0.5"]},
        DOMAIN: {"MX": [(10, "mx.rogue.test"), (20, "mx.dest.test")], "SECURE": True},
        "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True},
        "mx.rogue.test": {"A": ["127.0.0.3"], "SECURE": True},
        f"_{world.port}._tcp.mx.dest.test": {"TLSA": [f"3 1 1 {leaf.hex()}"], "SECURE": True},
        f"_mta-sts.{DOMAIN}": {"TXT": ['"v=STSv1; id=1;"']},
        f"mta-sts.{DOMAIN}": {"A": ["127.0.0.1"]}})
    rogue = world.sink("127.0.0.3", tls_context=server_context(authority, "mx.rogue.test"))
    good = world.sink("127.0.0.2", tls_context=ctx)
    await start(world, ca_file, policy_server, dane=True)
    await world.submit([f"a@{DOMAIN}"])
    record = await outcome_for(world, f"a@{DOMAIN}")
    assert record["type"] == "Delivery" and record["tls"].endswith(" dane-ee"), record
    assert len(good.messages) == 1 and not rogue.messages
    assert sts_count(world, "enforce", "ok") == 1
