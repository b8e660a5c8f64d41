"""Mutants planted in DATA answered at once (mta/ingress/session.py ``_begin_body``,
``_body_arrives``, ``_abandon_body``, ``_next_command``, ``_leave_data``), the body's pieces
(mta/ingress/data.py ``Body``) and the ``<via>.received`` line's call (mta/ingress/submit.py)
that the suite let through: each test here fails with its mutant and passes without it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import Any

import aiosmtplib
import pytest
from structlog.testing import capture_logs

from mta.ingress.session import IngressSession
from tests.support import Raw, message, port, queued_id, stored, wait_until
from tests.support.smtp import waiting_session


async def _envelope(raw: Raw) -> None:
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert await raw.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Recipient OK"


async def _data_at_once(node: Any) -> tuple[Raw, IngressSession]:
    """A new session whose DATA was answered at once (354): its body now arrives."""
    before = set(node.ingress.sessions)
    raw = await Raw.connect(port(node))
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    [session] = node.ingress.sessions - before
    await wait_until(lambda: session._waiting_command, what="the loop waiting for a command")
    await _envelope(raw)
    assert (await raw.cmd("DATA")).startswith("354 ")
    assert session._arriving is not None
    assert not session._waiting_command  # a body arrives: not a command wait any more
    return raw, session


def _body_of(n: int, size: int) -> bytes:
    """A message of exactly ``size`` bytes (no line begins with a dot: nothing unstuffed)."""
    body = message(n, size - 2000)
    rest = size - len(body)
    while rest:
        k = min(rest, 900)
        if 0 < rest - k < 2:
            k -= 2
        body += b"f" * (k - 2) + b"\r\n"
        rest -= k
    assert len(body) == size
    return body


async def _closed(raw: Raw) -> bool:
    """The server closed the connection: an end of stream with nothing unread, or a reset
    when it closed with our bytes still unread."""
    try:
        return await asyncio.wait_for(raw.reader.read(), 10) == b""
    except ConnectionError:
        return True


# --- the body's pieces (mta/ingress/data.py Body.take) -------------------------------------


@pytest.mark.parametrize(("size", "want"), [(65536, "250 2.0.0"), (65537, "552 5.3.4")])
async def test_a_body_of_exactly_the_size_limit_is_taken(start_node: Any, size: int,
                                                         want: str) -> None:
    """Planted: ``size >= limit`` (a body of exactly max_message_size refused)."""
    node = await start_node(smtp={"max_message_size": 65536})
    raw, _ = await _data_at_once(node)
    raw.writer.write(_body_of(1, size) + b".\r\n")
    assert (await raw.reply()).startswith(want)
    assert len(await stored(node)) == (want == "250 2.0.0")
    assert node.ingress.inflight_bytes == 0
    await raw.close()


@pytest.mark.parametrize("path", ["at_once", "loop"])
@pytest.mark.parametrize(("length", "want"), [(999, "250 2.0.0"), (1000, "500 5.5.2")])
async def test_the_longest_body_line_taken(start_node: Any, path: str, length: int,
                                           want: str) -> None:
    """A body line of 999 octets and its CRLF (aiosmtpd's line_length_limit, 1001) is taken,
    one more is refused, on both paths. Planted: the limit less one instead of two."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    await waiting_session(node, raw)
    if path == "at_once":
        await _envelope(raw)
        assert (await raw.cmd("DATA")).startswith("354 ")
    else:  # behind a NOOP: the loop answers DATA and the reader reads the body
        raw.writer.write(b"NOOP\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                         b"DATA\r\n")
        assert [(await raw.reply())[:4] for _ in range(4)] == ["250 ", "250 ", "250 ", "354 "]
    raw.writer.write(message(1, 600) + b"L" * length + b"\r\nlast\r\n.\r\n")
    assert (await raw.reply()).startswith(want)
    assert await raw.cmd("NOOP") == "250 2.0.0 OK"  # in step either way
    await raw.close()


async def test_a_refused_body_gives_its_budget_back_before_its_end(start_node: Any) -> None:
    """A body over the size limit holds none of the budget for the rest of its transfer:
    another session's message that needs the whole budget goes through meanwhile.
    Planted: the refused body's budget kept until its end."""
    node = await start_node(smtp={"max_message_size": 65536, "max_inflight_bytes": 65536})
    big, session = await _data_at_once(node)
    big.writer.write(message(1, 100_000))  # over the limit; its end not sent yet
    await wait_until(lambda: session._arriving is not None
                     and session._arriving._size >= 99_000, what="the big body taken")
    other, _ = await _data_at_once(node)
    other.writer.write(message(2, 60_000) + b".\r\n")
    assert (await other.reply()).startswith("250 2.0.0")
    big.writer.write(b".\r\n")
    assert (await big.reply()).startswith("552 5.3.4")
    assert node.ingress.inflight_bytes == 0
    await big.close()
    await other.close()


async def test_a_too_big_body_is_552_even_while_the_budget_is_short(start_node: Any) -> None:
    """Too big is permanent (552), whatever the budget: a client told 452 would retry it
    for ever. Planted: the budget asked for after the body was already refused (its
    failure then replaces the size fault)."""
    node = await start_node(smtp={"max_message_size": 65536, "max_inflight_bytes": 100_000})
    ingress = node.ingress
    holder, _ = await _data_at_once(node)
    holder.writer.write(message(1, 60_000))  # holds 64K of the 100K budget, unfinished
    await wait_until(lambda: ingress.inflight_bytes >= 60_000, what="the first body held")
    big, _ = await _data_at_once(node)
    big.writer.write(message(2, 120_000) + b".\r\n")
    assert (await big.reply()).startswith("552 5.3.4")
    holder.writer.write(b".\r\n")
    assert (await holder.reply()).startswith("250 2.0.0")
    assert ingress.inflight_bytes == 0
    await holder.close()
    await big.close()


@pytest.mark.parametrize(("body", "tail"), [(b"x.\r\n.\r\n", b"\r\nx.\r\n"),
                                           (b"..\r\n.\r\n", b"\r\n.\r\n"),
                                           (b".\r\n", b"\r\n")])
async def test_a_short_end_of_data_read_by_the_reader(start_node: Any, body: bytes,
                                                      tail: bytes) -> None:
    """DATA behind a command only the loop answers: the reader's piece that ends the body
    may be the bare ".\\r\\n" (the previous piece ended its line). Planted: the line start
    judged from that piece alone (the body never ends)."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    await waiting_session(node, raw)
    raw.writer.write(b"RSET\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                     b"DATA\r\n")
    assert [(await raw.reply())[:4] for _ in range(4)] == ["250 ", "250 ", "250 ", "354 "]
    raw.writer.write(body)
    reply = await raw.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    msg = (await stored(node))[queued_id(reply)]
    assert msg.body.endswith(tail), msg.body[-40:]
    await raw.close()


# --- DATA answered at once (mta/ingress/session.py) ------------------------------------------


async def test_data_and_its_body_in_one_packet(start_node: Any) -> None:
    """DATA, its body and the next command in one write: the body stored as sent (not a
    byte lost or added after the DATA line), the next command answered once.
    Planted: the rest after the DATA line cut a byte short."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    await _envelope(raw)
    content = message(1, 3000)
    raw.writer.write(b"DATA\r\n" + content + b".\r\nNOOP\r\n")
    assert (await raw.reply()).startswith("354 ")
    reply = await raw.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    assert await raw.reply() == "250 2.0.0 OK"
    assert await raw.cmd("QUIT") == "221 Bye"
    msg = (await stored(node))[queued_id(reply)]
    assert msg.body.endswith(b"\r\n" + content)
    assert msg.body.index(b"From: sender@example.com") == len(msg.body) - len(content)
    assert not session.in_data and node.ingress.inflight_bytes == 0
    await raw.close()


async def test_a_client_reset_mid_body_gives_everything_back(start_node: Any) -> None:
    """A reset (no FIN: eof_received never runs) in the middle of a body taken at once: the
    budget and the in-DATA mark given back. Planted: connection_lost without
    ``_abandon_body`` (the command loop, cancelled while it waits, never does it)."""
    node = await start_node()
    ingress = node.ingress
    raw, session = await _data_at_once(node)
    raw.writer.write(message(3, 200_000))
    await wait_until(lambda: ingress.inflight_bytes >= 150_000, what="the body in flight")
    sock = raw.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.writer.transport.abort()
    await wait_until(lambda: ingress.inflight_bytes == 0 and not session.in_data
                     and not ingress.sessions, what="the budget given back")
    assert session._arriving is None
    assert await stored(node) == {}


async def test_a_client_that_half_closes_after_its_message_is_closed(start_node: Any) -> None:
    """The end of a body taken at once, a NOOP and the client's FIN together: the 250, the
    NOOP's reply, then the server closes (the FIN came while the message was stored, before
    the loop waited again). Planted: the loop waits for a wake-up with the reader at EOF."""
    node = await start_node()
    raw, _ = await _data_at_once(node)
    raw.writer.write(message(4, 2000) + b".\r\nNOOP\r\n")
    raw.writer.write_eof()
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert await raw.reply() == "250 2.0.0 OK"
    assert await _closed(raw)
    assert len(await stored(node)) == 1
    await raw.close()


async def test_the_data_timeout_bounds_a_body_taken_at_once(start_node: Any) -> None:
    """A body taken at once that stops coming is cut at data_timeout, not command_timeout,
    and its budget given back. Planted: in DATA without the DATA timer."""
    node = await start_node(smtp={"command_timeout": 60, "data_timeout": 0.5})
    raw, session = await _data_at_once(node)
    raw.writer.write(message(5, 5000))  # and then nothing
    assert await _closed(raw)
    await wait_until(lambda: node.ingress.inflight_bytes == 0 and not session.in_data,
                     what="the budget given back")
    assert await stored(node) == {}
    await raw.close()


async def test_a_drain_lets_a_body_taken_at_once_finish_then_says_421(start_node: Any) -> None:
    """A drain while a body taken at once arrives: the body is stored, its 250 sent, then
    the 421 and the close (RFC 5321 3.8). Planted: ``_leave_data`` without the drain's
    close (the client is left on a server going away)."""
    node = await start_node()
    ingress = node.ingress
    raw, session = await _data_at_once(node)
    raw.writer.write(message(6, 3000))
    await wait_until(lambda: ingress.inflight_bytes > 0, what="the body in flight")
    drain = asyncio.ensure_future(ingress.drain(10))
    await wait_until(lambda: ingress.draining, what="the drain begun")
    assert session.in_data and not session.transport.is_closing()
    raw.writer.write(b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    assert await raw.reply() == "421 4.3.2 Service shutting down, try again later"
    assert await _closed(raw)
    await drain
    assert len(await stored(node)) == 1
    await raw.close()


async def test_data_after_a_failed_tls_is_refused_not_taken_at_once(start_node: Any) -> None:
    """A session whose TLS handshake a STARTTLS hook refused (aiosmtpd's
    ``_tls_handshake_okay``; mta installs no such hook, so the state is set here) gets
    554 for DATA from the loop, never a 354. Planted: ``_begin_body`` without the check."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    await _envelope(raw)
    session._tls_handshake_okay = False
    assert await raw.cmd("DATA") == "554 5.7.0 Command refused: TLS failed"
    assert not session.in_data and session._arriving is None
    await raw.close()


# --- the <via>.received line's call (mta/ingress/submit.py) --------------------------------


async def test_the_received_line_says_tls_for_esmtpsa(start_node: Any, tls_files: Any,
                                                      tls_ca: Any, users_file: str) -> None:
    """AUTH over STARTTLS (ESMTPSA) is a message over TLS; AUTH in the clear (ESMTPA) is
    not. Planted: ``protocol.endswith("S")`` (the A of ESMTPSA hides the S)."""
    cert, key = tls_files
    node = await start_node(smtp={"tls_cert": cert, "tls_key": key, "users_file": users_file})
    ctx = ssl.create_default_context()
    tls_ca.configure_trust(ctx)
    with capture_logs() as logs:
        for tls in (True, False):
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node), tls_context=ctx,
                                   start_tls=False)
            await smtp.connect()
            await smtp.ehlo()
            if tls:
                await smtp.starttls()
                await smtp.ehlo()
            await smtp.login("alice", "s3cret")
            await smtp.sendmail("a@example.com", ["b@example.org"], message(7, 500))
            await smtp.quit()
    received = [e for e in logs if e["event"] == "smtp.received"]
    assert [(e["auth_user"], e["tls"]) for e in received] == [("alice", True),
                                                              ("alice", False)]
    bodies = [m.body for m in (await stored(node)).values()]
    assert sorted(b"with ESMTPSA id" in b for b in bodies) == [False, True]
