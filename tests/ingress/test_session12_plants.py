"""MAIL, RCPT and DATA refusals, the flow control of replies and the command-wait flag of
the session (mta/ingress/session.py): the replies aiosmtpd gave, in its order of checks,
whether a line is answered as it arrives (data_received) or by the command loop."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from mta.ingress.session import IngressSession
from tests.support import Raw, message, port, stored, wait_until

_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
_MAIL_SYNTAX_EXT = "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
_RCPT_SYNTAX_EXT = "501 5.5.4 Syntax: RCPT TO:<address> [SP <mail-parameters>]"
_HELO_FIRST = "503 5.5.1 Send HELO/EHLO first"


async def _waiting(node: Any) -> IngressSession:
    """The node's only session, once its command loop waits for a command."""
    [session] = node.ingress.sessions
    await wait_until(lambda: session._waiting_command, what="the loop waiting for a command")
    return session


async def _greeted(node: Any, helo: str = "EHLO c.example") -> tuple[Raw, IngressSession]:
    """A connection to ``node`` past its greeting and ``helo``, and the node's session of
    it once the command loop waits for a command."""
    raw = await Raw.connect(port(node))
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd(helo)).startswith("250")
    return raw, await _waiting(node)


async def _ask(raw: Raw, line: str, path: str) -> str:
    """``line``'s reply: answered as it arrives (``at_once``: the loop waits with nothing
    read), or by the command loop (``loop``: a NOOP in the same packet sends it there)."""
    if path == "at_once":
        return await raw.cmd(line)
    raw.writer.write(b"NOOP\r\n" + line.encode() + b"\r\n")
    assert await raw.reply() == "250 2.0.0 OK"
    return await raw.reply()


async def _transcript(raw: Raw, path: str, lines: list[tuple[str, str]]) -> None:
    got = [(line, await _ask(raw, line, path)) for line, _ in lines]
    assert got == lines


@pytest.mark.parametrize("path", ["at_once", "loop"])
async def test_refusals_before_helo(start_node: Any, path: str) -> None:
    node = await start_node()
    raw = await Raw.connect(port(node))
    assert (await raw.reply()).startswith("220")
    await _waiting(node)
    await _transcript(raw, path, [
        ("MAIL FROM:<a@example.com>", _HELO_FIRST),
        ("MAIL TO:<a@example.com>", _HELO_FIRST),  # HELO is checked before the syntax
        ("RCPT TO:<b@example.org>", _HELO_FIRST),
        ("DATA", _HELO_FIRST),
        ("DATA now", _HELO_FIRST),
    ])
    await raw.close()


@pytest.mark.parametrize("path", ["at_once", "loop"])
async def test_replies_after_plain_helo(start_node: Any, path: str) -> None:
    """HELO: no parameters, and the syntax replies without them."""
    node = await start_node()
    raw, session = await _greeted(node, "HELO c.example")
    await _transcript(raw, path, [
        ("MAIL TO:<a@example.com>", _MAIL_SYNTAX),
        ("MAIL FROM:<a@example.com> BODY=8BITMIME", _MAIL_SYNTAX),
        # The SIZE check ahead of aiosmtpd's (a non-ASCII digit) always named parameters.
        ("MAIL FROM:<a@example.com> SIZE=\u00b2", _MAIL_SYNTAX_EXT),
        ("RCPT TO:<b@example.org>", "503 5.5.1 Need MAIL command first"),
        ("MAIL FROM:<a@example.com>", "250 2.1.0 Sender OK"),
        ("RCPT FROM:<b@example.org>", _RCPT_SYNTAX),
        ("RCPT TO:<b@example.org> NOTIFY=NEVER", _RCPT_SYNTAX),
        ("RCPT TO:<b@example.org>", "250 2.1.5 Recipient OK"),
    ])
    assert session.envelope is not None
    assert session.envelope.rcpt_tos == ["b@example.org"]
    await raw.close()


@pytest.mark.parametrize("path", ["at_once", "loop"])
async def test_replies_after_ehlo(start_node: Any, path: str) -> None:
    """EHLO: each check of MAIL's and RCPT's parameters, in aiosmtpd's order."""
    node = await start_node()
    raw, session = await _greeted(node)
    limit = session.data_size_limit
    assert limit
    await _transcript(raw, path, [
        ("MAIL FROM:<a@example.com> X_Y", _MAIL_SYNTAX_EXT),  # not a parameter's syntax
        ("MAIL FROM:<a@example.com> BODY=BINARYMIME", "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
        ("MAIL FROM:<a@example.com> SMTPUTF8=YES", "501 5.5.4 SMTPUTF8 takes no arguments"),
        ("MAIL FROM:<a@example.com> SIZE", _MAIL_SYNTAX_EXT),
        ("MAIL FROM:<a@example.com> SIZE=1 SIZE=X", _MAIL_SYNTAX_EXT),
        (f"MAIL FROM:<a@example.com> SIZE={limit + 1}",
         "552 5.3.4 Message size exceeds fixed limit"),
        ("MAIL FROM:<a@example.com> FOO=1", "555 5.5.4 MAIL FROM parameters not recognized"),
        # Over the command's limit, under the reader's: refused once read, not discarded.
        (f"MAIL FROM:<{'a' * 600}@example.com>", "500 5.5.2 Command line too long"),
        ("DATA now", "503 5.5.1 Need RCPT command first"),  # before its argument
        # Parameters upper-cased; a SIZE of the limit itself is allowed.
        (f"MAIL FROM:<a@example.com> body=8bitmime SIZE={limit}", "250 2.1.0 Sender OK"),
        # The address is checked before the transaction.
        ("MAIL FROM:<", "501 5.1.3 Bad address syntax"),
        ("MAIL FROM:<c@example.com>", "503 5.5.1 Nested MAIL command"),
        ("RCPT TO:<", "501 5.1.3 Bad address syntax"),
        ("RCPT TO:<b@example.org> X_Y", _RCPT_SYNTAX_EXT),
        ("RCPT TO:<b@example.org> NOTIFY=NEVER", "555 5.5.4 RCPT TO parameters not recognized"),
        ("RCPT FROM:<b@example.org>", _RCPT_SYNTAX_EXT),
        ("RCPT TO:<b@example.org>", "250 2.1.5 Recipient OK"),
        ("DATA now", "501 5.5.4 Syntax: DATA"),
    ])
    assert session.envelope is not None
    assert session.envelope.mail_from == "a@example.com"
    assert session.envelope.mail_options == ["BODY=8BITMIME", f"SIZE={limit}"]
    assert session.envelope.rcpt_tos == ["b@example.org"]
    await raw.close()


async def test_mail_answered_at_once_moves_the_idle_deadline(start_node: Any) -> None:
    """A MAIL or RCPT answered as it arrives is activity: the session's timeout starts
    again, as for any command the loop answers."""
    node = await start_node()
    raw, session = await _greeted(node)
    loop = asyncio.get_running_loop()
    for line in ("MAIL FROM:<a@example.com>", "RCPT TO:<b@example.org>"):
        last_reset = session._deadline - session._timeout_duration
        await wait_until(lambda last=last_reset: loop.time() > last,
                         what="the clock past the last reset")
        sent = loop.time()
        assert (await raw.cmd(line)).startswith("250")
        assert session._deadline >= sent + session._timeout_duration, line
    await raw.close()


async def _small_buffers(node: Any) -> tuple[Raw, IngressSession]:
    """A connection past EHLO whose socket buffers are small on both sides (4 KiB), so a
    client that does not read fills them fast; and the node's session of it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port(node)))
    raw = Raw(*await _open(sock))
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd("EHLO c.example")).startswith("250")
    session = await _waiting(node)
    assert session.transport is not None
    session.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return raw, session


async def test_a_client_that_reads_no_replies_is_not_read_either(start_node: Any) -> None:
    """Replies a client does not read pause the session: it stops answering and reading
    (its reader pauses the socket) instead of queueing replies without end; every reply
    still comes, in order, once the client reads."""
    node = await start_node()
    raw, session = await _small_buffers(node)
    assert session.transport is not None
    count = 40_000
    # Each answered as it arrives while the server's transport takes writes.
    raw.writer.write(b"RCPT TO:<b@example.org>\r\n" * count)
    reader: Any = session._reader
    await wait_until(lambda: reader._paused, what="the session to stop reading")
    assert session._paused  # its replies wait for the client ...
    # ... and only a high-water mark's worth of them sit in the transport.
    assert session.transport.get_write_buffer_size() < 1024 * 1024
    replies = [await raw.reader.readline() for _ in range(count)]
    assert set(replies) == {b"503 5.5.1 Need MAIL command first\r\n"}
    assert await raw.cmd("NOOP") == "250 2.0.0 OK"
    await raw.close()


async def test_lines_are_not_answered_at_once_while_replies_wait(start_node: Any) -> None:
    """Once the socket is paused for writing, MAIL and RCPT lines that arrive are no longer
    answered as they arrive (each would add a reply to the queue nobody reads): they go to
    the command loop, which waits for the client, and then the session stops reading."""
    node = await start_node()
    raw, session = await _small_buffers(node)
    transport = session.transport
    assert transport is not None
    written = [0]
    write = session._writer.write

    def counted(data: bytes) -> None:
        written[0] += len(data)
        write(data)

    session._writer.write = counted  # type: ignore[method-assign]
    reader: Any = session._reader
    line, sent = b"RCPT TO:<b@example.org>\r\n", 0
    # Packets of whole lines, one at a time: each is answered as it arrives until the
    # replies fill the socket; then they go to the loop.
    for _ in range(300):
        before, held = written[0], len(reader._buffer)
        raw.writer.write(line * 100)
        sent += 100
        await wait_until(lambda before=before, held=held: (  # type: ignore[misc]
            reader._paused or len(reader._buffer) > held or written[0] > before),
            what="the packet answered, read or left unread")
        if reader._paused:
            break
    assert reader._paused, "answered every packet while its replies could not be sent"
    assert session._paused
    replies = [await raw.reader.readline() for _ in range(sent)]
    assert set(replies) == {b"503 5.5.1 Need MAIL command first\r\n"}
    await raw.close()


async def _open(sock: socket.socket) -> Any:
    return await asyncio.open_connection(sock=sock)


async def test_a_body_line_like_mail_is_body(start_node: Any) -> None:
    """Once DATA is read, the session does not wait for a command: a body packet that
    starts with "MAIL " is message text, not a command answered as it arrives."""
    node = await start_node()
    raw, _ = await _greeted(node)
    assert (await raw.cmd("MAIL FROM:<a@example.com>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<b@example.org>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    body = b"MAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.org>\r\n" + message(1, 200)
    raw.writer.write(body + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0 Ok: queued as ")
    [msg] = (await stored(node)).values()
    assert b"MAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.org>\r\n" in msg.body
    await raw.close()


async def test_the_rest_of_a_long_line_is_not_a_command(start_node: Any) -> None:
    """A command line over the limit is discarded up to its end: what arrives after the
    session began discarding it is still that line, whatever it looks like."""
    node = await start_node()
    raw, session = await _greeted(node)
    reader: Any = session._reader
    discarded: list[int] = []
    real = reader.readexactly

    async def readexactly(n: int) -> bytes:
        discarded.append(n)
        return await real(n)

    reader.readexactly = readexactly
    raw.writer.write(b"X" * 3000)
    await wait_until(lambda: sum(discarded) >= 3000 and not reader._buffer,
                     what="the start of the long line discarded")
    raw.writer.write(b"MAIL FROM:<a@example.com>\r\n")
    assert await raw.reply() == "500 5.5.2 Command line too long"
    assert session.envelope is not None and not session.envelope.mail_from
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    await raw.close()


async def test_an_auth_answer_like_mail_is_the_auth_answer(start_node: Any,
                                                           users_file: str) -> None:
    """While AUTH waits for the client's answer to its challenge, no line is a command:
    one that reads like MAIL is that answer (and a bad one)."""
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    raw, session = await _greeted(node)
    assert (await raw.cmd("AUTH LOGIN")).startswith("334 ")
    reply = await raw.cmd("MAIL FROM:<a@example.com>")
    assert reply[:1] in "45", reply
    assert session.envelope is not None and not session.envelope.mail_from
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    await raw.close()


async def test_a_packet_that_ends_a_started_line_is_not_a_new_command(start_node: Any) -> None:
    """A packet that starts like RCPT but completes a line already begun is that line (an
    unknown command here), not an RCPT answered as it arrives."""
    node = await start_node()
    raw, session = await _greeted(node)
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    raw.writer.write(b"X-")
    reader: Any = session._reader
    await wait_until(lambda: bytes(reader._buffer) == b"X-", what="the line begun")
    raw.writer.write(b"RCPT TO:<b@example.org>\r\n")
    assert await raw.reply() == "500 5.5.1 Command not recognized"
    assert session.envelope is not None and session.envelope.rcpt_tos == []
    await raw.close()
