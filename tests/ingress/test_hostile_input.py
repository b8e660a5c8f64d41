"""Hostile input crossing a boundary (issue 13): addresses with control characters at both
doors, envelope and HELO text in headers, remote replies forging DSN fields, admin API
bodies, address literals, and what the suspend verb takes for a domain."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mta.bounce.dsn import FailedRecipient, build_dsn
from mta.config import DomainPolicy
from mta.delivery.errors import PermanentError
from mta.delivery.routes import Router, policy_for
from mta.envelope import Envelope, domain_key
from mta.ingress.headers import received_header
from mta.ingress.policy import address_problem
from mta.node import Node
from mta.spool.index import recipient_domains
from tests.support import (
    Raw,
    Sink,
    SinkScript,
    ctl,
    free_port,
    make_config,
    message,
    port,
    read_accounting,
    stored,
    wait_until,
)

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")  # tab is folding whitespace
_SENDER = "app@sender.test"

# The quoted ones reached a remote server (or our own headers) before the fix; the rest are
# the other places a control character can sit.
HOSTILE_ADDRESSES = [
    '"x\r<victim@other.test>"@dest.test',  # aiosmtplib re-parsed it to <victim@other.test>
    '"x\rX-Injected: yes"@dest.test',  # a header line inside our own Received:
    '"x\r\nBcc: hidden@evil.test"@dest.test',
    '"poison\x01 x"@dest.test',  # aiosmtplib then refused it and the whole job retried
    '"nul\x00x"@dest.test',
    '"del\x7fx"@dest.test',
    '"tab\tx"@dest.test',  # HTAB is not qtextSMTP either
    '"vt\x0bx"@dest.test',
    "plain\x01x@dest.test",
    "plain\x7fx@dest.test",
    "user@dest\x01.test",
]
# C1 controls are non-ASCII: they need SMTPUTF8 to get past the ASCII check at all.
HOSTILE_UTF8_ADDRESSES = ['"c1\x85x"@dest.test', "c1\x9bx@dest.test", "jörg\x85@dest.test"]
# On the SMTP wire an LF ends the command line, whatever comes before it.
ONE_LINE = [a for a in HOSTILE_ADDRESSES if "\n" not in a]


def _admin_url(node: Node) -> str:
    assert node.admin is not None
    return f"http://127.0.0.1:{node.admin.port}"


async def _post(node: Node, path: str, body: bytes | dict[str, Any]
                ) -> tuple[int, str, Any]:
    """(status, content type, decoded JSON or the raw text) of one admin API POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": "Bearer t0ken", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, http.post(
            _admin_url(node) + path, data=data, headers=headers,
            timeout=aiohttp.ClientTimeout(total=30)) as resp:
        text = await resp.text()
        try:
            decoded: Any = json.loads(text)
        except ValueError:
            decoded = text
        return resp.status, resp.content_type, decoded


def _assert_json_error(status: int, ctype: str, body: Any, expected: int) -> None:
    assert status == expected, (status, body)
    assert ctype == "application/json", (ctype, body)
    assert isinstance(body, dict) and set(body) == {"error", "hint"}, body
    assert not _CONTROL.search(body["error"]), body  # error texts end up on terminals


@pytest.fixture
async def remote() -> AsyncIterator[Sink]:
    """A fresh scripted remote server per test, on 127.0.0.1."""
    sink = Sink("127.0.0.1", 0, SinkScript())
    sink.start()
    yield sink
    sink.stop()


def _delivery(sink: Sink, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "smarthost": f"127.0.0.1:{sink.port}", "retry_initial": "200ms",
            "retry_max": "1s", "connect_timeout": "2s", "command_timeout": "5s",
            "idle_timeout": "1s", **extra}


def _accounting(tmp_path: Path) -> list[dict[str, Any]]:
    return read_accounting(tmp_path / "accounting.jsonl")


def _dsns(sink: Sink) -> list[email.message.EmailMessage]:
    out = []
    for rec in sink.messages:
        if rec.sender != "<>":
            continue
        msg = email.message_from_bytes(rec.content, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        out.append(msg)
    return out


def _status_blocks(dsn: email.message.EmailMessage) -> list[Any]:
    part = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


# --- item 1: one address rule for both doors ---------------------------------------------


@pytest.mark.parametrize("address", [*HOSTILE_ADDRESSES, *HOSTILE_UTF8_ADDRESSES])
def test_the_address_rule_refuses_control_characters_anywhere(address: str) -> None:
    assert address_problem(address, smtputf8=True) is not None
    assert address_problem(address, smtputf8=False) is not None


@pytest.mark.parametrize(("address", "ok"), [
    ('"a b"@dest.test', True),
    ('"a\\"b"@dest.test', True),  # quoted-pair
    ('"a\\\\b"@dest.test', True),
    ('"user@victim.example"@dest.test', True),  # RFC 5321 allows it; relay policy decides
    ('""@dest.test', True),  # odd, but RFC 5321's grammar allows it
    ('"a"b"@dest.test', False),  # a bare DQUOTE inside
    ('"ab\\"@dest.test', False),  # the closing quote is escaped: unterminated
    ('"a"."b"@dest.test', False),  # RFC 5322 obs-local-part, not RFC 5321
    ('"jörg"@dest.test', None),  # non-ASCII: needs SMTPUTF8
    ('"' + "a" * 63 + '"@dest.test', False),  # 65 octets with its quotes
])
def test_quoted_local_parts_follow_rfc5321(address: str, ok: bool | None) -> None:
    if ok is None:
        assert address_problem(address, smtputf8=False) is not None
        assert address_problem(address, smtputf8=True) is None
        return
    assert (address_problem(address, smtputf8=False) is None) is ok, address
    assert (address_problem(address, smtputf8=True) is None) is ok, address


@pytest.mark.parametrize(("address", "problem"), [
    ("u@[192.0.2.1]", None),
    ("u@[IPv6:2001:db8::1]", None),
    ("u@[ipv6:2001:db8::1]", None),  # the tag is case-insensitive
    ("u@[IPv6:fe80::1%eth0]", "bad address literal"),  # a zone id means nothing elsewhere
    ("u@[192.0.2.1%eth0]", "bad address literal"),
    ("u@[2001:db8::1]", "bad address literal"),  # IPv6 needs its tag (RFC 5321 4.1.3)
    ("u@[192.0.2.300]", "bad address literal"),
    ("u@[]", "bad address literal"),
])
def test_address_literals_follow_rfc5321(address: str, problem: str | None) -> None:
    assert address_problem(address, smtputf8=False) == problem


async def test_control_characters_in_addresses_are_refused_at_the_smtp_door(
        start_node: Any) -> None:
    node = await start_node()  # loopback is a relay network: the door is the only check
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO client.example")
    for addr in ['"x\r<ceo@bank.test>"@attacker.test', *ONE_LINE]:
        reply = await c.cmd(f"MAIL FROM:<{addr}>".encode())
        assert reply.startswith("501 5.1.3"), (addr, reply)
        assert not _CONTROL.search(reply), reply
    for addr in HOSTILE_UTF8_ADDRESSES:
        reply = await c.cmd(f"MAIL FROM:<{addr}> SMTPUTF8".encode())
        assert reply.startswith("501 5.1.3"), (addr, reply)
    assert (await c.cmd("MAIL FROM:<app@sender.test> SMTPUTF8")).startswith("250")
    for addr in [*ONE_LINE, *HOSTILE_UTF8_ADDRESSES]:
        reply = await c.cmd(f"RCPT TO:<{addr}>".encode())
        assert reply.startswith("501 5.1.3"), (addr, reply)
        assert not _CONTROL.search(reply), reply
    # Valid quoted local parts still pass, and only they are stored.
    assert (await c.cmd('RCPT TO:<"a b"@dest.test>')).startswith("250")
    assert (await c.cmd('RCPT TO:<"a\\"b"@dest.test>')).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(message(1, 500) + b".")).startswith("250")
    await c.close()
    [msg] = (await stored(node)).values()
    assert msg.envelope.recipients == ['"a b"@dest.test', '"a\\"b"@dest.test']


async def test_control_characters_in_addresses_are_refused_over_http(start_node: Any) -> None:
    node = await start_node()
    content = "Subject: x\r\n\r\nhello\r\n"
    for addr in ['"x\r\nBcc: hidden@evil.test\r\nX-Injected: 1"@dest.test',
                 *HOSTILE_ADDRESSES, *HOSTILE_UTF8_ADDRESSES]:
        status, ctype, body = await _post(node, "/api/v1/messages",
                                          {"from": _SENDER, "to": [addr], "content": content})
        _assert_json_error(status, ctype, body, 400)
        status, ctype, body = await _post(node, "/api/v1/messages",
                                          {"from": addr, "to": ["r@dest.test"],
                                           "content": content})
        _assert_json_error(status, ctype, body, 400)
    # JSON can carry a lone surrogate, which no address or message can hold.
    for addr, text in (("a\ud800b@dest.test", content), ("r@dest.test", "Subject: \udfff\r\n")):
        status, ctype, body = await _post(node, "/api/v1/messages",
                                          {"from": _SENDER, "to": [addr], "content": text})
        _assert_json_error(status, ctype, body, 400)
    assert await stored(node) == {}
    status, _, body = await _post(node, "/api/v1/messages",
                                  {"from": _SENDER, "to": ['"a b"@dest.test'],
                                   "content": content})
    assert status == 202, body


async def test_helo_and_envelope_text_never_reach_a_header_raw(start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    assert (await c.cmd(b"EHLO evil\x0bname\x1b[31m\x00x\ry")).startswith("250")
    assert (await c.cmd("MAIL FROM:<app@sender.test>")).startswith("250")
    assert (await c.cmd("RCPT TO:<r@dest.test>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(message(1, 500) + b".")).startswith("250")
    await c.close()
    [msg] = (await stored(node)).values()
    head = msg.body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
    received = head.split("\r\nFrom:", 1)[0]
    assert received.startswith("Received: from evil")
    assert not _CONTROL.search(received.replace("\r\n\t", " ")), received
    # Defence in depth: even an address that got past a door stays inside its clause.
    line = received_header(helo="h\x00\x85", ip="127.0.0.1", hostname="mx.test.example",
                           protocol="ESMTP", message_id="ID",
                           recipient='"x\r\nX-Injected: yes"@dest.test').decode()
    parsed = email.message_from_string(line + "\r\n", policy=email.policy.default)
    assert list(parsed.keys()) == ["Received"], line
    assert not _CONTROL.search(line.rstrip("\r\n").replace("\r\n\t", " ")), line


async def test_a_recipient_the_delivery_library_refuses_fails_alone(
        start_node: Any, remote: Sink, tmp_path: Path) -> None:
    node = await start_node(delivery=_delivery(remote))
    # Written straight to the spool, as a door that let these through would have.
    bad = ['"poison\x01 x"@dest.test', '"x\r<victim@other.test>"@dest.test']
    env = Envelope(sender=_SENDER, recipients=[bad[0], "ok@dest.test", bad[1]])
    await node.spool.submit(env, message(1, 800))
    await remote.wait_for(2)  # the good recipient's copy and the DSN to the sender
    [delivered] = [m for m in remote.messages if m.sender != "<>"]
    assert delivered.recipients == ["ok@dest.test"]
    assert all("victim" not in r for m in remote.messages for r in m.recipients)
    await wait_until(lambda: node.spool.live_count() == 0, what="message and DSN done")
    recs = _accounting(tmp_path)
    bounces = {r["recipient"]: r for r in recs if r["type"] == "Bounce"}
    assert set(bounces) == set(bad)
    assert all(r["response"].startswith("553 5.1.3") for r in bounces.values())
    assert not [r for r in recs if r["type"] == "TransientFailure"]
    [dsn] = _dsns(remote)
    finals = [b["Final-Recipient"] for b in _status_blocks(dsn) if "Final-Recipient" in b]
    assert len(finals) == 2 and all(not _CONTROL.search(f) for f in finals), finals
    assert [b["Status"] for b in _status_blocks(dsn) if "Status" in b] == ["5.1.3"] * 2


# --- item 2: remote replies cannot forge DSN fields --------------------------------------


async def test_a_multiline_remote_reply_cannot_forge_dsn_fields(
        start_node: Any, remote: Sink) -> None:
    long_words = " ".join(f"word{i}" for i in range(60))
    remote.script.rcpt = {
        "gone@dest.test": "550-5.1.1 first line\r\n"
                          "550 Final-Recipient: rfc822; forged@evil.example",
        "long@dest.test": f"550-5.1.1 {long_words}\r\n550-\x1b[2J\x07bell\r\n"
                          "550 X-Forged: yes",
    }
    node = await start_node(delivery=_delivery(remote))
    await node.spool.submit(Envelope(sender=_SENDER, recipients=["gone@dest.test",
                                                                 "long@dest.test"]),
                            message(1, 800))
    await remote.wait_for(1)
    [dsn] = _dsns(remote)
    blocks = _status_blocks(dsn)
    finals = [v for b in blocks for v in b.get_all("Final-Recipient", [])]
    assert finals == ["rfc822; gone@dest.test", "rfc822; long@dest.test"], finals
    assert all("X-Forged" not in b for b in blocks)
    diags = [str(b["Diagnostic-Code"]) for b in blocks if "Diagnostic-Code" in b]
    assert len(diags) == 2
    assert diags[0].startswith("smtp; 550 5.1.1 first line")
    assert "Final-Recipient: rfc822; forged@evil.example" in diags[0]  # folded into one field
    assert "word59" in diags[1] and "X-Forged: yes" in diags[1]
    assert not any(_CONTROL.search(d) for d in diags), diags
    raw = remote.messages[0].content.decode("utf-8")
    assert all(len(line) <= 998 for line in raw.split("\r\n"))
    report = raw.split("Content-Type: message/delivery-status", 1)[1].split("\r\n--=_mta")[0]
    assert all(len(line) <= 78 for line in report.split("\r\n")), report
    assert sum(line.startswith(" ") for line in report.split("\r\n")) >= 5, report  # folded
    human = next(p for p in dsn.walk() if p.get_content_type() == "text/plain").get_content()
    assert not _CONTROL.search(human.replace("\r\n", " ")), human
    assert "\nFinal-Recipient" not in human.replace("\r\n", "\n"), human
    status = [b["Status"] for b in blocks if "Status" in b]
    assert status == ["5.1.1", "5.1.1"]


def test_the_dsn_escapes_and_folds_whatever_it_is_given() -> None:
    # Defence in depth: a reply kept by an older version (multi-line, raw) and addresses
    # that never passed a door still make one field each.
    raw = build_dsn(
        reporting_mta="mx.example", postmaster="MAILER-DAEMON@mx.example",
        original_sender='"s\r\nBcc: x@evil.test"@sender.test', original_headers=b"Subject: x\r\n",
        arrival=1795000000.0, expired=False, message_id="01TESTID",
        recipients=[FailedRecipient('"r\r\nFinal-Recipient: rfc822; f@evil.test"@dest.test',
                                    "550 5.1.1 a\nFinal-Recipient: rfc822; forged@evil.test",
                                    "mx\r\nX-Forged: 1"),
                    FailedRecipient("b@dest.test", "550 5.7.1 " + "x" * 3000)])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert list(msg.keys()).count("Bcc") == 0 and "Bcc" not in msg
    blocks = _status_blocks(msg)
    finals = [v for b in blocks for v in b.get_all("Final-Recipient", [])]
    assert finals == ['utf-8; "r\\x{0D}\\x{0A}Final-Recipient: rfc822; f@evil.test"@dest.test',
                      "rfc822; b@dest.test"], finals
    assert all("X-Forged" not in b for b in blocks)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")


# --- item 3: admin API bodies ------------------------------------------------------------


async def test_an_oversized_http_body_gets_the_json_413(start_node: Any) -> None:
    node = await start_node(smtp={"max_message_size": "10K"})
    for size in (20_000, 3 * 1024 * 1024):  # over max_message_size; over any body limit
        content = "Subject: big\r\n\r\n" + "x" * size
        status, ctype, body = await _post(node, "/api/v1/messages",
                                          {"from": _SENDER, "to": ["r@dest.test"],
                                           "content": content})
        _assert_json_error(status, ctype, body, 413)
    status, _, body = await _post(node, "/api/v1/messages",
                                  {"from": _SENDER, "to": ["r@dest.test"],
                                   "content": "Subject: small\r\n\r\nhi\r\n"})
    assert status == 202, body


async def test_deeply_nested_json_gets_a_json_400(start_node: Any) -> None:
    node = await start_node()
    deep = b'{"from": "a@b.test", "to": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    for path in ("/api/v1/messages", "/api/v1/suspend", "/api/v1/flush", "/api/v1/throttles"):
        status, ctype, body = await _post(node, path, deep)
        _assert_json_error(status, ctype, body, 400)


# --- item 4: address literals ------------------------------------------------------------


async def test_an_address_literal_is_delivered_to_that_address(
        start_node: Any, remote: Sink, tmp_path: Path) -> None:
    # No smarthost and no DNS: the literal alone says where to go, on the MX port.
    node = await start_node(delivery={**_delivery(remote), "smarthost": "",
                                      "mx_port": remote.port})
    await node.spool.submit(Envelope(sender=_SENDER, recipients=["rcpt@[127.0.0.1]"]),
                            message(1, 800))
    [got] = await remote.wait_for(1)
    assert got.recipients == ["rcpt@[127.0.0.1]"]
    await wait_until(lambda: any(r["type"] == "Delivery" for r in _accounting(tmp_path)),
                     what="Delivery record")


async def test_ipv6_literals_route_and_the_smarthost_still_wins(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "spool", delivery={"mx_port": 2526, "nameservers": [
        "127.0.0.1:9"]})
    router = Router(cfg.delivery, timeout=1.0)
    route = await router.route("[IPv6:::1]")
    assert route.hosts == (("::1", 2526, "::1"),)
    route = await router.route("[127.0.0.50]")
    assert route.hosts == (("127.0.0.50", 2526, "127.0.0.50"),)
    with pytest.raises(PermanentError, match=r"5\.1\.2"):
        await router.route("[300.1.2.3]")
    smart = make_config(tmp_path / "spool", delivery={"smarthost": "127.0.0.9:2600"})
    route = await Router(smart.delivery).route("[127.0.0.50]")
    assert route.hosts == (("127.0.0.9", 2600, "127.0.0.9"),)


# --- item 5: suspend / resume take a domain ----------------------------------------------


async def test_suspend_and_resume_refuse_what_is_not_a_domain(start_node: Any) -> None:
    node = await start_node()
    for verb in ("suspend", "resume"):
        # ``*.example.net`` is a wildcard suspension now; a ``*`` anywhere else is not.
        for bad in ("\r\nx", "x\x00.test", "a.*.example.net", "*example.net", "-bad.test",
                    "a b.test", "noDot",
                    "x" * 300 + ".test", "ex\x85.test"):
            status, ctype, body = await _post(node, f"/api/v1/{verb}", {"domain": bad})
            _assert_json_error(status, ctype, body, 400)
    assert node.coordinator.runtime().suspended == set()
    status, _, body = await _post(node, "/api/v1/suspend", {"domain": "Example.ORG"})
    assert status == 200 and body == {"suspended": ["example.org"]}
    status, _, body = await _post(node, "/api/v1/suspend", {"domain": "[127.0.0.1]"})
    assert status == 200 and body == {"suspended": ["[127.0.0.1]", "example.org"]}

    res = await asyncio.to_thread(ctl, _admin_url(node), "suspend", "\r\nx")
    assert res.returncode == 1, res
    lines = res.stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("mtactl: "), res.stderr
    assert "HTTP 400" in lines[0] and "\r" not in lines[0], res.stderr
    assert node.coordinator.runtime().suspended == {"example.org", "[127.0.0.1]"}




# --- found by attacking the hardening ------------------------------------------------------

# Each of these is ``sink.test`` to IDNA and to DNS, but not to a suspension, a policy or a
# throttle keyed on ``sink.test``: the door takes a name in its own form only.
OTHER_SPELLINGS = ["fw@\uff53\uff49\uff4e\uff4b.test", "ideo@sink\u3002test",
                   "fwdot@sink\uff0etest", "zw@sink\u200b.test", "shy@si\u00adnk.test",
                   "dot@sink.test."]


@pytest.mark.parametrize("address", OTHER_SPELLINGS)
def test_a_domain_is_taken_only_in_its_own_form(address: str) -> None:
    assert address_problem(address, smtputf8=True) is not None
    assert address_problem("ok@b\u00fccher.example", smtputf8=True) is None


def test_domains_are_compared_in_one_form() -> None:
    policy = DomainPolicy(rate=1.0)
    assert domain_key("B\u00fccher.Example.") == domain_key("xn--bcher-kva.example")
    assert policy_for("xn--BCHER-kva.example", {domain_key("b\u00fccher.example"): policy}) \
        is policy
    assert recipient_domains(["a@B\u00fccher.example"])[0] == ("xn--bcher-kva.example",)


async def test_other_spellings_and_stripped_controls_are_refused_at_the_smtp_door(
        start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO client.example")
    assert (await c.cmd("MAIL FROM:<app@sender.test> SMTPUTF8")).startswith("250")
    # Controls aiosmtpd's parser would drop (the mail then went to the cleaned address).
    for rcpt in ["<x@sink.te\x1fst>", "<x@sink\x0c.test>", "<x@sink\u2029.test>",
                 "<x@[127.0.0.1\r]>", "<x@sink.test\u2028>", "<u@sink.test (c\rom)>",
                 *(f"<{a}>" for a in OTHER_SPELLINGS)]:
        reply = await c.cmd(f"RCPT TO:{rcpt}".encode())
        assert reply.startswith("501 5.1.3"), (rcpt, reply)
    await c.close()
    status, _, body = await _post(node, "/api/v1/suspend", {"domain": "sink.test."})
    assert status == 400, body


def test_a_remote_reply_cannot_set_the_dsn_status() -> None:
    raw = build_dsn(
        reporting_mta="mx.example", postmaster="MAILER-DAEMON@mx.example",
        original_sender="s@sender.test", original_headers=b"Subject: x\r\n",
        arrival=1795000000.0, expired=False, message_id="01TESTID",
        recipients=[FailedRecipient("a@dest.test", "550 Mailbox unavailable (policy 2.0.0)"),
                    FailedRecipient("b@dest.test", "550 2.0.0 OK delivered"),
                    FailedRecipient("c@dest.test", "550-5.1.1 no such user")])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert [b["Status"] for b in _status_blocks(msg)[1:]] == ["5.0.0", "5.0.0", "5.1.1"]


def test_an_escaped_helo_keeps_the_received_line_short() -> None:
    header = received_header(helo="\x01" * 255, ip="192.0.2.1", hostname="mx.example",
                             protocol="ESMTP", message_id="01TESTID", recipient=None)
    assert max(len(line) for line in header.split(b"\r\n")) <= 300
    helo = header.split(b"Received: from ")[1].split(b" ([")[0]
    assert helo.endswith(b"\\x{01}")  # never half an escape


async def test_a_route_to_the_unspecified_address_loops_back_to_myself(
        start_node: Any, tmp_path: Path) -> None:
    """Connecting to 0.0.0.0 reaches this machine: an MX or literal that names it is a loop
    even when the listener is bound to 127.0.0.1 only."""
    smtp_port = free_port()
    await start_node(smtp={"listen": f"127.0.0.1:{smtp_port}"}, delivery={
        "enabled": True, "mx_port": smtp_port, "retry_initial": "200ms", "retry_max": "1s",
        "accounting_log": str(tmp_path / "acct.jsonl")})
    c = await Raw.connect(smtp_port)
    await c.reply()
    await c.cmd("EHLO client.example")
    assert (await c.cmd("MAIL FROM:<>")).startswith("250")
    assert (await c.cmd("RCPT TO:<u@[IPv6:::ffff:0.0.0.0]>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(message(1, 500) + b".")).startswith("250")
    await c.close()

    def records() -> list[dict[str, Any]]:
        return read_accounting(tmp_path / "acct.jsonl")

    await wait_until(lambda: any(r["type"] == "Bounce" for r in records()), timeout=15,
                     what="the bounce")
    recs = records()
    assert [r["type"] for r in recs if r["type"] == "Reception"] == ["Reception"]
    [bounce] = [r for r in recs if r["type"] == "Bounce"]
    assert "5.4.6" in bounce["response"] and "loops back" in bounce["response"], bounce


def test_an_ipv6_literal_has_one_form_for_suspensions_and_policies() -> None:
    """A suspended ``[IPv6:2001:db8::1]`` is not delivered to by spelling it another way."""
    spellings = ["[IPv6:2001:db8::1]", "[IPv6:2001:DB8:0:0::1]", "[ipv6:2001:db8:0::1]",
                 "[IPv6:2001:db8::0.0.0.1]"]
    assert {domain_key(s) for s in spellings} == {"[ipv6:2001:db8::1]"}
    assert domain_key("[IPv6:not an address]") == "[ipv6:not an address]"
