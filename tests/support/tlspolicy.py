"""MTA-STS and DANE test parts: an HTTPS policy server on loopback, the zone of an MTA-STS
domain, certificates with their TLSA digests, the node's MTA-STS counters."""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness.net import free_port_on
from tests.support.world import World

__all__ = ["POLICY", "STS_DOMAIN", "PolicyServer", "issued", "sts_count", "sts_zone"]

STS_DOMAIN = "sts.test"
POLICY = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"


class PolicyServer:
    """``https://mta-sts.<domain>/.well-known/mta-sts.txt`` on 127.0.0.1, answering what the
    test sets in ``reply`` (status, content type, body, a redirect), or what ``handler`` (a
    raw aiohttp handler: it may stream, stall, compress) answers; counts requests."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.port = free_port_on("127.0.0.1")
        self.reply: dict[str, Any] = {"status": 200, "type": "text/plain",
                                      "body": POLICY.format(mode="enforce", mx="mx.dest.test")}
        self.handler: Any = None
        self.requests = 0
        self._runner: web.AppRunner | None = None

    async def _policy(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.handler is not None:
            return await self.handler(request)  # type: ignore[no-any-return]
        r = self.reply
        if "location" in r:
            raise web.HTTPFound(r["location"])
        return web.Response(status=r["status"], body=r["body"].encode(),
                            content_type=r["type"])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def sts_zone(txt_id: str | None = "1", mx: tuple[str, ...] = ("mx.dest.test",)) -> dict[str, Any]:
    z: dict[str, Any] = {
        STS_DOMAIN: {"MX": [(10 * (i + 1), h) for i, h in enumerate(mx)]},
        "mx.dest.test": {"A": ["127.0.0.2"]}, "mx.rogue.test": {"A": ["127.0.0.3"]},
        f"mta-sts.{STS_DOMAIN}": {"A": ["127.0.0.1"]}}
    if txt_id is not None:
        z[f"_mta-sts.{STS_DOMAIN}"] = {"TXT": [f'"v=STSv1; id={txt_id};"', '"v=spf1 -all"']}
    return z


def sts_count(world: World, mode: str, result: str) -> float:
    assert world.node is not None
    return world.node.metrics.outbound_mta_sts.labels(mode, result)._value.get()


def issued(ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, bytes, bytes]:
    """A server context for ``names`` and the leaf's and its issuer's SPKI digests
    (SHA-256), as TLSA ``3 1 1`` / ``2 1 1`` data."""
    cert = ca.issue_cert(*names)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    digests = []
    for pem in cert.cert_chain_pems[:2] if len(cert.cert_chain_pems) > 1 else \
            [cert.cert_chain_pems[0], ca.cert_pem]:
        spki = x509.load_pem_x509_certificate(pem.bytes()).public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        digests.append(hashlib.sha256(spki).digest())
    return ctx, digests[0], digests[1]
