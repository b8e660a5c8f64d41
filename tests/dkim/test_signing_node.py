"""DKIM signing in a running node: mail submitted over SMTP (and over HTTP) is delivered to a
real receiving server signed, and dkimpy verifies the delivered bytes with the keys the
node's own ``mtactl dkim`` says to publish, served by a DNS server on loopback."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from harness.dns import DNSServer
from harness.poll import wait_until
from tests.support.dkim import dkim_zone, signatures_verify, write_key
from tests.support.procs import alive
from tests.support.world import World

HEAD = (b"From: News <news@example.org>\r\nTo: Bob <bob@dest.test>\r\n"
        b"Subject: Offer\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n")
BODIES = {
    "dot lines": b".leading dot\r\n..two\r\n.\r\nend\r\n",
    "long lines": b"x" * 990 + b"\r\n" + b"y" * 500 + b"\r\n",
    "8-bit": "Grüße, déjà vu\r\n".encode(),
    "no final CRLF": b"last line without newline",
}


def dkim_section(tmp: Path, required: bool = False) -> dict[str, Any]:
    rsa, ed = write_key(tmp, "rsa.pem"), write_key(tmp, "ed.pem", "ed25519-sha256")
    return {"required": required, "domains": {"example.org": {
        "selector": "r1", "key": str(rsa), "algorithm": "rsa-sha256",
        "dual": {"selector": "e1", "key": str(ed), "algorithm": "ed25519-sha256"}}}}


async def start(world: World, tmp: Path, required: bool = False) -> tuple[DNSServer, Any]:
    section = dkim_section(tmp, required)
    domain = section["domains"]["example.org"]
    zone = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]},
            **dkim_zone("example.org", (Path(domain["key"]), "rsa-sha256", "r1"),
                        (Path(domain["dual"]["key"]), "ed25519-sha256", "e1"))}
    dns = world.zone(zone)
    sink = world.sink("127.0.0.2")
    await world.start(sections={"dkim": section})
    return dns, sink


async def send(world: World, body: bytes, **kw: Any) -> Any:
    assert world.node is not None and world.node.ingress is not None
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.node.ingress.port)
    await smtp.connect()
    try:
        return await smtp.sendmail("news@example.org", ["bob@dest.test"], body, **kw)
    finally:
        await smtp.quit()


async def test_delivered_mail_carries_signatures_that_verify(world: World,
                                                             tmp_path: Path) -> None:
    dns, sink = await start(world, tmp_path)
    for name, body in BODIES.items():
        options = ["BODY=8BITMIME"] if name == "8-bit" else []
        await send(world, HEAD + b"Message-ID: <" + name.replace(" ", "-").encode()
                   + b"@example.org>\r\n\r\n" + body, mail_options=options)
    # SMTPUTF8: UTF-8 in the headers and the address.
    utf8 = ("From: Jörg <jörg@example.org>\r\nTo: bob@dest.test\r\nSubject: Grüße\r\n\r\n"
            "Hallo\r\n").encode()
    await send(world, utf8, mail_options=["SMTPUTF8"])
    await wait_until(lambda: len(sink.messages) == len(BODIES) + 1, 10, "all delivered")
    for received in sink.messages:
        assert received.content.startswith(b"DKIM-Signature:"), received.content[:200]
        assert signatures_verify(received.content, dns) == [True, True], received.content
        tampered = received.content.replace(b"Subject:", b"Subject: Re:", 1)
        assert signatures_verify(tampered, dns) == [False, False]


async def test_required_signing_refuses_mail_it_cannot_sign(world: World,
                                                            tmp_path: Path) -> None:
    await start(world, tmp_path, required=True)
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await send(world, b"From: x@other.test\r\nTo: bob@dest.test\r\n\r\nhi\r\n")
    assert exc.value.code == 550 and "other.test" in exc.value.message
    assert "5.7.1" in exc.value.message
    _, reply = await send(world, HEAD + b"\r\nsigned\r\n")
    assert reply.startswith("2.0.0")


async def test_http_submissions_are_signed_too(world: World, tmp_path: Path) -> None:
    dns, sink = await start(world, tmp_path)
    node = world.node
    assert node is not None and node.admin is not None
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin.port}/api/v1/messages",
        data=json.dumps({"from": "news@example.org", "to": ["bob@dest.test"],
                         "content": (HEAD + b"\r\nover http\r\n").decode()}).encode(),
        headers={"Authorization": "Bearer t0ken", "Content-Type": "application/json"})

    def post() -> int:  # in a thread: the node runs on this event loop
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)

    assert await asyncio.to_thread(post) == 202
    await wait_until(lambda: len(sink.messages) == 1, 10, "delivered")
    assert signatures_verify(sink.messages[0].content, dns) == [True, True]


async def test_reload_keeps_the_old_key_when_the_new_one_is_unreadable(
        world: World, tmp_path: Path) -> None:
    dns, sink = await start(world, tmp_path)
    node = world.node
    assert node is not None
    (tmp_path / "rsa.pem").write_text("not a key any more")
    assert not node.reload(), "a broken key is a failed reload"
    await send(world, HEAD + b"\r\nafter a failed reload\r\n")
    await wait_until(lambda: len(sink.messages) == 1, 10, "delivered")
    assert signatures_verify(sink.messages[0].content, dns) == [True, True]
    # A new key in its place (a rotation): the reload takes it, and mail is signed with it.
    write_key(tmp_path, "rsa.pem")
    assert node.reload()
    dns.zone.update(dkim_zone("example.org", (tmp_path / "rsa.pem", "rsa-sha256", "r1")))
    await send(world, HEAD + b"\r\nafter the rotation\r\n")
    await wait_until(lambda: len(sink.messages) == 2, 10, "delivered")
    assert signatures_verify(sink.messages[1].content, dns) == [True, True]
    assert signatures_verify(sink.messages[0].content, dns) == [False, True], "old RSA key"


async def test_the_node_signs_in_its_own_processes_and_ends_them(
        world: World, tmp_path: Path) -> None:
    dns, sink = await start(world, tmp_path)
    node = world.node
    assert node is not None and node._signer is not None and node._signer._pool is not None
    first = node._signer._pool.pids
    assert first and all(alive(p) for p in first)
    # A reload builds a new signer: its processes take over, the old ones end.
    assert node.reload()
    await send(world, HEAD + b"\r\nafter a reload\r\n")
    await wait_until(lambda: len(sink.messages) == 1, 10, "delivered")
    assert signatures_verify(sink.messages[0].content, dns) == [True, True]
    await wait_until(lambda: not any(alive(p) for p in first), 30, "the old processes' end")
    assert node._signer._pool is not None
    second = node._signer._pool.pids
    assert second and not set(second) & set(first)
    await node.stop()
    assert not any(alive(p) for p in second), "a stopped node left a signing process"
