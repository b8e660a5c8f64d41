"""The live SMTP trace hub and its session hooks, with real SMTP clients on loopback."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import ssl
from typing import Any

import aiosmtplib
import pytest

from mta.ingress.trace import (
    MAX_LINE,
    REDACTED,
    TooManyTraces,
    TraceEvent,
    TraceFilter,
    TraceFilterError,
    TraceHub,
    TraceSubscription,
    printable,
    redact_command,
)
from tests.support import Raw, message, port, queued_id, wait_until

PASSWORD = "s3cret"  # users_file fixture: alice's password


def _send(smtp_port: int, source: str = "127.0.0.1") -> str:
    """One message over smtplib from ``source``; its queue id."""
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        s.mail("app@example.com")
        s.rcpt("rcpt@example.org")
        code, reply = s.data(message(1, 800))
    assert code == 250, reply
    return queued_id(reply)


async def _until(sub: TraceSubscription, kind: str, timeout: float = 10.0
                 ) -> list[TraceEvent]:
    """Events of ``sub`` up to and including the first of ``kind``."""
    out: list[TraceEvent] = []
    async with asyncio.timeout(timeout):
        while not out or out[-1].kind != kind:
            out.append(await sub.get())
    return out


def _summary(events: list[TraceEvent]) -> list[str]:
    """Kinds and command verbs, in order: connect, EHLO, MAIL, ... ."""
    out = []
    for e in events:
        if e.kind == "command":
            out.append(e.fields["line"].split(" ")[0].upper())
        elif e.kind != "reply":
            out.append(e.kind)
    return out


async def test_filtered_session_is_traced_in_order(start_node: Any) -> None:
    node = await start_node()
    hub: TraceHub = node.ingress.trace
    assert not hub.active  # nobody watching: sessions only check this
    with hub.subscribe(TraceFilter.parse(client="127.0.0.2/32")) as sub:
        assert hub.active
        other = await asyncio.to_thread(_send, port(node), "127.0.0.1")
        mid = await asyncio.to_thread(_send, port(node), "127.0.0.2")
        events = await _until(sub, "disconnect")
    assert not hub.active and not hub.subscribers
    assert _summary(events) == ["connect", "EHLO", "MAIL", "RCPT", "DATA", "data", "QUIT",
                                "disconnect"]
    assert len({e.session for e in events}) == 1
    connect = events[0].fields
    assert connect["client"] == "127.0.0.2" and connect["tls"] is False
    data = next(e for e in events if e.kind == "data").fields
    assert data["accepted"] and data["queue_id"] == mid and data["size"] == len(message(1, 800))
    replies = [e.fields["line"] for e in events if e.kind == "reply"]
    assert replies[0].startswith("220 ") and f"queued as {mid}" in replies[-2]
    assert replies[-1].startswith("221")
    # The other client's session never reached this subscriber.
    assert other not in repr(events) and sub.pending() == 0


async def test_auth_secrets_never_traced(start_node: Any, users_file: str) -> None:
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    hub: TraceHub = node.ingress.trace
    every = hub.subscribe(TraceFilter())
    alice = hub.subscribe(TraceFilter.parse(user="alice"))
    bob = hub.subscribe(TraceFilter.parse(user="bob"))
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    assert (await c.cmd("AUTH LOGIN")).startswith("334 ")
    assert (await c.cmd(base64.b64encode(b"alice").decode())).startswith("334 ")
    assert (await c.cmd(base64.b64encode(b"wrong-" + PASSWORD.encode()).decode())
            ).startswith("535")
    assert (await c.cmd(f"AUTH PLAIN {plain}")).startswith("235")
    assert (await c.cmd("QUIT")).startswith("221")
    await c.close()
    events = await _until(every, "disconnect")
    auths = [e.fields for e in events if e.kind == "auth"]
    assert auths == [{"user": "alice", "ok": False}, {"user": "alice", "ok": True}]
    commands = [e.fields["line"] for e in events if e.kind == "command"]
    assert commands == ["EHLO c.example", "AUTH LOGIN", "***", "***", "AUTH PLAIN ***", "QUIT"]
    # The user filter sees the whole session once it authenticates: its start included.
    mine = await _until(alice, "disconnect")
    assert _summary(mine)[:2] == ["connect", "EHLO"] and "auth" in _summary(mine)
    assert bob.pending() == 0
    text = repr(events) + repr(mine)
    for secret in (PASSWORD, plain, base64.b64encode(b"wrong-" + PASSWORD.encode()).decode(),
                   base64.b64encode(PASSWORD.encode()).decode()[:8]):
        assert secret not in text
    for sub in (every, alice, bob):
        sub.close()


async def test_starttls_is_traced(start_node: Any, tls_files: Any, tls_ca: Any) -> None:
    cert, key = tls_files
    node = await start_node(smtp={"tls_cert": cert, "tls_key": key})
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    with node.ingress.trace.subscribe(TraceFilter()) as sub:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node), tls_context=ctx,
                               start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.starttls()
        await smtp.ehlo()
        await smtp.quit()
        events = await _until(sub, "disconnect")
    assert _summary(events) == ["connect", "EHLO", "STARTTLS", "tls", "EHLO", "QUIT",
                                "disconnect"]
    assert next(e for e in events if e.kind == "tls").fields["version"].startswith("TLS")


async def test_hostile_lines_are_escaped_and_cut(start_node: Any) -> None:
    node = await start_node()
    with node.ingress.trace.subscribe(TraceFilter()) as sub:
        c = await Raw.connect(port(node))
        await c.reply()
        await c.cmd(b"HELP \x1b]0;owned\x07\x1b[2J\xff")
        await c.cmd(b"NOOP " + b"A" * 900)
        await c.cmd("QUIT")
        await c.close()
        events = await _until(sub, "disconnect")
    lines = [e.fields["line"] for e in events if e.kind in ("command", "reply")]
    assert all(line.isprintable() for line in lines), lines
    assert any("\\x{1B}]0;owned" in line for line in lines)
    assert max(map(len, lines)) <= MAX_LINE + 3


async def test_slow_subscriber_never_stalls_sessions_and_learns_what_it_lost(
        start_node: Any) -> None:
    node = await start_node()
    hub: TraceHub = node.ingress.trace
    with hub.subscribe(TraceFilter(), queue_size=5) as sub:
        # Nobody reads: every session still completes, its events beyond five are lost.
        for _ in range(3):
            await asyncio.wait_for(asyncio.to_thread(_send, port(node)), 10)
        assert sub.pending() == 5 and sub.dropped > 20
        async with asyncio.timeout(5):
            got = [await sub.get() for _ in range(6)]
        assert got[-1].kind == "dropped" and got[-1].fields["count"] == sub.dropped_total
        # Once it keeps up again, it gets events again (the next session's).
        await asyncio.to_thread(_send, port(node))
        assert (await _until(sub, "connect"))[-1].kind == "connect"


async def test_subscriber_limit_is_refused_clearly(start_node: Any) -> None:
    node = await start_node()
    hub: TraceHub = node.ingress.trace
    subs = [hub.subscribe(TraceFilter()) for _ in range(hub.max_subscribers)]
    with pytest.raises(TooManyTraces, match="16 traces are open"):
        hub.subscribe(TraceFilter())
    subs.pop().close()
    subs.append(hub.subscribe(TraceFilter.parse(client="::1")))
    for sub in subs:
        sub.close()
    assert not hub.active
    # An IPv6 filter never matches an IPv4 session; a session goes on untouched.
    await asyncio.to_thread(_send, port(node))
    await wait_until(lambda: not node.ingress.sessions, 5, "the session to end")


def test_filter_values_are_checked() -> None:
    assert TraceFilter.parse(client="10.1.2.3/8").describe() == {"client": "10.0.0.0/8"}
    # Sessions are matched in their IPv4 form; a filter written IPv4-mapped is too.
    assert TraceFilter.parse(client="::ffff:127.0.0.1").describe() == {
        "client": "127.0.0.1/32"}
    for bad in ({"client": ""}, {"client": "10.0.0.300"}, {"client": "example.com"},
                {"user": ""},
                {"user": "a\nb"}, {"session": "x"}, {"session": "../../etc"}):
        with pytest.raises(TraceFilterError):
            TraceFilter.parse(**bad)


@pytest.mark.parametrize(("line", "shown"), [
    ("AUTH PLAIN AGFsaWNl", f"AUTH PLAIN {REDACTED}"),
    ("AUTH PLAIN\tAGFsaWNl", f"AUTH PLAIN {REDACTED}"),  # aiosmtpd splits on any space
    ("auth plain\u00a0AGFsaWNl", f"auth plain {REDACTED}"),
    ("AUTH LOGIN\x1fYWxpY2U=", f"AUTH LOGIN {REDACTED}"),
    ("AUTH AGFsaWNlAHMzY3JldA==", f"AUTH {REDACTED}"),  # no mechanism: may be the secret
    ("AUTH LOGIN", "AUTH LOGIN"),
    ("AUTH", "AUTH"),
    # A bare token where a command should be: a password sent after a refused AUTH.
    ("YWxpY2U=", REDACTED),
    ("hunter2", REDACTED),
    ("QUIT", "QUIT"),
    ("GET / HTTP/1.1", "GET / HTTP/1.1"),
])
def test_what_may_be_a_credential_is_never_shown(line: str, shown: str) -> None:
    assert redact_command(line) == shown


def test_invisible_characters_are_escaped() -> None:
    # A right-to-left override or a zero-width space could disguise one name as another.
    assert printable("al\u200bice") == "al\\x{200B}ice"
    assert printable("x\u202etxt.exe") == "x\\x{202E}txt.exe"
    assert printable("caf\u00e9") == "caf\u00e9"


async def test_a_tab_separated_auth_response_is_not_traced(start_node: Any,
                                                           users_file: str) -> None:
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    hub: TraceHub = node.ingress.trace
    every = hub.subscribe(TraceFilter())
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    c = await Raw.connect(port(node))
    await c.reply()
    await c.cmd("EHLO c.example")
    assert (await c.cmd(f"AUTH PLAIN\t{plain}")).startswith("235")
    assert (await c.cmd("QUIT")).startswith("221")
    await c.close()
    events = await _until(every, "disconnect")
    assert plain not in repr(events) and PASSWORD not in repr(events)
    every.close()


def test_a_session_nobody_traces_builds_no_events() -> None:
    hub = TraceHub()
    sub = hub.subscribe(TraceFilter.parse(client="192.0.2.7"))
    other = hub.session("198.51.100.1")
    assert not other.wanted
    assert hub.session("192.0.2.7").wanted
    sub.close()
    users = hub.subscribe(TraceFilter.parse(user="alice"))
    assert other.wanted, "it may yet authenticate as alice"
    other.authenticated("bob")
    assert not other.wanted
    users.close()
