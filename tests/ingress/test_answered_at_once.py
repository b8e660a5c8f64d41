"""MAIL and RCPT answered as they arrive (mta/ingress/session.py ``data_received``), while
the command loop waits for a command: the same replies, in the same order, in as few writes,
whatever the packets look like, and an error in one still gets its 451."""

from __future__ import annotations

import asyncio
from typing import Any

from mta.ingress.session import IngressSession
from tests.support import Raw, message, port, stored, wait_until
from tests.support.smtp import count_calls, waiting_session


def _record_writes(session: IngressSession) -> list[bytes]:
    writes: list[bytes] = []
    real = session._writer.write

    def write(data: bytes) -> None:
        writes.append(bytes(data))
        real(data)

    session._writer.write = write  # type: ignore[method-assign]
    return writes


async def test_mail_and_rcpt_do_not_wake_the_command_loop(start_node: Any) -> None:
    """A client waiting for each reply (smtp-source does): the loop, waiting in _read_line,
    is not woken for MAIL or RCPT; DATA wakes it, and the message is stored."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw, helo="HELO c.example")
    reads = count_calls(session, "_read_line")
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert await raw.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Recipient OK"
    assert await raw.cmd("RCPT TO:<c@example.org>") == "250 2.1.5 Recipient OK"
    assert reads == [0]  # the loop never left the wait it was in before MAIL
    assert (await raw.cmd("DATA")).startswith("354")
    raw.writer.write(message(1, 200) + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    [msg] = (await stored(node)).values()
    assert msg.envelope.recipients == ["b@example.org", "c@example.org"]
    await raw.close()


async def test_pipelined_commands_get_their_replies_in_one_write(start_node: Any) -> None:
    """MAIL and RCPT answered at once, then a command the loop answers: one write of all
    three replies (RFC 2920), not one per command."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    writes = _record_writes(session)
    raw.writer.write(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nNOOP\r\n")
    replies = [await raw.reply() for _ in range(3)]
    assert [r[:3] for r in replies] == ["250", "250", "250"]
    assert writes == [b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n250 2.0.0 OK\r\n"]
    await raw.close()


async def test_a_command_in_two_packets_is_answered_once_whole(start_node: Any) -> None:
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    raw.writer.write(b"MAIL FROM:<a@exa")
    await raw.writer.drain()
    await wait_until(lambda: bool(session._reader._buffer),  # type: ignore[attr-defined]
                     what="the first half in the reader")
    raw.writer.write(b"mple.com>\r\nRCPT TO:<b@example.org>\r\n")
    assert await raw.reply() == "250 2.1.0 Sender OK"
    assert await raw.reply() == "250 2.1.5 Recipient OK"
    assert session.envelope is not None
    assert session.envelope.mail_from == "a@example.com"
    await raw.close()


async def test_a_failure_answering_at_once_is_a_451_and_the_session_goes_on(
        start_node: Any) -> None:
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    handler = session.event_handler
    real = handler.mail

    def broken(*args: Any) -> str:
        handler.mail = real
        raise RuntimeError("planted")

    handler.mail = broken
    assert await raw.cmd("MAIL FROM:<a@example.com>") == \
        "451 4.3.0 Internal error, try again later"
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    await raw.close()


async def test_refusals_answered_at_once_are_the_loops(start_node: Any) -> None:
    """The replies data_received gives are those the loop gave: order of checks, bad
    UTF-8, a line over the limit (left to the reader, which discards it)."""
    node = await start_node()
    raw = await Raw.connect(port(node))
    session = await waiting_session(node, raw)
    assert (await raw.cmd("RCPT TO:<b@example.org>")).startswith("503 5.5.1")
    assert (await raw.cmd(b"MAIL FROM:<\xff@example.com>")).startswith("501")
    assert (await raw.cmd("MAIL FROM:<" + "a" * 2000 + "@example.com>")).startswith("500 5.5.2")
    assert await raw.cmd("MAIL FROM:<a@example.com> SIZE=\u00b2") == \
        "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "503 5.5.1 Nested MAIL command"
    assert session._waiting_command
    await raw.close()


async def test_a_client_that_half_closes_after_mail_gets_its_reply(start_node: Any) -> None:
    node = await start_node()
    raw = await Raw.connect(port(node))
    await waiting_session(node, raw)
    raw.writer.write(b"MAIL FROM:<a@example.com>\r\n")
    raw.writer.write_eof()
    assert await raw.reply() == "250 2.1.0 Sender OK"
    assert await asyncio.wait_for(raw.reader.read(), 10) == b""  # then the server closes
    await raw.close()
