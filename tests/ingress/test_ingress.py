"""SMTP submission end to end: real sockets, real clients, the real spool."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import smtplib
import socket
import ssl
import time
from email import message_from_bytes
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mta.ingress.policy import in_networks, is_loopback
from mta.netaddr import ip_address
from tests.support import Raw, message, port, queued_id, stored, wait_until


async def test_ehlo_advertises_extensions(start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    assert (await c.reply()).startswith("220 ")
    ehlo = await c.cmd("EHLO client.example")
    for ext in ("PIPELINING", "SIZE 26214400", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
        assert f"250-{ext}" in ehlo or f"250 {ext}" in ehlo, ehlo
    assert "STARTTLS" not in ehlo and "AUTH" not in ehlo  # no cert, no users configured
    await c.close()


async def test_plain_submission_with_smtplib_is_stored_byte_for_byte(start_node: Any) -> None:
    node = await start_node()
    body = message(1, 5000)

    def send() -> Any:
        with smtplib.SMTP("127.0.0.1", port(node)) as s:
            s.ehlo("client.example")
            s.mail("sender@example.com")
            s.rcpt("rcpt@example.org")
            return s.data(body)

    code, reply = await asyncio.to_thread(send)
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as ")
    mid = queued_id(reply)
    msg = (await stored(node))[mid]
    assert msg.envelope.sender == "sender@example.com"
    assert msg.envelope.recipients == ["rcpt@example.org"]
    assert msg.body.startswith(b"Received: from client.example ([127.0.0.1])")
    assert f"id {mid}".encode() in msg.body.split(b"\r\n\r\n")[0]
    # Client headers carried Message-ID and Date: only the trace header is added.
    assert msg.body.endswith(body)
    assert msg.body.count(b"Message-ID:") == 1 and msg.body.count(b"\r\nDate:") == 1


async def test_missing_message_id_and_date_are_added(start_node: Any) -> None:
    node = await start_node()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node))
    await smtp.connect()
    _, reply = await smtp.sendmail("a@example.com", ["b@example.org"],
                                   b"Subject: bare\r\n\r\nhello\r\n")
    await smtp.quit()
    msg = (await stored(node))[queued_id(reply)]
    parsed = message_from_bytes(msg.body)
    assert parsed["Message-ID"].endswith("@mx.test.example>")
    assert parsed["Date"]
    assert parsed.get_payload() == "hello\r\n"


async def test_pipelined_transactions_over_one_connection(start_node: Any) -> None:
    node = await start_node()
    r, w = await asyncio.open_connection("127.0.0.1", port(node))
    await r.readline()
    w.write(b"EHLO pipe.example\r\n")
    await w.drain()
    while not (await r.readline()).startswith(b"250 "):
        pass
    # Three whole transactions written in one go, without waiting for replies.
    batch = b""
    for i in range(3):
        batch += (b"MAIL FROM:<p@example.com>\r\nRCPT TO:<x@example.org>\r\n"
                  b"RCPT TO:<y@example.net>\r\nDATA\r\n")
        batch += message(i, 300).replace(b"\r\n.", b"\r\n..") + b".\r\n"
    batch += b"QUIT\r\n"
    w.write(batch)
    await w.drain()
    replies = (await asyncio.wait_for(r.read(), 10)).decode().splitlines()
    w.close()
    assert [x[:3] for x in replies] == ["250", "250", "250", "354", "250"] * 3 + ["221"]
    assert len(await stored(node)) == 3


@pytest.mark.parametrize("last_line", [b"the end.\r\n", b"the end\r\n"])
async def test_a_body_in_many_pieces_is_stored_byte_for_byte(start_node: Any,
                                                             last_line: bytes) -> None:
    """The DATA reader reads up to each "." CRLF, so a body of lines ending in a dot comes in
    thousands of pieces, gathered and joined: every byte must come out as sent, unstuffed,
    whether the last piece is the end marker alone or carries the last line too."""
    node = await start_node()
    lines = [b"From: a@example.com\r\nMessage-ID: <dots@example.com>\r\n"
             b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nSubject: dots\r\n\r\n"]
    for i in range(3000):  # about 90 KB: more than one gathered piece (64 KiB)
        lines.append(f"line {i} ends with a dot.\r\n".encode())
        if i % 7 == 0:
            lines.append(b".a line that starts with a dot.\r\n")
        if i % 11 == 0:
            lines.append(b".\r\n")
        if i % 13 == 0:  # a stuffed dot inside a piece, not at its start
            lines.append(b"no dot at the end\r\n.but one at the start\r\n")
    content = b"".join(lines) + last_line
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    await c.cmd("MAIL FROM:<a@example.com>")
    await c.cmd("RCPT TO:<b@example.org>")
    assert (await c.cmd("DATA")).startswith("354")
    c.writer.write(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    reply = await c.reply()
    await c.close()
    msg = (await stored(node))[queued_id(reply)]
    assert msg.body.endswith(content)
    assert msg.body.startswith(b"Received: ")
    assert len(msg.body) - len(content) == msg.body.index(b"From: a@example.com")


async def test_unknown_commands_are_answered_until_the_limit_then_421(start_node: Any) -> None:
    """Ten unrecognised commands get 500 (never echoed); the eleventh ends the session with
    421 (RFC 5321 3.8) after every reply owed, even when they all came in one write."""
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    c.writer.write(b"NOOP\r\n" + b"".join(b"X%d\x00Y\r\n" % i for i in range(11)) + b"NOOP\r\n")
    await c.writer.drain()
    replies = (await asyncio.wait_for(c.reader.read(), 10)).decode().splitlines()
    await c.close()
    assert replies == (["250 2.0.0 OK"] + ["500 5.5.1 Command not recognized"] * 10
                       + ["421 4.7.0 Too many unrecognized commands, closing connection"])


async def test_a_command_argument_that_is_not_utf8(start_node: Any) -> None:
    """MAIL and RCPT refuse an address that is not UTF-8 (RFC 6531) as bad syntax; a sloppy
    HELO name is tolerated, its bytes replaced, never echoed raw."""
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    assert await c.cmd(b"HELO h\xffst.example") == "250 mx.test.example"
    assert await c.cmd(b"MAIL FROM:<a\xff@example.com>") == "501 5.1.3 Bad address syntax"
    assert await c.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert await c.cmd(b"RCPT TO:<b\xc3@example.org>") == "501 5.1.3 Bad address syntax"
    await c.close()


async def test_8bitmime_and_smtputf8(start_node: Any) -> None:
    node = await start_node()
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node))
    await smtp.connect()
    await smtp.ehlo()
    body = "Subject: café\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nnaïve ☃\r\n"
    _, r1 = await smtp.sendmail("a@example.com", ["b@example.org"], body.encode(),
                                mail_options=["BODY=8BITMIME"])
    _, r2 = await smtp.sendmail("jörg@exämple.com", ["用户@例子.广告"], body.encode(),
                                mail_options=["BODY=8BITMIME", "SMTPUTF8"])
    await smtp.quit()
    msgs = await stored(node)
    m1, m2 = msgs[queued_id(r1)], msgs[queued_id(r2)]
    assert m1.envelope.body_8bit and not m1.envelope.smtputf8
    assert m2.envelope.smtputf8
    assert m2.envelope.sender == "jörg@exämple.com"
    assert m2.envelope.recipients == ["用户@例子.广告"]
    assert "Subject: café\r\nContent-Type: text/plain; charset=utf-8\r\n".encode() in m2.body
    assert m2.body.endswith("\r\n\r\nnaïve ☃\r\n".encode())


async def test_non_ascii_address_without_smtputf8_is_refused(start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    assert (await c.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    reply = await c.cmd("RCPT TO:<jörg@example.org>".encode())
    # Refused as bad syntax, naming the SMTPUTF8 the client did not ask for.
    assert reply.startswith("501 5.1.3 ") and "without SMTPUTF8" in reply, reply
    await c.close()


async def test_starttls_then_auth_plain(start_node: Any, tls_files: Any, tls_ca: Any,
                                        users_file: str) -> None:
    cert, key = tls_files
    node = await start_node(smtp={"tls_cert": cert, "tls_key": key, "users_file": users_file,
                                  "relay_networks": ["10.0.0.0/8"]})
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node), tls_context=ctx,
                           start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("starttls")
    await smtp.starttls()
    await smtp.ehlo()
    assert {"plain", "login"} <= set(smtp.server_auth_methods)
    # Not in relay_networks: relaying needs AUTH.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await smtp.sendmail("a@example.com", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
    assert refused.value.recipients[0].code == 554
    assert "5.7.1" in refused.value.recipients[0].message
    await smtp.login("alice", "s3cret")
    _, reply = await smtp.sendmail("a@example.com", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
    await smtp.quit()
    msg = (await stored(node))[queued_id(reply)]
    assert msg.envelope.auth_user == "alice"
    assert b"with ESMTPSA id" in msg.body


async def test_auth_login_and_wrong_password(start_node: Any, users_file: str) -> None:
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    c = await Raw.connect(port(node))
    await c.reply()
    ehlo = await c.cmd("EHLO c.example")
    assert "AUTH LOGIN PLAIN" in ehlo  # loopback may AUTH before STARTTLS
    assert (await c.cmd("AUTH LOGIN")).startswith("334 ")
    assert (await c.cmd(base64.b64encode(b"alice").decode())).startswith("334 ")
    assert (await c.cmd(base64.b64encode(b"wrong").decode())).startswith("535 5.7.8")
    plain = base64.b64encode(b"\0alice\0s3cret").decode()
    assert (await c.cmd(f"AUTH PLAIN {plain}")).startswith("235 2.7.0")
    assert (await c.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("250")
    await c.close()
    assert node.metrics.auth_failures._value.get() == 1


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


async def test_auth_not_offered_before_starttls_off_loopback(
        start_node: Any, tls_files: Any, users_file: str) -> None:
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    cert, key = tls_files
    node = await start_node(smtp={"listen": f"{ip}:0", "tls_cert": cert, "tls_key": key,
                                  "users_file": users_file})
    c = await Raw.connect(port(node), host=ip)
    await c.reply()
    ehlo = await c.cmd("EHLO c.example")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    plain = base64.b64encode(b"\0alice\0s3cret").decode()
    assert (await c.cmd(f"AUTH PLAIN {plain}")).startswith("538 5.7.11")
    # And an address outside relay_networks may not relay.
    await c.cmd("MAIL FROM:<a@example.com>")
    assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")
    await c.close()


async def test_size_limits(start_node: Any) -> None:
    node = await start_node(smtp={"max_message_size": 10_000})
    c = await Raw.connect(port(node))
    await c.reply()
    assert "SIZE 10000" in await c.cmd("EHLO c.example")
    assert (await c.cmd("MAIL FROM:<a@example.com> SIZE=20000")).startswith("552 5.3.4")
    assert (await c.cmd("MAIL FROM:<a@example.com> SIZE=5000")).startswith("250")
    await c.cmd("RCPT TO:<b@example.org>")
    assert (await c.cmd("DATA")).startswith("354")
    c.writer.write(message(1, 20_000) + b".\r\n")
    assert (await c.reply()).startswith("552 5.3.4")
    # The session is still usable and nothing was stored.
    assert (await c.cmd("RSET")).startswith("250")
    await c.close()
    assert await stored(node) == {}


async def test_recipient_limit_and_address_syntax(start_node: Any) -> None:
    node = await start_node(smtp={"max_recipients": 3})
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    assert (await c.cmd("MAIL FROM:<not an address>")).startswith("501 5.1.")
    assert (await c.cmd("MAIL FROM:<a@example.com>")).startswith("250 2.1.0")
    assert (await c.cmd("RCPT TO:<no-domain>")).startswith("501 5.1.3")
    assert (await c.cmd("RCPT TO:<a@@b.example>")).startswith("501 5.1.3")
    assert (await c.cmd("RCPT TO:<x@bad_domain.example>")).startswith("501 5.1.3")
    for i in range(3):
        assert (await c.cmd(f"RCPT TO:<r{i}@example.org>")).startswith("250 2.1.5")
    assert (await c.cmd("RCPT TO:<r4@example.org>")).startswith("452 4.5.3")
    await c.close()


async def test_null_sender_is_accepted(start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    assert (await c.cmd("MAIL FROM:<>")).startswith("250")
    await c.cmd("RCPT TO:<b@example.org>")
    await c.cmd("DATA")
    reply = await c.cmd(b"Subject: dsn\r\n\r\nbounce\r\n.")
    await c.close()
    assert (await stored(node))[queued_id(reply)].envelope.sender == ""


async def test_overlong_lines(start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    assert (await c.cmd("NOOP " + "x" * 2000)).startswith("500 5.5.2")
    await c.cmd("MAIL FROM:<a@example.com>")
    await c.cmd("RCPT TO:<b@example.org>")
    await c.cmd("DATA")
    reply = await c.cmd(b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n.")
    assert reply.startswith("500 5.5.2")
    await c.close()
    assert await stored(node) == {}


async def test_disconnect_mid_data_stores_nothing(start_node: Any) -> None:
    node = await start_node()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    await c.cmd("MAIL FROM:<a@example.com>")
    await c.cmd("RCPT TO:<b@example.org>")
    await c.cmd("DATA")
    c.writer.write(message(1, 4000)[:2500])
    await c.writer.drain()
    c.writer.transport.abort()
    assert node.ingress is not None
    await wait_until(lambda: not node.ingress.sessions, what="the server saw the disconnect")
    assert await stored(node) == {}
    assert node.spool.live_count() == 0


async def test_connection_limits_total_and_per_ip(start_node: Any) -> None:
    node = await start_node(smtp={"max_connections": 3, "max_connections_per_ip": 2})
    a = await Raw.connect(port(node))
    b = await Raw.connect(port(node))
    assert (await a.reply()).startswith("220") and (await b.reply()).startswith("220")
    c = await Raw.connect(port(node))
    assert (await c.reply()).startswith("421 4.7.0")
    await c.close()
    # Another client address still fits under the total limit.
    d = await Raw.connect(port(node), source="127.0.0.2") if _has_127_0_0_2() else None
    if d is not None:
        assert (await d.reply()).startswith("220")
        e = await Raw.connect(port(node), source="127.0.0.3")
        assert (await e.reply()).startswith("421 4.7.0")  # total limit of 3 reached
        await e.close()
        await d.close()
    await a.close()
    assert node.ingress is not None
    await wait_until(lambda: node.ingress.limiter.total == 1, what="a's slot freed")
    f = await Raw.connect(port(node))
    assert (await f.reply()).startswith("220")  # a freed slot is reusable
    await f.close()
    await b.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),  # an IPv4 peer on a dual-stack socket
    ("[2001:db8::1]", "2001:db8::1"),  # as a listen address or smarthost is written
    ("fe80::1%eth0", "fe80::1"),
    ("unknown", None),  # what the session calls a peer without an address
    ("mx.example", None),
])
def test_addresses_are_read_one_way(text: str, expected: str | None) -> None:
    """One reading of an address for the ingress (relay networks, loopback) and the loop
    guard (our listeners, MX addresses)."""
    addr = ip_address(text)
    assert (None if addr is None else str(addr)) == expected


def test_an_ipv4_peer_on_a_dual_stack_listener_is_the_same_client() -> None:
    assert is_loopback("::ffff:127.0.0.1")
    assert in_networks("::ffff:10.1.2.3", [ipaddress.ip_network("10.0.0.0/8")])
    assert not in_networks("::ffff:10.1.2.3", [ipaddress.ip_network("::ffff:0:0/96")])


def _has_127_0_0_2() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
            return True
        except OSError:
            return False


async def test_idle_and_data_timeouts_close_the_session(start_node: Any) -> None:
    node = await start_node(smtp={"command_timeout": 0.3, "data_timeout": 0.5})
    c = await Raw.connect(port(node))
    await c.reply()
    assert await asyncio.wait_for(c.reader.read(), 5) == b""  # idle: closed by the server
    d = await Raw.connect(port(node))
    await d.reply()
    await d.cmd("EHLO c.example")
    await d.cmd("MAIL FROM:<a@example.com>")
    await d.cmd("RCPT TO:<b@example.org>")
    await d.cmd("DATA")
    # A dripping client keeps sending body lines, each ending a read of the body, but never
    # the final dot: the DATA timeout bounds the whole phase, so the server closes while the
    # client is still sending (a timer pushed back per piece read would never fire).
    # Closed means an end of stream with nothing unread (no reply came), or a reset when the
    # server closed with our last lines still unread.
    t0 = time.monotonic()
    while not (d.reader.at_eof() or d.reader.exception()):
        assert time.monotonic() - t0 < 5, "DATA still open after 5 s of drip (timeout 0.5 s)"
        d.writer.write(b"x.\r\n")
        await asyncio.sleep(0.05)  # the drip's pace, not a wait for the server
    assert await stored(node) == {}


async def test_each_command_pushes_the_idle_deadline_back(start_node: Any) -> None:
    # The session timer moves lazily (it re-arms when it fires before the deadline): a
    # client that keeps talking is never cut, and one that stops is cut after the timeout.
    # Gaps of 0.1 s against a 1 s timeout: a loaded machine may stretch a gap, not tenfold.
    node = await start_node(smtp={"command_timeout": 1.0})
    c = await Raw.connect(port(node))
    await c.reply()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # three timeouts' worth of commands
        assert (await c.cmd("NOOP")).startswith("250")
        last = time.monotonic()
        await asyncio.sleep(0.1)
    assert await asyncio.wait_for(c.reader.read(), 10) == b""
    assert 0.9 < time.monotonic() - last < 6.0


async def test_disk_error_answers_452_and_the_node_keeps_accepting(
        start_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected ENOSPC on the append path (the real-limit variants run in test_faults)."""
    import errno

    from mta.spool import segment

    node = await start_node()
    real_write = segment.os.write
    failing = {"on": True}

    def write(fd: int, data: Any) -> int:
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(segment.os, "write", write)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node))
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await smtp.sendmail("a@example.com", ["b@example.org"], message(1))
    assert err.value.code == 452 and "4.3.1" in err.value.message
    failing["on"] = False
    _, reply = await smtp.sendmail("a@example.com", ["b@example.org"], message(2))
    await smtp.quit()
    assert list(await stored(node)) == [queued_id(reply)]


async def test_session_init_matches_aiosmtpd(start_node: Any, users_file: str) -> None:
    """IngressSession replaces SMTP.__init__ for speed: it must set what aiosmtpd sets."""
    from aiosmtpd.smtp import SMTP

    from mta.ingress.session import IngressSession

    node = await start_node(smtp={"users_file": users_file})
    srv = node.ingress
    ours = srv._make_session()
    theirs = IngressSession.__new__(IngressSession)
    SMTP.__init__(theirs, srv._handler, data_size_limit=srv.cfg.max_message_size,
                  enable_SMTPUTF8=True, decode_data=False, hostname=srv.cfg.hostname,
                  ident="mta ESMTP", tls_context=None, timeout=srv.cfg.command_timeout,
                  auth_require_tls=True, loop=asyncio.get_running_loop())
    mine = set(vars(ours)) - {"_server", "_client_ip", "_admitted", "in_data", "relay_allowed",
                              "_pending_login", "_out", "command_size_limits", "_deadline", "_gone"}
    assert mine == set(vars(theirs))
    def func(value: Any) -> Any:  # a bound method, or aiosmtpd's (method, is_builtin) pair
        if hasattr(value, "is_builtin"):
            return (func(value.method), value.is_builtin)
        return getattr(value, "__func__", value)

    for name in ("_auth_methods", "_handle_hooks", "_smtp_methods"):
        assert set(getattr(ours, name)) == set(getattr(theirs, name)), name
        for key, value in getattr(ours, name).items():
            assert func(value) == func(getattr(theirs, name)[key]), (name, key)
    for name in ("data_size_limit", "enable_SMTPUTF8", "_decode_data", "hostname",
                 "_timeout_duration", "_auth_require_tls", "_auth_required",
                 "_enforce_call_limit", "_ehlo_hook_ver", "__ident__", "require_starttls"):
        assert getattr(ours, name) == getattr(theirs, name), name


async def test_standalone_claims_a_spool_holding_a_larger_token(start_node: Any,
                                                               tmp_path: Path) -> None:
    # A clock set back, or a spool last owned by a cluster whose token base was raised: the
    # recorded token is above wall-clock nanoseconds, and the node must still claim the shard.
    import json

    future = time.time_ns() + 10**18
    shard = tmp_path / "spool0" / "shard-002"
    shard.mkdir(parents=True)
    (shard / "shard.owner").write_text(json.dumps({"node": "elsewhere", "token": future}))
    node = await start_node()
    assert 2 in node.spool.owned
    assert json.loads((shard / "shard.owner").read_text())["token"] > future
    _, reply = await aiosmtplib.send(message(1), sender="a@example.com",
                                     recipients=["b@example.org"], hostname="127.0.0.1",
                                     port=port(node))
    assert reply.startswith("2.0.0 Ok: queued")
