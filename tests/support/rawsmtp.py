"""A raw scripted SMTP server on loopback, in the test's event loop: every line it reads and
every reply it writes are the test's, so a test can see how a client groups its commands."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib

from mta.delivery import pipelining

__all__ = ["RawServer", "pipelining_client"]


@dataclass
class RawServer:
    """Answers EHLO (with PIPELINING if ``pipelining``), MAIL/RCPT/RSET 250, DATA 354, the
    message 250, QUIT 221; ``script(line)`` may answer a command line instead (None: the
    default). ``hold_until``: keep replies back until a line starting with it has been read
    (a client that waits for the MAIL reply before its next command then never gets one).
    ``close_after``: close the connection right after answering a line starting with it.
    ``delay(line)``: seconds to wait before answering a command line (a slow or tarpitting
    server; None or 0: at once). ``hold_messages``: never answer the final dot of the first
    that many messages (until ``let_go`` is set: then their connections close);
    ``message_delay``: seconds to wait before answering each final dot. ``partial``: what was
    read of each message cut off in DATA."""

    host: str
    port: int
    pipelining: bool = True
    script: Callable[[bytes], bytes | None] | None = None
    hold_until: bytes | None = None
    close_after: bytes | None = None
    message_reply: bytes = b"250 2.0.0 queued\r\n"
    delay: Callable[[bytes], float] | None = None
    hold_messages: int = 0
    message_delay: float = 0.0
    lines: list[bytes] = field(default_factory=list)  # every command line, in order
    messages: list[bytes] = field(default_factory=list)  # every message ended by its dot
    cut_in_data: int = 0  # connections that ended in the middle of a message
    partial: list[bytes] = field(default_factory=list)
    dots: int = 0  # final dots read
    let_go: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0
    _server: asyncio.Server | None = None
    _held: list[bytes] = field(default_factory=list)
    _writer: asyncio.StreamWriter | None = None

    def verbs(self) -> list[bytes]:
        """The first four letters of every command line, upper case."""
        return [line[:4].upper() for line in self.lines]

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._session, self.host, self.port)
        return self

    def release(self) -> None:
        """Stop holding replies back; send those held (the latest connection's)."""
        self.hold_until = None
        if self._writer is not None and self._held:
            self._writer.write(b"".join(self._held))
            self._held.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _reply(self, line: bytes) -> bytes:
        if self.script is not None and (scripted := self.script(line)) is not None:
            return scripted
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-raw\r\n" + (b"250-PIPELINING\r\n" if self.pipelining else b"") + \
                b"250-8BITMIME\r\n250 SMTPUTF8\r\n"
        return {b"DATA": b"354 go ahead\r\n", b"QUIT": b"221 bye\r\n"}.get(verb, b"250 ok\r\n")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        self.connections += 1
        writer.write(b"220 raw ESMTP\r\n")
        held = self._held = []
        self._writer = writer
        try:
            while line := await reader.readline():
                self.lines.append(line.rstrip(b"\r\n"))
                if self.delay is not None and (pause := self.delay(line)):
                    await asyncio.sleep(pause)
                reply = self._reply(line)
                held.append(reply)
                holding = self.hold_until is not None and line[:4].upper() not in (b"EHLO",
                                                                                  b"HELO")
                if not holding or line.upper().startswith(self.hold_until or b""):
                    writer.write(b"".join(held))
                    held.clear()
                if self.close_after is not None and line.upper().startswith(self.close_after):
                    await writer.drain()
                    break
                if line[:4].upper() == b"QUIT":
                    break
                if reply.startswith(b"354") and not await self._message(reader, writer):
                    break
        finally:
            writer.close()

    async def _message(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> bool:
        body = bytearray()
        while line := await reader.readline():
            if line == b".\r\n":
                self.messages.append(bytes(body))
                self.dots += 1
                if self.dots <= self.hold_messages:
                    await self.let_go.wait()  # never answers
                    return False
                if self.message_delay:
                    await asyncio.sleep(self.message_delay)
                writer.write(self.message_reply)
                return True
            body += line
        self.partial.append(bytes(body))
        self.cut_in_data += 1
        return False


async def pipelining_client(replies: Callable[[bytes], bytes | None], *, drip: bool = False,
                            slow: bytes = b"", delay: float = 0.0
                            ) -> tuple[aiosmtplib.SMTP, asyncio.Server, list[bytes]]:
    """aiosmtplib, with mta's pipelining protocol, connected and past EHLO to a server on
    loopback that offers PIPELINING and answers each other line with ``replies(line)`` (None:
    no answer): a byte at a time if ``drip``, ``delay`` seconds late for lines starting with
    ``slow``. Returns the client, the server and every line the server read."""
    pipelining.install()
    got: list[bytes] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 x\r\n")
        while line := await reader.readline():
            got.append(line)
            reply = (b"250-x\r\n250 PIPELINING\r\n" if line.startswith(b"EHLO")
                     else replies(line))
            if not reply:
                continue
            if slow and line.startswith(slow):
                await asyncio.sleep(delay)  # a slow server, not synchronisation
            for piece in [reply[i:i + 1] for i in range(len(reply))] if drip else [reply]:
                writer.write(piece)
                await writer.drain()
                if drip:
                    await asyncio.sleep(0)
        writer.close()

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    assert pipelining.can_pipeline(smtp)
    return smtp, server, got
