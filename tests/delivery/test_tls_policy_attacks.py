"""Outbound TLS policies (MTA-STS, DANE) attacked by a hostile destination domain, a network
attacker and a hostile DNS: real loopback DNS (with AD bits), real HTTPS policy servers, real
receiving SMTP servers with certificates made here. Each test states the property it pins."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from cryptography.x509.oid import NameOID

from harness.dns import DNSServer
from harness.net import free_port_on
from harness.poll import wait_until
from mta.delivery.dane import Tlsa
from mta.delivery.loops import LoopGuard
from mta.delivery.routes import Route, Router
from mta.delivery.stspolicies import StsPolicies, StsSettings, StsStore
from tests.support import make_config
from tests.support.certs import server_context
from tests.support.tlspolicy import PolicyServer
from tests.support.world import World

POLICY = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"

# --- helpers -----------------------------------------------------------------------------

# Slow (seconds of waiting on throttles, timeouts and retries): uvloop only, the loop a node
# picks when it is installed; what the loop changes is covered by the faster tests.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


def _spki(cert_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _pem_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _chain_context(tmp_path: Path, name: str, chain_pem: list[bytes], key_pem: bytes
                   ) -> ssl.SSLContext:
    """A server context presenting exactly ``chain_pem`` (leaf first) with ``key_pem``."""
    cert_file, key_file = tmp_path / f"{name}.chain.pem", tmp_path / f"{name}.key.pem"
    cert_file.write_bytes(b"".join(chain_pem))
    key_file.write_bytes(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets OpenSSL load the odd chain certificates
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# A self-signed CA certificate (valid to 2126) whose key is on secp160r1: OpenSSL loads it
# and sends it in a chain, cryptography's public_key() raises UnsupportedAlgorithm.
_UNSUPPORTED_CURVE_CA = (
    b"-----BEGIN CERTIFICATE-----\n"
    b"MIIBYzCCASCgAwIBAgIUad+HLEhGEuBSjYzbe1gHB7iK5/gwCgYIKoZIzj0EAwIw\n"
    b"HzEdMBsGA1UEAwwUVW5zdXBwb3J0ZWQgY3VydmUgQ0EwIBcNMjYxMjAxMDIzNTU3\n"
    b"WhgPMjEyNjExMDcwMjM1NTdaMB8xHTAbBgNVBAMMFFVuc3VwcG9ydGVkIGN1cnZl\n"
    b"IENBMD4wEAYHKoZIzj0CAQYFK4EEAAgDKgAEU6HvXg5G9VOVHeJ0UfgxEyN9OeWP\n"
    b"/jOpZbxFRfpme8bRlUBh7osce6NTMFEwHQYDVR0OBBYEFFMiVPUw3s7mshkLkDxC\n"
    b"BTcpKQtlMB8GA1UdIwQYMBaAFFMiVPUw3s7mshkLkDxCBTcpKQtlMA8GA1UdEwEB\n"
    b"/wQFMAMBAf8wCgYIKoZIzj0EAwIDMQAwLgIVAIhhci+wh4xOUAIbZxJNCX3VMryp\n"
    b"AhUA9oBtD5PJmZNm9abmOsJNp0LtBUY=\n"
    b"-----END CERTIFICATE-----\n"
)


def _hostile_ta_chain(n: int) -> tuple[list[bytes], bytes, bytes]:
    """A leaf for mx.dest.test (key k2) that names issuer "I", followed by ``n`` self-issued
    CA certificates "I" all with key k: every one of them is a DANE-TA anchor for a TLSA
    record of k, none signed the leaf. Returns the PEM chain, the leaf key PEM, k's SPKI."""
    now = datetime.datetime.now(datetime.UTC)
    k = ec.generate_private_key(ec.SECP256R1())
    k2 = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "I")])

    def make(subject: x509.Name, pub: Any, signer: Any, ca: bool) -> bytes:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                              False, False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.dest.test")]),
                                critical=False)
        return b.sign(signer, hashes.SHA256()).public_bytes(Encoding.PEM)

    leaf = make(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx")]), k2.public_key(),
                k2, False)
    chain = [leaf] + [make(issuer, k.public_key(), k, True) for _ in range(n)]
    key = k2.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    spki = k.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return chain, key, spki


class LagMeter:
    """The longest the event loop went without running a 10 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - t - 0.01)

    def __enter__(self) -> LagMeter:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def hostile_server(ca: trustme.CA, names: list[str]) -> PolicyServer:
    """The policy server of ``mta-sts.<name>`` for every name given; the test sets its
    ``handler``."""
    return PolicyServer(server_context(ca, *[f"mta-sts.{n}" for n in names]))


def _sts_zone(domains: list[str], txt_id: str = "1") -> dict[str, Any]:
    z: dict[str, Any] = {}
    for d in domains:
        z[f"_mta-sts.{d}"] = {"TXT": [f'"v=STSv1; id={txt_id}"']}
        z[f"mta-sts.{d}"] = {"A": ["127.0.0.1"]}
    return z


@pytest.fixture
async def sts_world(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Holds what a test builds (DNS server, policy server, StsPolicies) for teardown."""
    held: dict[str, Any] = {}
    yield held
    if "sts" in held:
        await held["sts"].close()
    if "server" in held:
        await held["server"].stop()
    if "dns" in held:
        held["dns"].close()


async def _policies(tmp_path: Path, held: dict[str, Any], zone: dict[str, Any], port: int,
                    ca_file: str, size: int = 1000) -> StsPolicies:
    """A real StsPolicies: lookups through a Router on the loopback DNS server, fetches over
    real HTTPS to ``port``, the cache in ``tmp_path``."""
    dns = held["dns"] = DNSServer(zone)
    cfg = make_config(tmp_path / "spool", delivery={
        "enabled": True, "nameservers": [f"127.0.0.1:{dns.port}"], "tls_ca_file": ca_file,
        "mta_sts_port": port, "mta_sts_timeout": "3s",
        "mta_sts_cache": str(tmp_path / "sts.json")})
    router = Router(cfg.delivery)
    sts = held["sts"] = StsPolicies(StsStore(str(tmp_path / "sts.json")),
                                    StsSettings(port, 3.0, ca_file), lambda: router.resolver,
                                    router.addresses, size=size)
    await sts.open()
    return sts


# --- DANE ----------------------------------------------------------------------------------


async def test_dane_is_not_bypassed_by_a_pooled_connection_opened_for_an_insecure_domain(
        world: World) -> None:
    """HIGH. dane.test (DNSSEC-signed MX) and plain.test (unsigned MX) share MX host
    mx.dest.test, so one site. The site's connection opened for plain.test (no DANE: a
    network attacker stripped STARTTLS) is pooled and then carries dane.test's mail in clear
    text: DANE is checked when a connection is opened with the site's route of the moment,
    never per transaction."""
    world.zone({
        "dane.test": {"MX": [(10, "mx.dest.test")], "SECURE": True},
        "plain.test": {"MX": [(10, "mx.dest.test")]},
        "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True},
        f"_{world.port}._tcp.mx.dest.test": {"TLSA": [f"3 1 1 {bytes(32).hex()}"],
                                             "SECURE": True}})
    mitm = world.sink("127.0.0.2")  # no STARTTLS: the attacker stripped it
    await world.start(dane=True, idle_timeout="30s")
    await world.submit(["a@plain.test"])
    await mitm.wait_for(1)
    await world.submit(["b@dane.test"], n=1)

    def outcome() -> list[dict[str, Any]]:
        return [r for r in world.accounting() if r.get("recipient") == "b@dane.test"
                and r["type"] in ("Delivery", "TransientFailure")]

    await wait_until(lambda: bool(outcome()), 10, "an outcome for b@dane.test")
    assert outcome()[0]["type"] == "TransientFailure", outcome()[0]
    assert all("b@dane.test" not in m.recipients for m in mitm.messages)


async def test_the_loop_guard_keeps_the_dane_records_of_the_mx_hosts_it_keeps() -> None:
    """HIGH. When this node is itself one of the MX hosts (a backup MX), LoopGuard cuts the
    route before it, rebuilding it as Route(site, hosts[:n], mx) and dropping ``dane``: the
    better MX hosts' TLSA records are forgotten, and mail to them goes opportunistic."""
    records = (Tlsa(3, 1, 1, bytes(32)),)

    async def no_members() -> list[Any]:
        return []

    guard = LoopGuard(("127.0.0.1", 2525), "me", no_members)
    route = Route("mx1.dest.test,mx2.dest.test",
                  (("127.0.0.2", 2525, "mx1.dest.test"), ("127.0.0.1", 2525, "mx2.dest.test")),
                  mx=True, dane=(("mx1.dest.test", records),))
    kept = await guard.outside(route)
    assert kept is not None and [h[2] for h in kept.hosts] == ["mx1.dest.test"]
    assert kept.tlsa("mx1.dest.test") == records


async def test_an_unparseable_chain_certificate_is_a_dane_failure_and_the_next_mx_is_tried(
        world: World, tmp_path: Path) -> None:
    """MEDIUM. A server (or anyone on path: nothing is verified before the TLSA check) puts
    a certificate whose key cryptography cannot load (secp160r1) in its chain. With a selector-1
    DANE-TA record, dane.authenticate() calls public_key() on it and cryptography raises
    UnsupportedAlgorithm, which is no DaneError: it escapes _connect, the worker dies with a
    traceback, the job fails "4.3.2 Delivery interrupted", the SMTP connection is not closed,
    and the next MX (with a good DANE-EE match) is never tried, on every retry."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.dest.test")
    bad_ctx = _chain_context(tmp_path, "bad", [leaf.cert_chain_pems[0].bytes(),
                                               _UNSUPPORTED_CURVE_CA],
                             leaf.private_key_pem.bytes())
    good = ca.issue_cert("mx.two.test")
    good_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    good.configure_cert(good_ctx)
    good_spki = hashlib.sha256(_spki(_pem_der(good.cert_chain_pems[0].bytes()))).digest()
    ca_spki = hashlib.sha256(_spki(_pem_der(ca.cert_pem.bytes()))).digest()
    world.zone({
        "dane.test": {"MX": [(10, "mx.dest.test"), (20, "mx.two.test")], "SECURE": True},
        "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True},
        "mx.two.test": {"A": ["127.0.0.3"], "SECURE": True},
        f"_{world.port}._tcp.mx.dest.test": {"TLSA": [f"2 1 1 {bytes(32).hex()}"],
                                             "SECURE": True},
        f"_{world.port}._tcp.mx.two.test": {"TLSA": [f"3 1 1 {good_spki.hex()}",
                                                     f"2 1 1 {ca_spki.hex()}"],
                                            "SECURE": True}})
    first = world.sink("127.0.0.2", tls_context=bad_ctx)
    second = world.sink("127.0.0.3", tls_context=good_ctx)
    await world.start(dane=True)
    await world.submit(["a@dane.test"])
    await second.wait_for(1, timeout=10)
    assert not first.messages
    interrupted = [r for r in world.accounting() if "4.3.2" in r.get("response", "")]
    assert not interrupted, interrupted


async def test_a_huge_dane_ta_chain_does_not_stall_the_event_loop(
        world: World, tmp_path: Path) -> None:
    """HIGH (DoS). A hostile destination publishes (signed) TLSA 2 1 0/1/2 for a key k and
    presents a leaf followed by ~150 self-issued CA certificates of k (about 50 KB, under
    OpenSSL's 100 KB limit). Every one is an anchor; each anchor runs cryptography's path
    builder over all the others, synchronously on the event loop: seconds of stall per
    connection attempt (per MX host, per retry), during which no other delivery, ingress or
    admin request runs."""
    chain, key, spki = _hostile_ta_chain(150)
    ctx = _chain_context(tmp_path, "huge", chain, key)
    world.zone({
        "dane.test": {"MX": [(10, "mx.dest.test")], "SECURE": True},
        "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True},
        f"_{world.port}._tcp.mx.dest.test": {"TLSA": [
            f"2 1 0 {spki.hex()}", f"2 1 1 {hashlib.sha256(spki).hexdigest()}",
            f"2 1 2 {hashlib.sha512(spki).hexdigest()}"], "SECURE": True}})
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True, retry_initial="30s", retry_max="30s")
    with LagMeter() as lag:
        await world.submit(["a@dane.test"])
        [fail] = await world.wait_records("TransientFailure", 1, timeout=60)
    assert "4.7.5 DANE" in fail["response"], fail
    assert not sink.messages
    assert lag.worst < 0.5, f"event loop stalled {lag.worst:.2f}s checking one chain"


async def test_a_dane_ta_record_for_an_intermediate_does_not_pass_a_leaf_for_another_name(
        world: World) -> None:
    """Holds. TLSA 2 1 1 matches the real intermediate; the server (an impostor holding a
    certificate from that intermediate, for another name) is refused: DANE-TA checks the
    MX host name. Same for a DANE-EE record of the intermediate (EE matches the leaf only)."""
    inter = trustme.CA().create_child_ca()
    cert = inter.issue_cert("mx.other.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    inter_spki = hashlib.sha256(_spki(_pem_der(inter.cert_pem.bytes()))).hexdigest()
    world.zone({
        "dane.test": {"MX": [(10, "mx.dest.test")], "SECURE": True},
        "mx.dest.test": {"A": ["127.0.0.2"], "SECURE": True},
        f"_{world.port}._tcp.mx.dest.test": {"TLSA": [f"2 1 1 {inter_spki}",
                                                     f"3 1 1 {inter_spki}"],
                                             "SECURE": True}})
    sink = world.sink("127.0.0.2", tls_context=ctx)
    await world.start(dane=True)
    await world.submit(["a@dane.test"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert "4.7.5 DANE" in fail["response"], fail
    assert not sink.messages


# --- MTA-STS: the policy fetch -------------------------------------------------------------


async def test_a_policy_body_that_arrives_in_two_pieces_is_read_whole(
        tmp_path: Path, ca: tuple[trustme.CA, str], sts_world: dict[str, Any]) -> None:
    """MEDIUM. fetch() reads the body with one resp.content.read(64 KiB + 1), which returns
    whatever is buffered, not up to the limit: a policy sent in two TLS records / TCP
    segments (any policy over 16 KiB, a chunked reply, a server that flushes line by line)
    is cut. Here the cut policy still parses, and names only the first MX host: mail for
    the domain's real MX is deferred "No MX host ... matches" until the policy expires."""
    authority, ca_file = ca
    server = sts_world["server"] = hostile_server(authority, ["split.test"])
    first = "version: STSv1\nmode: enforce\nmx: mx1.split.test\nmax_age: 86400\n"

    async def in_two_pieces(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.content_length = len(first) + len("mx: mx2.split.test\n")
        await resp.prepare(request)
        await resp.write(first.encode())
        await asyncio.sleep(0.3)
        await resp.write(b"mx: mx2.split.test\n")
        return resp

    server.handler = in_two_pieces
    await server.start()
    sts = await _policies(tmp_path, sts_world, _sts_zone(["split.test"]), server.port, ca_file)
    policy = await sts.fetch("split.test", "1")
    assert policy.mx == ("mx1.split.test", "mx2.split.test")


@ONE_LOOP
async def test_a_gzip_bomb_policy_is_refused_without_inflating_it(
        tmp_path: Path, ca: tuple[trustme.CA, str], sts_world: dict[str, Any]) -> None:
    """Holds. A policy server answering Content-Encoding: gzip with 1 MiB that inflates to
    1 GiB: the fetch fails (too large) quickly, and no more than the limit is inflated."""
    import gzip
    authority, ca_file = ca
    server = sts_world["server"] = hostile_server(authority, ["bomb.test"])
    bomb = gzip.compress(b"version: STSv1\nmode: enforce\nmx: mx.bomb.test\nmax_age: 1\n"
                         + b" " * (1 << 30), compresslevel=9)

    async def gzip_bomb(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Type": "text/plain",
                                                "Content-Encoding": "gzip"})

    server.handler = gzip_bomb
    await server.start()
    sts = await _policies(tmp_path, sts_world, _sts_zone(["bomb.test"]), server.port, ca_file)
    loop = asyncio.get_running_loop()
    t = loop.time()
    with LagMeter() as lag:
        assert await sts.policy("bomb.test") is None
    assert loop.time() - t < 5.0
    assert lag.worst < 0.5


@ONE_LOOP
async def test_a_slowloris_policy_server_costs_at_most_the_timeout(
        tmp_path: Path, ca: tuple[trustme.CA, str], sts_world: dict[str, Any]) -> None:
    """Holds. A server that sends headers and then a byte a second: the fetch gives up at
    mta_sts_timeout (3 s here) and the domain is not fetched again at once."""
    authority, ca_file = ca
    server = sts_world["server"] = hostile_server(authority, ["slow.test"])

    async def drip(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for _ in range(60):
            await resp.write(b"v")
            await asyncio.sleep(1)
        return resp

    server.handler = drip
    await server.start()
    sts = await _policies(tmp_path, sts_world, _sts_zone(["slow.test"]), server.port, ca_file)
    loop = asyncio.get_running_loop()
    t = loop.time()
    assert await sts.policy("slow.test") is None
    assert loop.time() - t < 6.0
    assert await sts.policy("slow.test") is None
    assert server.requests == 1


async def test_the_failed_fetch_table_stays_bounded_when_every_fetch_fails(
        tmp_path: Path, ca: tuple[trustme.CA, str], sts_world: dict[str, Any]) -> None:
    """MEDIUM (memory). ``_failed`` is pruned only in _keep(), i.e. after a *successful*
    fetch: mail to many distinct domains whose _mta-sts TXT exists (a wildcard does it) and
    whose policy fetch fails grows it without bound (size is 10 x route_cache_size)."""
    _, ca_file = ca
    domains = [f"d{i}.flood.test" for i in range(60)]
    zone = {f"_mta-sts.{d}": {"TXT": ['"v=STSv1; id=1"']} for d in domains}
    sts = await _policies(tmp_path, sts_world, zone, free_port_on("127.0.0.1"), ca_file,
                          size=10)
    for d in domains:
        assert await sts.policy(d) is None
    assert len(sts._failed) <= sts.size, len(sts._failed)


async def test_a_policy_in_use_is_not_evicted_before_ones_never_used_again(
        tmp_path: Path, ca: tuple[trustme.CA, str], sts_world: dict[str, Any]) -> None:
    """LOW. The cache is called an LRU but a hit never moves the entry (only a fetch does):
    it is FIFO by fetch time. A busy domain's enforce policy is evicted by a flood of
    one-off domains with policies, after which a network attacker who strips its TXT record
    gets its mail delivered as without MTA-STS."""
    authority, ca_file = ca
    names = ["busy.test", "one.test", "two.test"]
    server = sts_world["server"] = hostile_server(authority, names)

    async def policy(request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0].removeprefix("mta-sts.")
        return web.Response(text=POLICY.format(mode="enforce", mx=f"mx.{host}"),
                            content_type="text/plain")

    server.handler = policy
    await server.start()
    sts = await _policies(tmp_path, sts_world, _sts_zone(names), server.port, ca_file, size=2)
    assert (await sts.policy("busy.test")) is not None
    assert (await sts.policy("one.test")) is not None
    assert (await sts.policy("busy.test")) is not None  # used again: the most recent
    assert (await sts.policy("two.test")) is not None
    assert sts.cached("busy.test") is not None
    assert sts.cached("one.test") is None


# --- MTA-STS: what a DNS attacker can do to a cached policy ---------------------------------


@pytest.mark.parametrize("txt", [
    None,  # stripped
    ['"v=STSv1; id=1"', '"v=STSv1; id=2"'],  # a second record injected
    ['"v=STSv1; id=bad-id!"'],  # a broken record injected
    "SERVFAIL",
])
async def test_dns_tricks_do_not_turn_off_a_cached_enforce_policy(
        tmp_path: Path, ca: tuple[trustme.CA, str], sts_world: dict[str, Any],
        txt: Any) -> None:
    """Holds. Once an enforce policy is cached, stripping, duplicating or breaking the TXT
    record (or SERVFAIL) leaves the cached policy in force, without a fetch."""
    authority, ca_file = ca
    server = sts_world["server"] = hostile_server(authority, ["victim.test"])

    async def policy(request: web.Request) -> web.StreamResponse:
        return web.Response(text=POLICY.format(mode="enforce", mx="mx.victim.test"),
                            content_type="text/plain")

    server.handler = policy
    await server.start()
    sts = await _policies(tmp_path, sts_world, _sts_zone(["victim.test"]), server.port, ca_file)
    first = await sts.policy("victim.test")
    assert first is not None and first.mode == "enforce"
    dns = sts_world["dns"]
    key = "_mta-sts.victim.test"
    if txt is None:
        del dns.zone[key]
    elif txt == "SERVFAIL":
        dns.zone[key] = "SERVFAIL"
    else:
        dns.zone[key] = {"TXT": txt}
    for name in list(dns.zone):
        if name.startswith("mta-sts."):
            del dns.zone[name]  # and the policy host is gone too
    assert sts_world["sts"] is sts
    sts._resolver().cache.flush()
    again = await sts.policy("victim.test")
    assert again == first
    assert server.requests == 1


@pytest.mark.parametrize("spelling", ["VICTIM.TEST", "Victim.Test"])
async def test_the_cached_policy_protects_every_spelling_of_the_domain(
        world: World, ca: tuple[trustme.CA, str], spelling: str) -> None:
    """Holds. The policy learnt for victim.test applies to mail addressed to VICTIM.TEST (the
    dispatcher keys the cache with domain_key): a stripped TXT record does not make the
    other spelling a way around it. (A trailing dot is refused at ingress: 501 5.1.3.)"""
    authority, ca_file = ca
    server = hostile_server(authority, ["victim.test"])

    async def policy(request: web.Request) -> web.StreamResponse:
        return web.Response(text=POLICY.format(mode="enforce", mx="mx.victim.test"),
                            content_type="text/plain")

    server.handler = policy
    await server.start()
    try:
        dns = world.zone({"victim.test": {"MX": [(10, "mx.victim.test")]},
                          "mx.victim.test": {"A": ["127.0.0.2"]},
                          **_sts_zone(["victim.test"])})
        mitm = world.sink("127.0.0.2")  # no STARTTLS
        await world.start(tls_ca_file=ca_file, mta_sts_port=server.port)
        await world.submit(["a@victim.test"])
        await world.wait_records("TransientFailure", 1)
        del dns.zone["_mta-sts.victim.test"]
        assert world.node is not None and world.node.engine is not None
        world.node.engine.router.resolver.cache.flush()
        await world.submit([f"b@{spelling}"], n=1)
        await wait_until(lambda: any(r.get("recipient", "").startswith("b@")
                                     for r in world.accounting()), 10, "b's outcome")
        assert not mitm.messages
    finally:
        await server.stop()
