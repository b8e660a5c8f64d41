"""A raw scripted SMTP server on loopback, in the test's event loop: every line it reads and
every reply it writes are the test's, so a test can see how a client groups its commands."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RawServer"]


@dataclass
class RawServer:
    """Answers EHLO (with PIPELINING if ``pipelining``), MAIL/RCPT/RSET 250, DATA 354, the
    message 250, QUIT 221; ``script(line)`` may answer a command line instead (None: the
    default). ``hold_until``: keep replies back until a line starting with it has been read
    (a client that waits for the MAIL reply before its next command then never gets one).
    ``close_after``: close the connection right after answering a line starting with it.
    ``delay(line)``: seconds to wait before answering a command line (a slow or tarpitting
    server; None or 0: at once)."""

    host: str
    port: int
    pipelining: bool = True
    script: Callable[[bytes], bytes | None] | None = None
    hold_until: bytes | None = None
    close_after: bytes | None = None
    message_reply: bytes = b"250 2.0.0 queued\r\n"
    delay: Callable[[bytes], float] | None = None
    lines: list[bytes] = field(default_factory=list)  # every command line, in order
    messages: list[bytes] = field(default_factory=list)  # every message ended by its dot
    cut_in_data: int = 0  # connections that ended in the middle of a message
    connections: int = 0
    _server: asyncio.Server | None = None
    _held: list[bytes] = field(default_factory=list)
    _writer: asyncio.StreamWriter | None = None

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
                writer.write(self.message_reply)
                return True
            body += line
        self.cut_in_data += 1
        return False
