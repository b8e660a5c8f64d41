"""The fuzz client: one connection that writes what a script says, reads everything the
node sends, and keeps the books on what the node owes."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
import struct
import time

from tests.fuzz.model import (
    _QUEUED_RE,
    Attempt,
    Reply,
    Session,
    SessionOver,
    body_lines,
    data_end_expect,
    headers,
    is_bogus,
    split_at_terminator,
    stuff,
    unstuff,
)
from tests.fuzz.settings import REPLY_WAIT, TIMEOUT

# --- the client --------------------------------------------------------------------------------


class Conn:
    """A fuzz session's connection: writes what the script says, reads everything the node
    sends (in a background task), and keeps the books on what the node owes."""

    def __init__(self, port: int, s: Session, rng: random.Random) -> None:
        self.port, self.s, self.rng = port, s, rng
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()
        self.pos = 0  # parse position in s.received
        self.cursor = 0  # replies consumed by the script
        self.eof = False
        self.closed = False
        self.extended = False
        self.t0 = 0.0
        self.markers = 0

    # connection --------------------------------------------------------------------------

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.t0 = time.monotonic()
        self.task = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        assert self.reader is not None
        try:
            while data := await self.reader.read(1 << 16):
                self.s.received += data
                self._parse()
                self.changed.set()
        except (OSError, ssl.SSLError, EOFError):
            pass
        finally:
            self.eof = True
            if not self.closed:
                self.s.closed_by = "node"
            self.s.eof_at = time.monotonic() - self.t0
            self.changed.set()

    def _parse(self) -> None:
        buf = self.s.received
        while (end := buf.find(b"\r\n", self.pos)) >= 0:
            line = bytes(buf[self.pos:end])
            self.pos = end + 2
            if line[3:4] != b"-":
                text_ = line.decode("utf-8", "replace")
                self.s.replies.append(Reply(text_[:3], text_))

    async def wait_eof(self, timeout: float = REPLY_WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while not self.eof:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True

    async def close(self, how: str) -> None:
        """fin: close without reading on; rst: reset; half: shutdown(SHUT_WR), read to EOF."""
        if self.closed or self.writer is None:
            return
        self.closed = True
        if not self.eof:
            self.s.closed_by = how
        if how == "half" and not self.eof:
            try:
                self.writer.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                pass
            await self.wait_eof()
        if how == "rst":
            sock = self.writer.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def start_tls(self) -> None:
        assert self.writer is not None
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            await asyncio.wait_for(self.writer.start_tls(ctx), REPLY_WAIT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            await self.wait_eof(2)
            raise SessionOver from exc

    # writing -----------------------------------------------------------------------------

    def plan_lines(self, data: bytes) -> None:
        """Account for command lines: one final reply per LF, unrecognised verbs."""
        if self.s.expected is not None:
            self.s.expected += data.count(b"\n")
        self.s.bogus += sum(is_bogus(ln) for ln in data.split(b"\n")[:-1])

    def plan_body(self, att: Attempt, wire: bytes) -> None:
        """Account for message data sent after a 354 (and any commands after its dot)."""
        cut = split_at_terminator(wire)
        if cut is None:
            return
        att.state = "unread"
        if self.s.expected is not None:
            att.reply_index = self.s.expected
            self.s.expected += 1
        self.plan_lines(cut[1])

    async def write(self, data: bytes, *, atomic: bool = False) -> None:
        """Write ``data``: large data in 256 KiB pieces, small data now and then in several
        TCP segments, unless ``atomic`` (one write, as a pipelining client does)."""
        assert self.writer is not None
        s = self.s
        s.sent_bytes += len(data)
        if len(s.sent_head) < 300:
            s.sent_head += data[:300 - len(s.sent_head)]
        try:
            if len(data) > 65536:
                for i in range(0, len(data), 1 << 18):
                    self.writer.write(data[i:i + (1 << 18)])
                    await self.writer.drain()
            elif len(data) > 3 and not atomic and self.rng.random() < 0.25:
                cuts = sorted(self.rng.sample(range(1, len(data)), 3))
                for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    self.writer.write(data[a:b])
                    await self.writer.drain()
                    await asyncio.sleep(0.002)
            else:
                self.writer.write(data)
                await self.writer.drain()
        except (OSError, RuntimeError) as exc:  # the node closed on us
            await self.wait_eof(2)
            raise SessionOver from exc

    async def send_lines(self, lines: list[bytes], eol: bytes = b"\r\n", *,
                         atomic: bool = False) -> None:
        data = b"".join(ln + eol for ln in lines)
        self.plan_lines(data)
        await self.write(data, atomic=atomic)

    async def send_raw(self, data: bytes, *, owes: int | None, atomic: bool = False) -> None:
        """Bytes whose replies the script cannot count line by line."""
        if owes is None:
            self.s.expected = None
        elif self.s.expected is not None:
            self.s.expected += owes
        self.s.bogus += sum(is_bogus(ln) for ln in data.split(b"\n")[:-1])
        await self.write(data, atomic=atomic)

    async def send_body(self, att: Attempt, wire: bytes, *, atomic: bool = False) -> None:
        self.plan_body(att, wire)
        await self.write(wire, atomic=atomic)

    # reading -----------------------------------------------------------------------------

    async def reply(self) -> Reply:
        deadline = time.monotonic() + REPLY_WAIT
        while self.cursor >= len(self.s.replies):
            if self.eof:
                self.s.waiting = True
                raise SessionOver
            self.changed.clear()
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self.changed.wait(), max(left, 0.001))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self.note("stall", f"no reply and no close within {REPLY_WAIT:.0f}s")
                    raise SessionOver from None
        r = self.s.replies[self.cursor]
        self.cursor += 1
        return r

    def note(self, category: str, what: str) -> None:
        self.s.notes.append((category, what))

    def check(self, r: Reply, expect: str, what: bytes) -> None:
        if expect and not any(r.text.startswith(p) for p in expect.split("|")):
            self.note("semantic", f"{what[:80]!r} -> {r.text[:120]!r}, expected {expect}")

    async def cmd(self, line: bytes, expect: str = "") -> Reply:
        await self.send_lines([line])
        r = await self.reply()
        self.check(r, expect, line)
        return r

    async def greet(self) -> None:
        self.check(await self.reply(), "220", b"<connect>")

    async def quit(self) -> None:
        await self.cmd(b"QUIT", "221")
        if not await self.wait_eof():
            self.note("stall", "no close after 221")

    async def wait_close(self) -> None:
        """Send nothing more and wait for the node to end the session (its timeouts)."""
        if not await self.wait_eof(TIMEOUT * 3):
            self.note("stall", f"the node kept an idle session open for {TIMEOUT * 3:.0f}s")

    # messages ----------------------------------------------------------------------------

    def marker(self) -> str:
        self.markers += 1
        return f"fz{self.s.sid}x{self.markers - 1}"

    def register(self, marker: str | None, wire: bytes, *, exact: bool = True) -> Attempt:
        cut = split_at_terminator(wire)
        raw = wire if cut is None else cut[0]
        att = Attempt(marker, unstuff(raw) if exact and marker else None, data_end_expect(raw))
        self.s.attempts.append(att)
        return att

    def message(self, size: int = 1500, *, dots: float = 0.05, eightbit: bool = False,
                std: bool = True, extra: bytes = b"") -> tuple[Attempt, bytes]:
        marker = self.marker()
        content = headers(marker, extra, std=std) + b"\r\n" + body_lines(
            self.rng, size, dots=dots, eightbit=eightbit)
        wire = stuff(content)
        return self.register(marker, wire, exact=std), wire

    async def data_end(self, att: Attempt) -> Reply:
        try:
            r = await self.reply()
        except SessionOver:
            att.state = "unanswered"
            raise
        resolve(att, r)
        self.check(r, att.expect, b"<final dot>")
        return r


def resolve(att: Attempt, r: Reply) -> None:
    att.reply = r.text
    if r.code == "250":
        att.state = "acked"
        m = _QUEUED_RE.search(r.text)
        att.message_id = m.group(1) if m else ""
    else:
        att.state = "refused"
