"""SMTP clients for tests: a line-level one for replies the libraries hide, a submission to a
node process, and what an in-process node has stored."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from typing import TYPE_CHECKING, Any

from harness.mail import message
from harness.node import NodeProcess

if TYPE_CHECKING:
    from mta.ingress.session import IngressSession
    from mta.node import Node


def port(node: Node) -> int:
    """The SMTP port of an in-process node."""
    assert node.ingress is not None
    return node.ingress.port


async def stored(node: Node) -> dict[str, Any]:
    """{id: StoredMessage} of every live message in the node's owned shards."""
    out = {}
    for n in node.spool.owned:
        for ref in node.spool.live_messages(n):
            out[ref.id] = await node.spool.load(ref.id)
    return out


def queued_id(reply: bytes | str) -> str:
    """The message id of a ``250 ... queued as ID`` reply."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()


def submit(node: NodeProcess, rcpts: list[str], n: int, sender: str = "app@ok.test",
           extra_headers: str = "") -> str:
    """Submit ``message(n)`` to a node process; its queue id (the 250 is asserted)."""
    with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(sender)
        for r in rcpts:
            smtp.rcpt(r)
        code, reply = smtp.data(message(n, 1200, extra_headers=extra_headers))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


class Raw:
    """A line-level SMTP client for replies the libraries would hide."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", source: str | None = None) -> Raw:
        """Open a connection (from ``source``, a local address, if given)."""
        r, w = await asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None)
        return cls(r, w)

    async def reply(self) -> str:
        """One reply, its lines joined by newlines ("" at end of stream)."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                break
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                break
        return "\n".join(lines)

    async def cmd(self, line: str | bytes) -> str:
        """Send one command line and read its reply."""
        self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def start_tls(self, ca: Any) -> None:
        """Upgrade the connection to TLS (after the server's 220 to STARTTLS), trusting
        ``ca`` (a trustme CA) for the node's certificate."""
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        await asyncio.wait_for(self.writer.start_tls(ctx, server_hostname="127.0.0.1"), 10)

    async def close(self) -> None:
        """Close the connection, ignoring a peer that already went."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def waiting_session(node: Node, raw: Raw, helo: str = "EHLO c.example") -> IngressSession:
    """The in-process node's session of ``raw`` (its only one), after its greeting and
    ``helo``, once its command loop waits for a command (data_received answers then)."""
    from harness.poll import wait_until

    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd(helo)).startswith("250")
    assert node.ingress is not None
    [session] = node.ingress.sessions
    await wait_until(lambda: session._waiting_command, what="the loop waiting for a command")
    return session


def count_calls(obj: Any, name: str) -> list[int]:
    """Count calls of ``obj``'s method ``name`` from now on (the real one still runs)."""
    calls = [0]
    real = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


async def at_354(raw: Raw) -> None:
    """MAIL FROM:<a@example.com>, RCPT TO:<b@example.org> and DATA, each waiting for its
    reply: the session then waits for the body."""
    assert await raw.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert await raw.cmd("RCPT TO:<b@example.org>") == "250 2.1.5 Recipient OK"
    assert (await raw.cmd("DATA")).startswith("354 ")


async def end_in_three_arrivals(raw: Raw, session: IngressSession, body: bytes) -> None:
    """Send ``body`` (ending in CRLF) and the end of data in three arrivals, then NOOP: the
    dot, then the dot and CR, held back by the session (each seen before the next is sent)."""
    from harness.poll import wait_until

    raw.writer.write(body + b".")
    await wait_until(lambda: session._arriving is not None and session._arriving.held == b".",
                     what="the dot held back")
    raw.writer.write(b"\r")
    await wait_until(lambda: session._arriving is not None
                     and session._arriving.held == b".\r", what="the dot and CR held back")
    raw.writer.write(b"\nNOOP\r\n")
