"""Hostile clients against DATA answered, and its body read, as they arrive
(mta/ingress/session.py ``data_received``, mta/ingress/data.py ``Body.feed``): the budget
taken by another session mid-body, a drain, a timeout, a reset, TLS, the live trace, a
client that never reads its replies, a stop, AUTH, a message injected in the clear with
STARTTLS, and transcripts whose replies and bodies must be the loop's path's."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from typing import Any

from mta.ingress.trace import TraceFilter
from tests.support import Raw, message, port, stored, wait_until
from tests.support.smtp import at_354, count_calls, end_in_three_arrivals, waiting_session

_MAIL = b"MAIL FROM:<a@example.com>\r\n"
_RCPT = b"RCPT TO:<b@example.org>\r\n"
_DATE = re.compile(rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")
_HEAD = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: t\r\n\r\n"


async def _closed(raw: Raw) -> bytes:
    """Everything the node still sends, up to its end of the connection."""
    return await asyncio.wait_for(raw.reader.read(), 10)


def _idle(node: Any) -> bool:
    return not node.ingress.sessions and node.ingress.inflight_bytes == 0


# --- the session's life mid-body ------------------------------------------------------------


async def test_the_budget_taken_by_another_body_meanwhile(start_node: Any) -> None:
    """Two bodies taken at once share a 1 MB budget: the second, arriving while the first
    holds most of it, is read to its end and refused with 452 (the session in step, the
    budget back); the first then ends and is stored; the second client's next try fits."""
    node = await start_node(smtp={"max_message_size": "1M", "max_inflight_bytes": "1M"})
    ingress = node.ingress
    first, second = await Raw.connect(port(node)), await Raw.connect(port(node))
    for raw in (first, second):
        assert (await raw.reply()).startswith("220")
        assert (await raw.cmd("EHLO c.example")).startswith("250")
    await wait_until(lambda: len(ingress.sessions) == 2
                     and all(s._waiting_command for s in ingress.sessions),
                     what="both loops waiting")
    await at_354(first)
    first.writer.write(message(1, 700_000))
    await wait_until(lambda: ingress.inflight_bytes >= 690_000, what="the first body held")
    await at_354(second)
    second.writer.write(message(2, 500_000) + b".\r\n")
    assert await second.reply() == ("452 4.3.1 Insufficient system resources for this "
                                    "message now, try again later")
    first.writer.write(b"last\r\n.\r\n")
    assert (await first.reply()).startswith("250 2.0.0 Ok: queued as ")
    await wait_until(lambda: ingress.inflight_bytes == 0, what="the budget back")
    await at_354(second)
    second.writer.write(message(3, 100_000) + b".\r\n")
    assert (await second.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert sorted(len(m.body) > 600_000 for m in (await stored(node)).values()) == [False, True]
    assert ingress.inflight_bytes == 0
    for raw in (first, second):
        await raw.close()


async def test_a_drain_lets_a_body_taken_at_once_finish(start_node: Any) -> None:
    """A drain while one body arrives at once and another session waits (its MAIL answered
    at once): the waiting one is told 421 and closed at once; the body goes on arriving,
    is stored, its 250 sent, then the 421, and the connection closed."""
    node = await start_node()
    ingress = node.ingress
    busy, idle = await Raw.connect(port(node)), await Raw.connect(port(node))
    for raw in (busy, idle):
        assert (await raw.reply()).startswith("220")
        assert (await raw.cmd("EHLO c.example")).startswith("250")
    await wait_until(lambda: len(ingress.sessions) == 2
                     and all(s._waiting_command for s in ingress.sessions),
                     what="both loops waiting")
    assert await idle.cmd(_MAIL.rstrip()) == "250 2.1.0 Sender OK"
    await at_354(busy)
    busy.writer.write(message(1, 50_000))
    await wait_until(lambda: ingress.inflight_bytes >= 40_000, what="the body arriving")
    drain = asyncio.create_task(ingress.drain(10))
    assert await _closed(idle) == b"421 4.3.2 Service shutting down, try again later\r\n"
    assert not drain.done()
    busy.writer.write(b"the end\r\n.\r\n")
    replies = (await _closed(busy)).decode().split("\r\n")
    assert replies[0].startswith("250 2.0.0 Ok: queued as ")
    assert replies[1:] == ["421 4.3.2 Service shutting down, try again later", ""]
    await asyncio.wait_for(drain, 10)
    [msg] = (await stored(node)).values()
    assert msg.body.endswith(b"\r\nthe end\r\n")
    await wait_until(lambda: _idle(node), what="the sessions gone, the budget back")
    for raw in (busy, idle):
        await raw.close()


async def test_the_data_timeout_ends_a_body_dripping_in_at_once(start_node: Any) -> None:
    """A body sent a byte per packet, each taken at once: the DATA timeout (from the 354)
    still ends it, though bytes keep coming; nothing stored, the budget and the session
    given back."""
    node = await start_node(smtp={"data_timeout": 0.5})
    raw = await Raw.connect(port(node))
    raw.writer.transport.get_extra_info("socket").setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    session = await waiting_session(node, raw)
    await at_354(raw)
    body = _HEAD + b"x" * 100_000
    sent = 0
    async with asyncio.timeout(10):
        while not raw.reader.at_eof() and not raw.writer.is_closing():
            arriving = session._arriving
            if arriving is None:
                break
            size = arriving._size
            raw.writer.write(body[sent:sent + 1])
            sent += 1
            await wait_until(lambda a=arriving, n=size: a._size > n or session._arriving is None,
                             step=0, what="the byte taken")
    assert sent > 5
    try:
        assert await _closed(raw) == b""
    except ConnectionResetError:
        pass  # bytes sent after the node closed: the kernel answers them with a reset
    await wait_until(lambda: _idle(node) and not session.in_data, what="everything given back")
    assert await stored(node) == {}
    await raw.close()


async def test_a_reset_mid_body_gives_everything_back(start_node: Any) -> None:
    """A connection reset (RST) in the middle of a body taken at once, and just after its
    end-of-data dot (held back, waiting for its CRLF): no message, the budget, the
    in-DATA mark and the session given back."""
    node = await start_node()
    for tail in (b"more", b"\r\n.", b"\r\n.\r"):
        raw = await Raw.connect(port(node))
        session = await waiting_session(node, raw)
        await at_354(raw)
        raw.writer.write(message(1, 300_000) + tail)
        await wait_until(lambda: node.ingress.inflight_bytes >= 290_000,
                         what="the body in flight")
        if tail != b"more":
            await wait_until(lambda t=tail, s=session: s._arriving is not None
                             and s._arriving.held == t[2:], what="the dot held back")
        sock = raw.writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.writer.transport.abort()
        await wait_until(lambda s=session: _idle(node) and not s.in_data,
                         what="everything given back")
    assert await stored(node) == {}


async def test_starttls_then_a_body_taken_at_once(start_node: Any, tls_files: Any,
                                                  tls_ca: Any) -> None:
    """After STARTTLS: DATA answered, and its body (the end split over TLS records) read,
    as they arrive; the same body stored; a half-close after the next command gets its
    reply."""
    cert, key = tls_files
    node = await start_node(smtp={"tls_cert": cert, "tls_key": key})
    raw = await Raw.connect(port(node))
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    assert (await raw.cmd("STARTTLS")).startswith("220")
    await raw.start_tls(tls_ca)
    [session] = node.ingress.sessions
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    await wait_until(lambda: session._waiting_command, what="the loop waiting")
    reads, taken = count_calls(session, "_read_body"), count_calls(session, "_data_taken")
    await at_354(raw)
    await end_in_three_arrivals(raw, session, message(1, 20_000) + b"..dot\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert await raw.reply() == "250 2.0.0 OK"
    assert (reads, taken) == ([0], [1])
    [msg] = (await stored(node)).values()
    assert msg.body.endswith(b"\r\n.dot\r\n")
    assert node.ingress.inflight_bytes == 0
    assert (await raw.cmd("QUIT")).startswith("221")
    await raw.close()


async def test_the_trace_sees_data_once_before_its_354(start_node: Any) -> None:
    """MAIL, RCPT, DATA and a body in one packet, all taken at once: the trace has each
    command once, each before its reply, DATA before its 354, then the data event and
    the 250."""
    node = await start_node()
    with node.ingress.trace.subscribe(TraceFilter()) as sub:
        raw = await Raw.connect(port(node))
        await waiting_session(node, raw)
        taken = count_calls(next(iter(node.ingress.sessions)), "_data_taken")
        raw.writer.write(_MAIL + _RCPT + b"DATA\r\n" + _HEAD + b"hi\r\n.\r\nQUIT\r\n")
        got = [(await raw.reply())[:4] for _ in range(5)]
        assert got == ["250 ", "250 ", "354 ", "250 ", "221 "]
        assert taken == [1]
        await raw.close()
        events = []
        async with asyncio.timeout(10):
            while not events or events[-1].kind != "disconnect":
                events.append(await sub.get())
    seen = [(e.kind, (e.fields.get("line") or "")[:4]) for e in events
            if e.kind in ("command", "reply", "data")]
    assert seen[-10:] == [("command", "MAIL"), ("reply", "250 "), ("command", "RCPT"),
                          ("reply", "250 "), ("command", "DATA"), ("reply", "354 "),
                          ("data", ""), ("reply", "250 "), ("command", "QUIT"),
                          ("reply", "221 ")]


async def test_a_client_that_never_reads_while_pipelining_whole_messages(
        start_node: Any) -> None:
    """Messages pipelined whole (MAIL, RCPT, DATA, body, end), thousands of them, by a
    client that reads no reply until it has sent them all: once the node's replies back up
    it stops answering at once and stops reading (its buffers stay bounded); every reply
    comes, in order, once the client reads; every message stored once."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    # Small socket buffers both ways: the node's replies back up after a few kilobytes.
    raw.writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    session = await waiting_session(node, raw)
    session.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    taken = count_calls(session, "_data_taken")
    count = 2000
    one = _MAIL + _RCPT + b"DATA\r\n" + _HEAD + b"y" * 50 + b"\r\n.\r\n"
    sender = asyncio.create_task(_write_all(raw, [one] * count + [b"QUIT\r\n"]))
    await wait_until(lambda: session._paused, what="the node's writes paused")
    # Backed up: the loop waits to write, nothing is answered at once, and the input waits
    # in the reader (which stops the transport at its limit).
    await wait_until(lambda: session._reader._paused or sender.done(),
                     what="the node's reading paused, or everything sent")
    assert not session._waiting_command and session._arriving is None
    before = taken[0]
    await wait_until(lambda: len(session._reader._buffer) > 0, what="input waiting")
    assert len(session._reader._buffer) <= 3 * 256 * 1024
    assert session.transport.get_write_buffer_size() < 256 * 1024
    assert taken[0] == before
    # The client reads at last, with room to.
    for sock in (raw.writer.transport.get_extra_info("socket"),
                 session.transport.get_extra_info("socket")):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    text = await asyncio.wait_for(raw.reader.read(), 60)
    await sender
    assert [line[:4] for line in text.split(b"\r\n")] == (
        [b"250 ", b"250 ", b"354 ", b"250 "] * count + [b"221 ", b""])
    assert len(await stored(node)) == count
    await wait_until(lambda: _idle(node), what="the session gone")
    await raw.close()


async def _write_all(raw: Raw, packets: list[bytes]) -> None:
    for packet in packets:
        raw.writer.write(packet)
        await raw.writer.drain()


async def test_a_stop_whose_grace_ends_mid_body_cuts_it_cleanly(start_node: Any) -> None:
    """The node stops while a body arrives at once and the client never finishes it: the
    grace ends, the session is cut (no 250, nothing stored), the budget given back."""
    node = await start_node(smtp={"shutdown_grace": 0.3})
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    await at_354(raw)
    raw.writer.write(message(1, 100_000) + b"\r\n.")
    await wait_until(lambda: session._arriving is not None and session._arriving.held == b".",
                     what="the body in flight, its last dot held back")
    ingress = node.ingress
    await asyncio.wait_for(node.stop(), 10)
    assert await _closed(raw) == b""
    assert not ingress.sessions and ingress.inflight_bytes == 0 and not session.in_data
    await raw.close()


async def test_auth_then_a_message_taken_at_once(start_node: Any, users_file: str) -> None:
    """AUTH (answered by the loop), then MAIL, RCPT, DATA and the body taken at once: the
    message carries the authenticated user."""
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    taken = count_calls(session, "_data_taken")
    assert (await raw.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==")).startswith("235")
    await wait_until(lambda: session._waiting_command, what="the loop waiting again")
    await at_354(raw)
    raw.writer.write(message(1, 3000) + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert taken == [1]
    [msg] = (await stored(node)).values()
    assert msg.envelope.auth_user == "alice"
    await raw.close()


async def test_a_whole_message_injected_in_the_clear_with_starttls_is_dropped(
        start_node: Any, tls_files: Any, tls_ca: Any) -> None:
    """RFC 3207 5: STARTTLS followed, in the same cleartext packet, by a whole message
    (MAIL, RCPT, DATA, body, end): none of it counts once TLS is up; DATA after TLS with
    no EHLO again is refused, by the loop."""
    cert, key = tls_files
    node = await start_node(smtp={"tls_cert": cert, "tls_key": key})
    raw = await Raw.connect(port(node))
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    raw.writer.write(b"STARTTLS\r\n" + _MAIL + _RCPT + b"DATA\r\n" + _HEAD + b"evil\r\n.\r\n")
    assert (await raw.reply()).startswith("220")
    await raw.start_tls(tls_ca)
    [session] = node.ingress.sessions
    await wait_until(lambda: session._waiting_command, what="the loop waiting")
    assert await raw.cmd("DATA") == "503 5.5.1 Send HELO/EHLO first"
    assert not session.in_data and session._arriving is None
    assert (await raw.cmd("QUIT")).startswith("221")
    assert await stored(node) == {}
    await raw.close()


# --- transcripts: the at-once path and the loop's path, the same replies and bodies ---------

# The packets after the 354, each a body cut somewhere hostile: lookalikes of the end of
# DATA, bare CR and LF, a first line ".", "..", NULs, 8-bit, lines at and over the limit,
# the end split in every way, and commands pipelined after the end in the same packet.
_TRANSCRIPTS: dict[str, list[bytes]] = {
    "empty": [b".\r\nNOOP\r\n"],
    "first line dot-dot": [b"..\r\n.\r\n"],
    "first line a dot, then more": [b".x\r\n..\r\n.", b"\r\nNOOP\r\n"],
    "lookalikes": [_HEAD + b"a\n.\nb\r.\rc\n.\r\nd\r\n.\ne\r\n..\r\n.\r", b"\n"],
    "dot CR line": [_HEAD + b"a\r\n.\r\r\n.\r\n"],
    "end split after CR": [_HEAD + b"a\r", b"\n.\r\nRSET\r\n"],
    "end split after dot": [_HEAD + b"a\r\n.", b"\r\n"],
    "stuffed dot split": [_HEAD + b"a\r\n.", b".\r\n.", b"\r", b"\nNOOP\r\nNOOP\r\n"],
    "NUL and 8-bit": [_HEAD + b"\x00\xff\xfe\r\n\x80.\r\n\r\n.\r\n"],
    "the longest line": [_HEAD + b"x" * 999 + b"\r\n.\r\n"],
    "a line too long, over two": [_HEAD + b"x" * 500, b"x" * 500 + b"\r\n.\r\nNOOP\r\n"],
    "a dotted line too long": [_HEAD + b"." + b"x" * 999 + b"\r\n.\r\n"],
    "next message in the same packet": [
        _HEAD + b"one\r\n.\r\n" + _MAIL + _RCPT + b"DATA\r\n" + _HEAD + b"two\r\n.\r\nQUIT\r\n"],
}


async def _transcript(node: Any, packets: list[bytes], at_once: bool
                      ) -> tuple[list[str], list[bytes]]:
    """One session: MAIL and RCPT, DATA taken at once (``at_once``) or behind a NOOP by the
    loop, then ``packets``; every reply after the 354 and the bodies stored."""
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    at_once_calls = count_calls(session, "_data_taken")
    assert await raw.cmd(_MAIL.rstrip()) == "250 2.1.0 Sender OK"
    assert await raw.cmd(_RCPT.rstrip()) == "250 2.1.5 Recipient OK"
    if at_once:
        assert (await raw.cmd("DATA")).startswith("354 ")
    else:
        assert await raw.cmd("NOOP\r\nDATA") == "250 2.0.0 OK"
        assert (await raw.reply()).startswith("354 ")
    for packet in packets:
        raw.writer.write(packet)
        await raw.writer.drain()
    raw.writer.write(b"QUIT\r\n")
    text = (await _closed(raw)).decode("utf-8", "replace")
    assert bool(at_once_calls[0]) == at_once
    await wait_until(lambda: _idle(node), what="the session gone")
    replies = [line.split(" queued as ") for line in text.split("\r\n")]
    # Stored with the node's own headers: their message id and times told apart.
    bodies = [_DATE.sub(b"DATE", (await node.spool.load(reply[1])).body.replace(
        reply[1].encode(), b"ID")) for reply in replies if len(reply) == 2]
    await raw.close()
    return [reply[0] for reply in replies], bodies


async def test_transcripts_are_the_same_at_once_and_through_the_loop(start_node: Any) -> None:
    node = await start_node()
    for name, packets in _TRANSCRIPTS.items():
        at_once = await _transcript(node, packets, at_once=True)
        by_loop = await _transcript(node, packets, at_once=False)
        assert at_once == by_loop, name
