"""Fuzzing the SMTP ingress: 10,000+ malformed and adversarial sessions against one node process.

One node (NodeProcess) serves every session over real TCP sockets, CONCURRENCY at a time. The
plan is drawn from seeded random.Random instances: ``MTA_FUZZ_SEED`` picks it (printed), and
``MTA_FUZZ_ONLY=12,345`` replays just those sessions of it (every violation names its session).
After the run, the tests below check that every byte the node sent parses as SMTP replies, that it
closed connections only when it was entitled to, answered each command once and as its state
demands, is still alive and takes mail, kept its memory bounded, and that its spool holds exactly
the messages that got a 250 after their final dot.

The bugs this found are listed in FIXED_BUGS; each one's minimal reproduction still runs in
every fuzz run (the "repro" sessions), so they stay fixed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import random
import re
import signal
import smtplib
import socket
import ssl
import struct
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mta.config import SmtpConfig
from tests.helpers import NodeProcess, node_config, read_spool

pytestmark = pytest.mark.timeout(420)

SEED = int(os.environ.get("MTA_FUZZ_SEED", "5321"))
ONLY = {int(x) for x in os.environ.get("MTA_FUZZ_ONLY", "").split(",") if x.strip()}
CONCURRENCY = 80
HEAVY_CONCURRENCY = 3  # sessions moving megabytes at once
TIMEOUT = 5.0  # the node's [smtp] command_timeout and data_timeout
MAX_SIZE = 8 * 1024 * 1024  # the node's max_message_size
MAX_RCPTS = 1000
REPLY_WAIT = 20.0  # a reply the node owes must come by then (it drops idle clients after TIMEOUT)
# Up to 64 MB is the spool's cache of just-accepted bodies (by design); the rest is buffers
# of the multi-megabyte sessions and allocator slack. A leak of even 1 KB per session would
# add 11 MB per run on top; a run measures 145-150 MB of growth.
RSS_GROWTH_BOUND_KB = 200 * 1024
BOGUS_LIMIT = 11  # the node ends a session (421) at this many unrecognised commands
KNOWN_VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
                         "VRFY", "HELP", "AUTH", "STARTTLS", "EXPN"})
USER, PASSWORD = b"alice", b"s3cret"  # the users_file fixture of conftest.py
SHARDS = 4

# Sessions per kind. "slow" and "repro" run first: a few of them wait for the node's timeouts.
PLAN: dict[str, int] = {
    "slow": 10, "repro": 21, "valid": 1200, "overlong": 600, "overlong_mb": 12,
    "binary": 900, "line_endings": 700, "invalid_utf8": 700, "huge": 36, "many_rcpts": 24,
    "out_of_order": 1300, "flood": 450, "disconnect": 1800, "size": 500, "auth": 800,
    "starttls": 400, "dots": 700, "mutate": 1200,
}
HEAVY_KINDS = frozenset({"overlong_mb", "huge"})

# What the fuzzer found in the first version of the ingress (all fixed in mta/ingress/session.py).
FIXED_BUGS: dict[str, str] = {
    "A": "Unknown commands are echoed back raw, control characters included: `FOO\\x00\\rBAR` "
         "gets `500 Error: command \"FOO\\x00\\rBAR\" not recognized` with a NUL and a bare CR "
         "inside the reply line. Repro: printf 'EHLO x\\r\\nFOO\\0\\rBAR\\r\\nQUIT\\r\\n' | nc "
         "127.0.0.1 2525 | od -c",
    "B": "After 5 unrecognised commands the node closes the connection with `502 5.5.1 Too many "
         "unrecognized commands, goodbye.` (RFC 5321 3.8: a server that closes on its own "
         "says 421); when the commands came pipelined the 502 and every reply still buffered are "
         "dropped (the replies to EHLO and the 500s, even a `250 ... queued as` of an earlier "
         "message): a reply-less disconnect. Repro: one write of 'EHLO x\\r\\nA\\r\\nB\\r\\nC\\r\\n"
         "D\\r\\nE\\r\\nF\\r\\nNOOP\\r\\n': the client gets only the 220 greeting, then EOF.",
    "C": "An AUTH response line longer than 1001 octets is answered twice: `500 Error: "
         "(ValueError) Separator is not found, and chunk exceed the limit` (an internal "
         "exception text), then the rest of the line is read as a command and gets `500 5.5.2 "
         "Command line too long`, so every later reply answers the wrong command. Repro: "
         "'EHLO x', 'AUTH PLAIN', then 1200 bytes of 'A', a pause, 1000 more and CRLF, 'NOOP': "
         "the NOOP is answered with the second 500.",
    "D": "Invalid UTF-8 in the EHLO argument, or in the local part of a MAIL FROM or RCPT TO "
         "with SMTPUTF8, is accepted: MAIL/RCPT/DATA get 250/250/354, then the end of DATA is "
         "answered `500 "
         "Error: (UnicodeEncodeError) 'utf-8' codec can't encode ... surrogates not allowed`: a "
         "permanent failure for every message of the session, with a traceback in the log. "
         "Repro: 'EHLO \\xff', 'MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.org>', 'DATA', "
         "'Subject: x', '', 'hi', '.'.",
    "E": "A client half-close (FIN after its last command) cancels the session at once "
         "(aiosmtpd's eof_received): commands already received get no reply, and a message "
         "whose final dot was received is fsynced into the spool but its 250 is never sent, so "
         "the client retries and the message is delivered twice; a FIN before the greeting "
         "leaves the connection open, without a greeting, until command_timeout. Repro: 'EHLO "
         "x', 'MAIL FROM:<a@example.com>', 'RCPT TO:<b@example.org>', 'DATA', wait for 354, "
         "then a 70 KB body + '.\\r\\nQUIT\\r\\n' and shutdown(SHUT_WR): no 250, no 221, and "
         "the message is in the queue.",
    "F": "When one client write holds DATA and the first line of the message, the node holds "
         "back the replies to everything before it (EHLO, MAIL, RCPT, the 354) while it waits "
         "for the rest of the body: a client that waits for the 354 deadlocks until "
         "data_timeout closes the connection without a reply. Repro: one write of 'EHLO x\\r\\n"
         "MAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.org>\\r\\nDATA\\r\\nSubject: x\\r\\n' "
         "gets nothing but the greeting.",
    "G": "`MAIL FROM:<a@example.com> SIZE=\\xc2\\xb2` (SIZE=², a Unicode digit str.isdigit() "
         "accepts but int() does not) is answered `500 Error: (ValueError) invalid literal for "
         "int() with base 10: '²'` instead of 501, leaking an internal exception.",
    "H": "`MAIL FROM:<` (an address that is only an opening angle bracket, or `MAIL FROM:<...` "
         "with no closing one once the MAIL line limit has grown, see I) is answered `500 Error: "
         "(IndexError) string index out of range` (email._header_value_parser.get_angle_addr "
         "on an empty rest), with a traceback in the log. Repro: 'EHLO x', 'MAIL FROM:<'.",
    "I": "The MAIL command line limit is state shared by every session: aiosmtpd keeps "
         "command_size_limits on the class, each EHLO adds 36 to it and each new connection "
         "clears it. So whether a 700-byte MAIL line gets `500 Command line too long` or is "
         "parsed depends on how many EHLOs any session sent since the last connection was "
         "opened (every unknown verb also adds a key to that shared dict). Repro: one write of "
         "31 x 'EHLO x' then 'MAIL FROM:<' + 700 x 'a' + '@example.com>': 501 (parsed) instead "
         "of 500; the same MAIL line right after one EHLO gets 500.",
}


# --- sessions, replies, attempts -------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: str
    text: str  # the last line, decoded


@dataclass
class Attempt:
    """One message a session sent (or began to send)."""

    marker: str | None  # X-Fuzz-Id of the message; None for an empty body
    content: bytes | None  # exactly what the spool must hold after one Received: header
    expect: str  # the reply its final dot deserves
    rcpts: int | None = None  # recipients the node accepted for it
    # incomplete (no final dot sent) | unread (dot sent, reply not read) | acked | refused |
    # unanswered (dot sent, the node closed without a reply)
    state: str = "incomplete"
    reply_index: int | None = None
    message_id: str = ""
    reply: str = ""


@dataclass
class Session:
    sid: int
    kind: str
    sub: str = ""
    received: bytearray = field(default_factory=bytearray)
    replies: list[Reply] = field(default_factory=list)
    sent_head: bytearray = field(default_factory=bytearray)
    sent_bytes: int = 0
    expected: int | None = 1  # final replies the node owes so far (None: unpredictable)
    bogus: int = 0  # unrecognised commands sent
    tls: bool = False  # a STARTTLS got 220: a failed handshake may end the session
    auth_overlong: bool = False
    early_body: bool = False  # DATA and the start of the message went in one write
    closed_by: str = ""  # node | fin | rst | half
    waiting: bool = False  # the script was waiting for a reply when the node closed
    eof_at: float | None = None  # seconds from connect to the node's close
    lasted: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (category, what)


@dataclass(frozen=True)
class Violation:
    category: str
    bug: str | None
    sid: int
    kind: str
    what: str
    sent: str

    def __str__(self) -> str:
        tag = f"known bug {self.bug}" if self.bug else "NEW"
        return (f"[{tag}] {self.category} in session {self.sid} ({self.kind}): {self.what}\n"
                f"    replay: MTA_FUZZ_SEED={SEED} MTA_FUZZ_ONLY={self.sid}; sent {self.sent}")


class SessionOver(Exception):
    """The connection is gone: the script stops there."""


def is_bogus(line: bytes) -> bool:
    """Whether aiosmtpd counts ``line`` (one line, as sent) as an unrecognised command."""
    line = line.rstrip(b"\r\n")
    if not line or len(line) > 512:
        return False  # "bad syntax" / "line too long" come before the verb lookup
    try:
        verb = line.partition(b" ")[0].upper().decode("ascii")
    except UnicodeDecodeError:
        return False
    return verb not in KNOWN_VERBS


# --- message building ------------------------------------------------------------------------

_POOL_RNG = random.Random(SEED)
_ALPHABET = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_!?()<>@/"
POOL = bytes(_POOL_RNG.choice(_ALPHABET) for _ in range(1 << 16))


def text(rng: random.Random, n: int) -> bytes:
    """``n`` printable bytes (no CR/LF), cheaply."""
    out = []
    while n > 0:
        take = min(n, len(POOL) // 2)
        off = rng.randrange(len(POOL) - take)
        out.append(POOL[off:off + take])
        n -= take
    return b"".join(out)


def stuff(content: bytes) -> bytes:
    """The DATA wire form of ``content`` (CRLF-terminated): dot-stuffed, with the final dot."""
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines) + b".\r\n"


def unstuff(raw: bytes) -> bytes:
    """RFC 5321 4.5.2 on the receiving side: drop the first dot of every line."""
    return b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in raw.split(b"\r\n"))


def split_at_terminator(wire: bytes) -> tuple[bytes, bytes] | None:
    """(message before the final dot line, what follows it), or None if not terminated."""
    if wire.startswith(b".\r\n"):
        return b"", wire[3:]
    i = wire.find(b"\r\n.\r\n")
    return None if i < 0 else (wire[:i + 2], wire[i + 5:])


def data_end_expect(raw: bytes) -> str:
    if len(raw) > MAX_SIZE:
        return "552"
    if len(raw) > 998 and max(map(len, raw.split(b"\r\n"))) > 999:
        return "500"
    return "250"


def headers(marker: str, extra: bytes = b"", *, std: bool = True) -> bytes:
    head = [b"From: Fuzz <fuzz@example.com>", b"To: <rcpt@example.org>",
            f"Subject: fuzz {marker}".encode()]
    if std:
        head += [f"Message-ID: <{marker}@fuzz.example>".encode(),
                 b"Date: Mon, 23 Nov 2026 10:00:00 +0000"]
    head.append(f"X-Fuzz-Id: {marker}".encode())
    return b"\r\n".join(head) + b"\r\n" + extra


def body_lines(rng: random.Random, size: int, *, dots: float = 0.05,
               eightbit: bool = False) -> bytes:
    out: list[bytes] = []
    total = 0
    while total < size:
        line = text(rng, rng.randint(0, 120))
        r = rng.random()
        if r < dots:
            line = rng.choice([b".", b"..", b"...", b". ", b".\t"]) + line[:60]
        elif eightbit and r < 0.3:
            line += bytes(rng.randrange(128, 256) for _ in range(rng.randint(1, 8)))
        out.append(line + b"\r\n")
        total += len(out[-1])
    return b"".join(out)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- reply parsing ---------------------------------------------------------------------------

_LINE_RE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.S)
_QUEUED_RE = re.compile(r"queued as ([0-9A-Z]{26})")
_MARKER_RE = re.compile(rb"\r\nX-Fuzz-Id: (fz\d+x\d+)\r\n")
_RECEIVED_RE = re.compile(rb"Received: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)+")


def reply_problems(data: bytes, *, closed_by_node: bool) -> list[tuple[str, str]]:
    """Why ``data`` is not a sequence of SMTP replies: [("framing" | "ctl", what)]."""
    problems: list[tuple[str, str]] = []
    lines = data.split(b"\r\n")
    tail = lines.pop()
    if tail and closed_by_node:
        problems.append(("framing", f"unterminated last line {tail[:80]!r}"))
    open_code: bytes | None = None
    finals = 0
    for line in lines:
        m = _LINE_RE.fullmatch(line)
        if m is None:
            problems.append(("framing", f"not a reply line: {line[:80]!r}"))
            open_code = None
            continue
        code, sep, rest = m.group(1), m.group(2), m.group(3) or b""
        if b"\n" in line:
            problems.append(("framing", f"bare LF inside a reply line: {line[:80]!r}"))
        if open_code is not None and code != open_code:
            problems.append(("framing", f"multi-line reply changes code: {line[:80]!r}"))
        if sep is None and len(line) != 3:
            problems.append(("framing", f"bad separator: {line[:80]!r}"))
        if any((b < 32 and b != 9) or b == 127 for b in rest):
            problems.append(("ctl", f"control characters in reply text: {line[:100]!r}"))
        try:
            rest.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(("framing", f"reply text is not UTF-8: {line[:80]!r}"))
        if finals == 0 and sep != b"-" and code not in (b"220", b"421", b"554"):
            problems.append(("framing", f"greeting is not 220/421/554: {line[:80]!r}"))
        open_code = code if sep == b"-" else None
        finals += sep != b"-"
    if open_code is not None and closed_by_node:
        problems.append(("framing", "multi-line reply never finished"))
    return problems


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


# --- shared script pieces ------------------------------------------------------------------

HELO_NAMES = [b"client.example", b"[127.0.0.1]", b"localhost", b"x", b"mail.fuzz.example"]


async def hello(c: Conn, rng: random.Random, extended: bool | None = None) -> None:
    if extended is None:
        extended = rng.random() < 0.9
    verb = rng.choice([b"EHLO", b"ehlo", b"Ehlo"] if extended else [b"HELO", b"helo"])
    await c.cmd(verb + b" " + rng.choice(HELO_NAMES), "250")
    c.extended = extended


async def transaction(c: Conn, rng: random.Random, att: Attempt, wire: bytes, *,
                      rcpts: int = 1, mail: bytes = b"MAIL FROM:<fuzz@example.com>",
                      expect_mail: str = "250", expect_rcpt: str = "250",
                      pipelined: bool = False) -> None:
    """MAIL, RCPT x n, DATA, the message, and its reply (RFC 2920 groups when pipelined)."""
    cmds = [mail, *[b"RCPT TO:<r%d@example.org>" % i for i in range(rcpts)], b"DATA"]
    if pipelined:
        await c.send_lines(cmds)
        rs = [await c.reply() for _ in cmds]
    else:
        rs = [await c.cmd(x) for x in cmds]
    c.check(rs[0], expect_mail, cmds[0])
    if rs[0].code == "250":
        for x, r in zip(cmds[1:-1], rs[1:-1], strict=True):
            c.check(r, expect_rcpt, x)
    att.rcpts = sum(r.code == "250" for r in rs[1:-1])
    if rs[0].code == "250" and att.rcpts:
        c.check(rs[-1], "354", b"DATA")
    if rs[-1].code != "354":
        return
    await c.send_body(att, wire)
    await c.data_end(att)


async def simple_transaction(c: Conn, rng: random.Random, size: int = 1500,
                             **kw: Any) -> Attempt:
    att, wire = c.message(size)
    await transaction(c, rng, att, wire, **kw)
    return att


# --- session kinds -------------------------------------------------------------------------


async def k_valid(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng)
    if c.extended and rng.random() < 0.15:
        await c.cmd(b"AUTH PLAIN " + b64(b"\0" + USER + b"\0" + PASSWORD), "235")
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        size = rng.choice([100, 1500, 1500, 8000, 60000])
        att, wire = c.message(size, dots=rng.choice([0.0, 0.05, 0.3]),
                              eightbit=rng.random() < 0.2, std=rng.random() < 0.85)
        mail = b"MAIL FROM:<fuzz@example.com>"
        if c.extended:
            mail += rng.choice([b"", b" SIZE=%d" % len(wire), b" BODY=8BITMIME",
                                b" BODY=7BIT SIZE=%d" % len(wire)])
            if rng.random() < 0.1:
                mail = b"MAIL FROM:<>"
        await transaction(c, rng, att, wire, rcpts=rng.randint(1, 5), mail=mail,
                          pipelined=c.extended and rng.random() < 0.4)
        if rng.random() < 0.2:
            await c.cmd(rng.choice([b"RSET", b"NOOP"]), "250")
    await c.quit()


async def k_overlong(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    for _ in range(rng.randint(1, 3)):
        n = rng.choice([rng.randint(600, 990), rng.randint(1010, 20000),
                        rng.randint(20000, 300000)])
        verb = rng.choice([b"MAIL FROM:<", b"RCPT TO:<", b"NOOP ", b"EHLO ", b"VRFY ",
                           b"HELP ", b"XYZZY ", b"", b"AUTH PLAIN "])
        filler = rng.choice([b"a", b"x@", b"<>", b" ", b"\x00", b"\xff", b"."])
        line = (verb + filler * n)[:n]
        await c.cmd(line, "500")
    await c.cmd(b"NOOP", "250")
    if rng.random() < 0.5:
        await simple_transaction(c, rng)
    await c.quit()


async def k_overlong_mb(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    n = rng.randint(1, 4) * 1024 * 1024 + rng.randint(0, 999)
    line = rng.choice([b"MAIL FROM:<", b"RCPT TO:<", b"NOOP ", b""]) + text(rng, n)
    c.s.sub = rng.choice(["then_continue", "then_continue", "no_eol_fin", "no_eol_half"])
    if c.s.sub == "then_continue":
        await c.cmd(line, "500")
        await c.cmd(b"NOOP", "250")
        await simple_transaction(c, rng)
        await c.quit()
    else:
        await c.send_raw(line, owes=0)
        await c.close(c.s.sub.rsplit("_", 1)[1])


def binary_line(rng: random.Random) -> bytes:
    def junk(n: int) -> bytes:
        return bytes(rng.choice([rng.randrange(256), 0, 13, 0xFF]) for _ in range(n))

    v = rng.randrange(5)
    if v == 0:
        line = junk(rng.randint(1, 300))
    elif v == 1:
        line = rng.choice([b"MAIL FROM:<", b"RCPT TO:<", b"VRFY ", b"HELP ", b"NOOP ",
                           b"EHLO "]) + junk(rng.randint(1, 80)) + b">"
    elif v == 2:
        base = rng.choice([b"NOOP", b"RSET", b"MAIL FROM:<a@example.com>", b"HELP"])
        i = rng.randrange(len(base) + 1)
        line = base[:i] + junk(rng.randint(1, 3)) + base[i:]
    elif v == 3:
        line = b"\x00" * rng.randint(1, 50)
    else:
        line = junk(rng.randint(1, 20)) + b" " + junk(rng.randint(1, 20))
    return line.replace(b"\n", b"\x00")


async def k_binary(c: Conn, rng: random.Random) -> None:
    await c.greet()
    if rng.random() < 0.7:
        await hello(c, rng)
    for _ in range(rng.randint(1, 8)):
        line = binary_line(rng)
        if is_bogus(line) and c.s.bogus >= BOGUS_LIMIT - 1:
            continue
        if line.rstrip(b"\r").upper().startswith((b"QUIT", b"DATA", b"AUTH", b"STARTTLS")):
            continue
        await c.cmd(line, "2|5")
    await c.cmd(b"RSET", "250")
    await c.quit()


async def k_line_endings(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(["lf_session", "lf_body", "cr_commands", "mixed_eol", "smuggle"])
    if v == "lf_session":  # every command ends in a bare LF
        for line, exp in [(b"EHLO lf.example", "250"), (b"MAIL FROM:<lf@example.com>", "250"),
                          (b"RCPT TO:<r@example.org>", "250"), (b"DATA", "354")]:
            await c.send_lines([line], eol=b"\n")
            c.check(await c.reply(), exp, line)
        att, wire = c.message(rng.choice([300, 3000]))
        await c.send_body(att, wire)
        await c.data_end(att)
        await c.send_lines([b"QUIT"], eol=b"\n")
        c.check(await c.reply(), "221", b"QUIT")
        await c.wait_eof()
        return
    await hello(c, rng, extended=True)
    if v == "lf_body":  # message lines end in bare LF, the end of data is CRLF.CRLF
        await c.cmd(b"MAIL FROM:<lf@example.com>", "250")
        await c.cmd(b"RCPT TO:<r@example.org>", "250")
        await c.cmd(b"DATA", "354")
        marker = c.marker()
        lf = b"".join(text(rng, rng.randint(0, 40)) + rng.choice([b"\n", b"\n.\n", b"\n..\n"])
                      for _ in range(rng.randint(1, 12)))
        wire = headers(marker) + b"\r\n" + lf[:900] + b"\r\n.\r\n"
        att = c.register(marker, wire)
        await c.send_body(att, wire)
        await c.data_end(att)
    elif v == "cr_commands":  # bare CR is not a line end: the whole thing is one line
        parts = [b"NOOP", b"MAIL FROM:<cr@example.com>", b"RCPT TO:<r@example.org>", b"RSET"]
        line = b"\r".join(rng.sample(parts, rng.randint(2, 4))) + rng.choice([b"", b"\r"])
        await c.cmd(line, "2|5")
        await c.cmd(b"RSET", "250")
    elif v == "mixed_eol":
        for line in [b"NOOP", b"RSET", b"MAIL FROM:<m@example.com>", b"RCPT TO:<r@example.org>",
                     b"RSET", b"VRFY r@example.org"]:
            eol = rng.choice([b"\r\n", b"\n", b"\r\r\n", b"\n\r\n", b" \r\n"])
            data = line + eol
            c.plan_lines(data)
            await c.write(data)
            for _ in range(data.count(b"\n")):
                await c.reply()
    else:  # "smuggle": fake end-of-data sequences followed by a second transaction
        await c.cmd(b"MAIL FROM:<outer@example.com>", "250")
        await c.cmd(b"RCPT TO:<r@example.org>", "250")
        await c.cmd(b"DATA", "354")
        outer, inner = c.marker(), c.marker()
        fake = rng.choice([b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                           b"\r\n\x00.\r\n", b"\r\n .\r\n", b"\r\n.\x00\r\n"])
        smuggled = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
                    + headers(inner) + b"\r\nsmuggled\r\n")
        wire = headers(outer) + b"\r\nouter text" + fake + smuggled + b".\r\n"
        if not wire.endswith(b"\r\n.\r\n"):
            wire = wire[:-3] + b"\r\n.\r\n"
        c.s.attempts.append(Attempt(inner, None, "-"))  # must never become a message of its own
        att = c.register(outer, wire)
        await c.send_body(att, wire)
        await c.data_end(att)
    await c.quit()


BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
            b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3"]


async def k_invalid_utf8(c: Conn, rng: random.Random) -> None:
    await c.greet()
    bad = rng.choice(BAD_UTF8)
    v = c.s.sub = rng.choice(["ehlo", "mail", "rcpt", "domain", "args", "body"])
    if v == "ehlo":
        await c.cmd(b"EHLO bad" + bad + b".example", "250")
    else:
        await hello(c, rng, extended=True)
    utf8 = rng.choice([b"", b" SMTPUTF8"])
    if v == "ehlo":
        await simple_transaction(c, rng, rng.choice([200, 2000]))
    elif v == "body":  # 8-bit, invalid UTF-8 text: a body is bytes, the node must keep them
        marker = c.marker()
        wire = stuff(headers(marker) + b"\r\n" + bad + b"\r\n" + body_lines(
            rng, 500, eightbit=True) + bad + b"\r\n")
        await transaction(c, rng, c.register(marker, wire), wire)
    elif v in ("mail", "rcpt", "domain"):
        mail, rcpt = b"MAIL FROM:<m@example.com>" + utf8, b"RCPT TO:<r@example.org>"
        if v == "mail":
            mail = b"MAIL FROM:<m" + bad + b"x@example.com>" + utf8
        elif v == "rcpt":
            rcpt = b"RCPT TO:<r" + bad + b"x@example.org>"
        else:
            rcpt = b"RCPT TO:<r@exa" + bad + b"mple.org>"
        r = await c.cmd(mail, "250|501|553|555")
        if r.code == "250":
            r = await c.cmd(rcpt, "250|501|553|555")
            if r.code == "250":  # accepted: then the message must be accepted too
                await c.cmd(b"DATA", "354")
                att, wire = c.message(500)
                await c.send_body(att, wire)
                await c.data_end(att)
    else:
        for verb in rng.sample([b"VRFY ", b"HELP ", b"NOOP ", b"EXPN ", b"AUTH PLAIN ",
                                b"AUTH ", b"RSET "], 3):
            await c.cmd(verb + bad, "2|5")
    await c.quit()


async def k_huge(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    v = c.s.sub = rng.choice(["many_headers", "many_headers", "long_header_line", "oversize",
                              "folded"])
    marker = c.marker()
    target = rng.randint(1, 7) * 1024 * 1024
    if v == "many_headers":
        extra = b"".join(b"X-Hdr-%d: %s\r\n" % (i, text(rng, rng.randint(20, 900)))
                         for i in range(target // 460))
    elif v == "long_header_line":
        extra = b"X-Long: " + text(rng, rng.choice([1100, 50000, 2 * 1024 * 1024])) + b"\r\n"
    elif v == "oversize":
        extra = b"".join(b"X-Big-%d: %s\r\n" % (i, text(rng, 900))
                         for i in range((MAX_SIZE + rng.randint(512, 2048) * 1024) // 900))
    else:
        extra = b"X-Fold: start\r\n" + b"".join(
            b"\t" + text(rng, rng.randint(1, 200)) + b"\r\n" for _ in range(target // 100))
    wire = stuff(headers(marker, extra) + b"\r\nbody\r\n")
    att = c.register(marker, wire)
    mail = b"MAIL FROM:<huge@example.com>"
    if rng.random() < 0.5:  # and a SIZE= that lies
        mail += b" SIZE=%d" % rng.choice([1, 1000, len(wire) // 2])
    await transaction(c, rng, att, wire, mail=mail)
    await c.quit()


async def k_many_rcpts(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    await c.cmd(b"MAIL FROM:<many@example.com>", "250")
    n = rng.choice([1000, 1001, 1200, 2000, 3000])
    lines: list[bytes] = []
    expects: list[str] = []
    good = 0
    for i in range(n):
        if rng.random() < 0.02:
            lines.append(rng.choice([b"RCPT TO:<nodomain>", b"RCPT TO:<a@b>", b"RCPT TO:"]))
            expects.append("501")
        else:
            lines.append(b"RCPT TO:<r%d@example.org>" % i)
            expects.append("250" if good < MAX_RCPTS else "452")
            good += 1
    await c.send_lines(lines)
    accepted = 0
    for line, exp in zip(lines, expects, strict=True):
        r = await c.reply()
        c.check(r, exp, line)
        accepted += r.code == "250"
    await c.cmd(b"DATA", "354")
    att, wire = c.message(800)
    att.rcpts = accepted
    await c.send_body(att, wire)
    await c.data_end(att)
    await c.quit()


class Model:
    """The SMTP state a correct node is in, and the reply each simple command deserves."""

    VERBS = ("noop", "rset", "helo", "mail", "mail", "mail_bad", "rcpt", "rcpt", "rcpt_bad",
             "data", "data_arg", "vrfy", "expn", "help", "quit_arg", "unknown", "unknown")

    def __init__(self) -> None:
        self.helo = False
        self.mail = False
        self.rcpts = 0

    def step(self, rng: random.Random, *, bogus_ok: bool, allow_data: bool) -> tuple[bytes, str]:
        def case(b: bytes) -> bytes:
            return b.lower() if rng.random() < 0.2 else b

        verb = rng.choice(self.VERBS)
        if verb == "noop":
            return case(b"NOOP") + rng.choice([b"", b" ignored", b"   "]), "250"
        if verb == "rset":
            self.mail, self.rcpts = False, 0
            return case(b"RSET"), "250"
        if verb == "helo":
            self.helo, self.mail, self.rcpts = True, False, 0
            return case(rng.choice([b"EHLO", b"HELO"])) + b" model.example", "250"
        if verb == "mail":
            line = case(b"MAIL FROM:") + rng.choice(
                [b"<m@example.com>", b" <m@example.com>", b"<>", b"<m@example.com>   "])
            if not self.helo or self.mail:
                return line, "503"
            self.mail = True
            return line, "250"
        if verb == "mail_bad":
            line = rng.choice([b"MAIL FROM:", b"MAIL TO:<m@example.com>", b"MAIL"])
            return line, "501" if self.helo else "503"
        if verb == "rcpt":
            line = case(b"RCPT TO:") + rng.choice(
                [b"<r@example.org>", b" <r@example.org>", b"<R@Example.ORG>  "])
            if not self.helo or not self.mail:
                return line, "503"
            if self.rcpts >= MAX_RCPTS:
                return line, "452"
            self.rcpts += 1
            return line, "250"
        if verb == "rcpt_bad":
            line = rng.choice([b"RCPT TO:<nodomain>", b"RCPT TO:<a@b>", b"RCPT FROM:<r@ex.org>",
                               b"RCPT"])
            return line, "501" if self.helo and self.mail else "503"
        if verb == "data":
            if not self.helo or not self.rcpts:
                return case(b"DATA"), "503"
            if not allow_data:
                self.mail, self.rcpts = False, 0
                return b"RSET", "250"
            self.mail, self.rcpts = False, 0
            return case(b"DATA"), "354"
        if verb == "data_arg":
            return b"DATA now", "501" if self.helo and self.rcpts else "503"
        if verb == "vrfy":
            return rng.choice([(b"VRFY r@example.org", "252"), (b"VRFY", "501")])
        if verb == "expn":
            return b"EXPN list", "502"
        if verb == "help":
            return rng.choice([(b"HELP", "250"), (b"HELP MAIL", "250"), (b"HELP NOSUCH", "501")])
        if verb == "quit_arg":
            return b"QUIT now", "501"
        if bogus_ok:
            word = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-") for _ in range(
                rng.randint(1, 10)))
            return rng.choice([b"BDAT 100 LAST", b"BDAT 0", word, b"  NOOP", b"TURN",
                               b"ETRN example.org", b"XCLIENT ADDR=1.2.3.4", b"MAIL_FROM:<a@b.c>",
                               b"SEND FROM:<a@example.com>", word + b" " + word]), "500"
        return b"NOOP", "250"


async def k_out_of_order(c: Conn, rng: random.Random) -> None:
    await c.greet()
    m = Model()
    c.s.sub = rng.choice(["model", "model", "model", "model", "bogus_limit"])
    if c.s.sub == "bogus_limit":  # sequential unknown verbs past the node's limit
        await hello(c, rng, extended=True)
        for i in range(rng.randint(BOGUS_LIMIT - 1, BOGUS_LIMIT + 1)):
            await c.cmd(b"XFUZZ%d" % i, "500" if i < BOGUS_LIMIT - 1 else "500|421")
        await c.quit()
        return
    for _ in range(rng.randint(3, 14)):
        line, expect = m.step(rng, bogus_ok=c.s.bogus < BOGUS_LIMIT - 1, allow_data=True)
        r = await c.cmd(line, expect)
        if r.code == "354":
            att, wire = c.message(rng.choice([200, 2000]))
            await c.send_body(att, wire)
            await c.data_end(att)
    await c.quit()


async def k_flood(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(["clean", "clean", "clean_body", "clean_body", "junk"])
    lines = [b"EHLO flood.example"]
    expects = ["250"]
    if v == "junk":  # past aiosmtpd's limit of unrecognised commands, in one write
        for _ in range(rng.randint(6, 300)):
            lines.append(rng.choice([b"XYZZY", b"BDAT 1 LAST", b"\x01\x02", b"  NOOP", b"FOO BAR"]))
            expects.append("500|421")
        lines += [b"NOOP", b"QUIT"]
        expects += ["250|421", "221|421"]
        await c.send_lines(lines, atomic=True)
        for line, exp in zip(lines, expects, strict=True):
            c.check(await c.reply(), exp, line)
        await c.wait_eof()
        return
    m = Model()
    m.helo = True
    bogus = 0
    for _ in range(rng.randint(100, 600)):
        line, exp = m.step(rng, bogus_ok=bogus < BOGUS_LIMIT - 2, allow_data=False)
        bogus += is_bogus(line)
        lines.append(line)
        expects.append(exp)
    data = b"".join(ln + b"\r\n" for ln in lines)
    c.plan_lines(data)
    att: Attempt | None = None
    if v == "clean_body":  # the whole transaction, body and QUIT included, in the same write
        tx = [b"RSET", b"MAIL FROM:<flood@example.com>", b"RCPT TO:<r@example.org>", b"DATA"]
        tx_data = b"".join(ln + b"\r\n" for ln in tx)
        c.plan_lines(tx_data)
        att, wire = c.message(rng.choice([300, 3000]))
        att.rcpts = 1
        c.plan_body(att, wire)
        data += tx_data + wire
        expects += ["250", "250", "250", "354", att.expect]
        lines += [*tx, b"<final dot>"]
    c.plan_lines(b"QUIT\r\n")
    await c.write(data + b"QUIT\r\n", atomic=rng.random() < 0.7)
    for line, exp in zip([*lines, b"QUIT"], [*expects, "221"], strict=True):
        r = await c.reply()
        c.check(r, exp, line)
        if att is not None and line == b"<final dot>":
            resolve(att, r)
    await c.wait_eof()


DISCONNECT_STAGES = ["connect", "greeting", "ehlo", "mid_command", "mail", "rcpt", "data",
                     "mid_body", "before_dot", "dot_only", "dot_cr", "after_dot", "after_quit"]


async def k_disconnect(c: Conn, rng: random.Random) -> None:
    stage = rng.choice(DISCONNECT_STAGES)
    how = rng.choice(["fin", "rst", "half"])
    c.s.sub = f"{stage}/{how}"
    if stage != "connect":
        await c.greet()
    if stage in ("connect", "greeting"):
        await c.close(how)
        return
    await hello(c, rng, extended=True)
    if stage == "mid_command":
        await c.send_raw(rng.choice([b"MAIL FROM:<a@exa", b"RCPT", b"NOOP", b"EH", b"DATA\r"]),
                         owes=0)
    if stage in ("ehlo", "mid_command"):
        await c.close(how)
        return
    await c.cmd(b"MAIL FROM:<disc@example.com>", "250")
    if stage == "mail":
        await c.close(how)
        return
    await c.cmd(b"RCPT TO:<r@example.org>", "250")
    if stage == "rcpt":
        await c.close(how)
        return
    await c.cmd(b"DATA", "354")
    if stage == "data":
        await c.close(how)
        return
    att, wire = c.message(rng.choice([500, 5000, 100000]))
    att.rcpts = 1
    cut = {"mid_body": rng.randrange(1, len(wire) - 3), "before_dot": len(wire) - 3,
           "dot_only": len(wire) - 2, "dot_cr": len(wire) - 1}.get(stage, len(wire))
    await c.send_body(att, wire[:cut])
    if stage == "after_quit":
        await c.data_end(att)
        await c.send_lines([b"QUIT"])
    await c.close(how)


async def k_slow(c: Conn, rng: random.Random) -> None:
    """Sessions the node has to end with its timeouts (few: each takes TIMEOUT)."""
    v = c.s.sub = ["idle_greeting", "idle_ehlo", "idle_mail", "mid_data", "mid_data",
                   "bare_cr", "partial_line", "starttls_garbage", "idle_greeting",
                   "mid_data"][c.s.sid % 10]
    await c.greet()
    if v != "idle_greeting":
        await hello(c, rng, extended=True)
    if v in ("idle_mail", "mid_data"):
        await c.cmd(b"MAIL FROM:<slow@example.com>", "250")
    if v == "mid_data":
        await c.cmd(b"RCPT TO:<r@example.org>", "250")
        await c.cmd(b"DATA", "354")
        att, wire = c.message(4000)
        await c.send_body(att, wire[:rng.randrange(1, len(wire) - 3)])
    elif v == "bare_cr":
        await c.send_raw(b"NOOP\rNOOP\r", owes=0)
    elif v == "partial_line":
        await c.send_raw(b"MAIL FROM:<slo", owes=0)
    elif v == "starttls_garbage":  # plaintext after STARTTLS in the same write: ignored
        c.s.tls = True
        await c.send_raw(b"STARTTLS\r\nNOOP\r\nGARBAGE\r\n", owes=1)
        c.check(await c.reply(), "220", b"STARTTLS")
    await c.wait_close()


AUTH_VARIANTS = ["no_mech", "bad_mech", "plain_not_b64", "plain_no_nul", "plain_wrong",
                 "plain_ok", "login_ok", "login_abort", "login_garbage", "plain_empty",
                 "too_many", "before_ehlo", "after_helo", "overlong_response", "login_binary",
                 "binary_mech", "plain_wrong"]


async def k_auth(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(AUTH_VARIANTS)
    if v == "before_ehlo":
        await c.cmd(b"AUTH PLAIN " + b64(b"\0alice\0s3cret"), "503")
        await c.quit()
        return
    await hello(c, rng, extended=v != "after_helo")
    ok = b"\0" + USER + b"\0" + PASSWORD
    steps: list[tuple[bytes, str]] = {
        "no_mech": [(b"AUTH", "501")],
        "bad_mech": [(b"AUTH " + rng.choice([b"CRAM-MD5", b"XOAUTH2", b"GSSAPI", b"X"]), "504")],
        "plain_not_b64": [(b"AUTH PLAIN !!not*base64", "501")],
        "plain_no_nul": [(b"AUTH PLAIN " + b64(b"alice s3cret"), "501")],
        "plain_wrong": [(b"AUTH PLAIN " + b64(b"\0alice\0" + text(rng, 8)), "535|454")],
        "plain_ok": [(b"AUTH PLAIN " + b64(ok), "235"), (b"AUTH PLAIN " + b64(ok), "503")],
        "login_ok": [(b"AUTH LOGIN", "334"), (b64(USER), "334"), (b64(PASSWORD), "235")],
        "login_abort": [(b"AUTH LOGIN", "334"), (b"*", "501")],
        "login_garbage": [(b"AUTH LOGIN", "334"), (b"!" + binary_line(rng)[:50], "501")],
        "plain_empty": [(b"AUTH PLAIN", "334"), (b"", "501")],
        "too_many": [(b"AUTH PLAIN a b c", "501")],
        "after_helo": [(b"AUTH PLAIN " + b64(ok), "500|503")],
        "login_binary": [(b"AUTH LOGIN " + b64(b"\xff\x00" + text(rng, 5)), "334"),
                         (b64(b"x"), "535|454")],
        "binary_mech": [(b"AUTH \x01\x02\xff", "504")],
        "overlong_response": [(b"AUTH PLAIN", "334")],
    }[v]
    for line, exp in steps:
        await c.cmd(line, exp)
    if v == "overlong_response":  # more than the line limit before its CRLF arrives
        c.s.auth_overlong = True
        n = rng.randint(1100, 200000)
        await c.send_raw(b"A" * 1100, owes=0)
        await asyncio.sleep(0.05)
        await c.send_lines([b"A" * (n - 1100)])
        c.check(await c.reply(), "501|500 5.5.2", b"<overlong AUTH response>")
        await c.cmd(b"NOOP", "250")
    if v in ("plain_ok", "login_ok"):
        await simple_transaction(c, rng)
    await c.quit()


async def k_starttls(c: Conn, rng: random.Random) -> None:
    await c.greet()
    v = c.s.sub = rng.choice(["arg", "garbage_after", "handshake", "handshake", "twice",
                              "before_ehlo", "partial_hello", "injection"])
    if v != "before_ehlo":
        await hello(c, rng, extended=rng.random() < 0.9)
    if v == "arg":
        await c.cmd(b"STARTTLS " + rng.choice([b"now", b"\x00", b"TLS1.3"]), "501")
        await c.cmd(b"NOOP", "250")
        await c.quit()
        return
    if v == "injection":  # commands pipelined after STARTTLS must be thrown away
        c.s.tls = True
        await c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nNOOP\r\n", owes=1)
        c.check(await c.reply(), "220", b"STARTTLS")
    else:
        c.s.tls = True
        await c.cmd(b"STARTTLS", "220")
    if v == "garbage_after":
        junk = bytes([rng.randrange(0x17, 256)]) + bytes(
            rng.randrange(256) for _ in range(rng.randint(20, 500)))
        await c.send_raw(junk, owes=0)
        await c.wait_close()
        return
    if v == "partial_hello":
        await c.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + text(rng, 20), owes=0)
        await c.close(rng.choice(["fin", "rst"]))
        return
    await c.start_tls()
    await hello(c, rng, extended=True)
    if v == "injection" or rng.random() < 0.6:  # an injected MAIL would make this one nested
        await simple_transaction(c, rng)
    if v == "twice":
        r = await c.cmd(b"STARTTLS", "220|454|503|554")
        if r.code == "220":  # a TLS layer inside TLS is more than this client does
            await c.close("fin")
            return
    await c.quit()


async def k_size(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    param, expect = rng.choice([
        (b"SIZE=1", "250"), (b"SIZE=0", "250"), (b"SIZE=%d" % rng.randint(2, 10**6), "250"),
        (b"SIZE=%d" % MAX_SIZE, "250"), (b"SIZE=%d" % (MAX_SIZE + 1), "552"),
        (b"SIZE=99999999999999999999999999999", "552"), (b"SIZE=-1", "501"),
        (b"SIZE=abc", "501"), (b"SIZE=", "501"), (b"SIZE", "501"), (b"SIZE=1e9", "501"),
        (b"SIZE=0x10", "501"), (b"SIZE=00000000000000000042", "250"),
        (b"SIZE=10 SIZE=20", "250"), (b"size=100", "250"), (b"SIZE=+5", "501"),
        (b"SIZE=\xb2", "501"), (b"SIZE=5 BODY=8BITMIME", "250"), (b"SIZE=5 BODY=9BIT", "501"),
    ])
    c.s.sub = param.decode("ascii", "replace")
    att, wire = c.message(rng.choice([100, 5000, 50000]))
    await transaction(c, rng, att, wire, mail=b"MAIL FROM:<size@example.com> " + param,
                      expect_mail=expect)
    await c.quit()


async def k_dots(c: Conn, rng: random.Random) -> None:
    await c.greet()
    await hello(c, rng, extended=True)
    v = c.s.sub = rng.choice(["stuffed", "unstuffed", "premature", "near_terminators", "empty",
                              "only_dots", "no_final_crlf", "first_line_dot", "split_terminator",
                              "dot_space"])
    await c.cmd(b"MAIL FROM:<dots@example.com>", "250")
    await c.cmd(b"RCPT TO:<r@example.org>", "250")
    await c.cmd(b"DATA", "354")
    marker = c.marker()
    head = headers(marker) + b"\r\n"
    if v == "stuffed":
        wire = stuff(head + body_lines(rng, rng.choice([200, 3000]), dots=0.5))
    elif v == "unstuffed":  # lines starting with a dot the client forgot to stuff
        wire = head + b"a\r\n.hidden\r\n..two\r\n.\t\r\nz\r\n.\r\n"
    elif v == "premature":  # a lone unstuffed dot ends the message; the rest are commands
        rest = rng.sample([b"NOOP", b"RSET", b"HELP", b"VRFY r@example.org"], rng.randint(1, 3))
        wire = head + b"first part\r\n.\r\n" + b"".join(r + b"\r\n" for r in rest) + b".\r\n"
    elif v == "near_terminators":
        fakes = [b"\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r\n .\r\n",
                 b"\r\n.\x00\r\n", b"\r\n..\r\n"]
        wire = head + b"x" + b"x".join(rng.sample(fakes, rng.randint(1, len(fakes)))) + \
            b"x\r\n.\r\n"
    elif v == "empty":
        wire = b".\r\n"
    elif v == "only_dots":
        wire = stuff(head + b"".join(b"." * rng.randint(1, 5) + b"\r\n" for _ in range(20)))
    elif v == "no_final_crlf":  # "abc.\r\n" is not an end of data: one more is needed
        wire = head + b"abc.\r\n" + b"\r\n.\r\n"
    elif v == "first_line_dot":
        wire = stuff(b".first line starts with a dot\r\n" + head)
    elif v == "dot_space":
        wire = head + b". \r\n.. \r\n . \r\n.\r\n"
    else:  # "split_terminator": the final CRLF.CRLF arrives byte by byte
        wire = stuff(head + b"body\r\n")
    att = c.register(None if v in ("empty", "first_line_dot") else marker, wire)
    if v == "split_terminator":
        c.plan_body(att, wire)
        for piece in (wire[:-5], wire[-5:-4], wire[-4:-3], wire[-3:-2], wire[-2:-1], wire[-1:]):
            await c.write(piece)
            await asyncio.sleep(0.01)
    else:
        await c.send_body(att, wire)
    r = await c.data_end(att)
    if v == "premature" and r.code == "250":
        cut = split_at_terminator(wire)
        assert cut is not None
        for line in cut[1].split(b"\r\n")[:-1]:
            c.check(await c.reply(), "2|5", line)
    await c.quit()


def mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    lines = list(lines)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        line = lines[i]
        op = rng.randrange(9)
        pos = rng.randrange(len(line) + 1)
        if op == 0 and line:
            lines[i] = line[:pos] + bytes([rng.randrange(256)]) + line[pos + 1:]
        elif op == 1:
            lines[i] = line[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))) \
                + line[pos:]
        elif op == 2:
            lines[i] = line[:pos] + line[pos + rng.randint(1, 8):]
        elif op == 3:
            lines.insert(i, line)
        elif op == 4:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 5:
            lines[i] = line.swapcase()
        elif op == 6:
            lines[i] = line[:pos] + rng.choice([b"\r", b"\n", b"\x00", b" ", b"\t"]) + line[pos:]
        elif op == 7:
            lines.insert(i, binary_line(rng))
        elif len(lines) > 1:
            del lines[i]
    return lines


async def k_mutate(c: Conn, rng: random.Random) -> None:
    await c.greet()
    marker = c.marker()
    content = f"X-Fuzz-Id: {marker}\r\nSubject: m\r\n\r\nbody\r\n".encode()
    lines = [b"EHLO mutant.example", b"MAIL FROM:<mut@example.com>", b"RCPT TO:<r@example.org>",
             *rng.sample([b"NOOP", b"RSET", b"VRFY r@example.org", b"HELP",
                          b"RCPT TO:<s@example.org>", b"MAIL FROM:<x@example.com>"], 2),
             b"DATA"]
    if rng.random() < 0.3:
        lines.insert(1, b"AUTH PLAIN " + b64(b"\0" + USER + b"\0" + PASSWORD))
    lines = mutate(rng, lines)
    eol = rng.choice([b"\r\n", b"\r\n", b"\n"])
    stream = b"".join(ln + eol for ln in lines) + stuff(content) + b"\r\n.\r\nQUIT\r\n"
    c.s.attempts.append(Attempt(marker, None, "", state="unread"))
    await c.send_raw(stream, owes=None)
    await c.wait_eof()


async def k_repro(c: Conn, rng: random.Random) -> None:
    """The minimal reproductions of FIXED_BUGS, each run every time."""
    bug = c.s.sub = "AABBCCDDEEEEEFFGGHHII"[c.s.sid % 21]
    await c.greet()
    if bug == "A":
        await c.cmd(b"EHLO x", "250")
        await c.cmd(b"FOO\x00\rBAR", "500")
    elif bug == "B" and c.s.sid % 21 == 3:  # the 250 of a stored message goes down too
        await c.cmd(b"EHLO x", "250")
        await c.cmd(b"MAIL FROM:<a@example.com>", "250")
        await c.cmd(b"RCPT TO:<b@example.org>", "250")
        await c.cmd(b"DATA", "354")
        att, wire = c.message(300)
        att.rcpts = 1
        await c.send_body(att, wire + b"A\r\nB\r\nC\r\nD\r\nE\r\nNOOP\r\n", atomic=True)
        await c.data_end(att)
        for exp in ["500"] * 5 + ["250"]:  # under the limit: every reply comes
            c.check(await c.reply(), exp, b"<pipelined>")
    elif bug == "B":
        await c.send_lines([b"EHLO x", b"A", b"B", b"C", b"D", b"E", b"F", b"NOOP"], atomic=True)
        for exp in ["250", "500", "500", "500", "500", "500|421", "500|421", "250|421"]:
            c.check(await c.reply(), exp, b"<pipelined>")
    elif bug == "C":
        await c.cmd(b"EHLO x", "250")
        await c.cmd(b"AUTH PLAIN", "334")
        c.s.auth_overlong = True
        await c.send_raw(b"A" * 1200, owes=0)
        await asyncio.sleep(0.1)
        await c.send_lines([b"A" * 1000])
        c.check(await c.reply(), "501|500 5.5.2", b"<overlong AUTH response>")
        await c.cmd(b"NOOP", "250")
    elif bug == "D":
        await c.cmd(b"EHLO \xff", "250")
        await simple_transaction(c, rng, 200)
    elif bug == "E":
        await c.cmd(b"EHLO x", "250")
        await c.cmd(b"MAIL FROM:<a@example.com>", "250")
        await c.cmd(b"RCPT TO:<b@example.org>", "250")
        await c.cmd(b"DATA", "354")
        att, wire = c.message(70000)
        att.rcpts = 1
        await c.send_body(att, wire)
        await c.send_lines([b"QUIT"])
        await c.close("half")
        return
    elif bug == "F":
        c.s.early_body = True
        await c.send_raw(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                         b"DATA\r\nSubject: x\r\n", owes=4, atomic=True)
        for exp in ["250", "250", "250", "354"]:
            c.check(await c.reply(), exp, b"<pipelined>")
        marker = c.marker()
        wire = headers(marker) + b"\r\nbody\r\n.\r\n"
        att = c.register(marker, b"Subject: x\r\n" + wire)
        await c.send_body(att, wire)
        await c.data_end(att)
    elif bug == "G":
        await c.cmd(b"EHLO x", "250")
        await c.cmd(b"MAIL FROM:<a@example.com> SIZE=\xc2\xb2", "250|501|552")
    elif bug == "H":
        await c.cmd(b"EHLO x", "250")
        await c.cmd(b"MAIL FROM:<", "501")
    else:  # I: in one write, so that no other connection resets the shared limit meanwhile
        line = b"MAIL FROM:<" + b"a" * 700 + b"@example.com>"
        await c.send_lines([b"EHLO x"] * 31 + [line], atomic=True)
        for _ in range(31):
            c.check(await c.reply(), "250", b"EHLO x")
        c.check(await c.reply(), "500", line)
    await c.quit()


KINDS: dict[str, Callable[[Conn, random.Random], Awaitable[None]]] = {
    "slow": k_slow, "repro": k_repro, "valid": k_valid, "overlong": k_overlong,
    "overlong_mb": k_overlong_mb, "binary": k_binary, "line_endings": k_line_endings,
    "invalid_utf8": k_invalid_utf8, "huge": k_huge, "many_rcpts": k_many_rcpts,
    "out_of_order": k_out_of_order, "flood": k_flood, "disconnect": k_disconnect,
    "size": k_size, "auth": k_auth, "starttls": k_starttls, "dots": k_dots, "mutate": k_mutate,
}


# --- running the plan ------------------------------------------------------------------------


def make_plan() -> list[tuple[int, str]]:
    rng = random.Random(SEED)
    first = ["slow"] * PLAN["slow"] + ["repro"] * PLAN["repro"]
    rest = [k for k, n in PLAN.items() if k not in ("slow", "repro") for _ in range(n)]
    rng.shuffle(rest)
    plan = list(enumerate(first + rest))
    return [(sid, kind) for sid, kind in plan if not ONLY or sid in ONLY]


async def run_session(port: int, sid: int, kind: str) -> Session:
    s = Session(sid, kind)
    rng = random.Random(f"{SEED}/{sid}")
    c = Conn(port, s, rng)
    try:
        await c.open()
        await KINDS[kind](c, rng)
    except SessionOver:
        pass
    except Exception:
        c.note("client", traceback.format_exc(limit=4))
    finally:
        if c.writer is not None and not c.closed:
            await c.close("fin")
        s.lasted = time.monotonic() - c.t0 if c.t0 else 0.0
    return s


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def run_plan(port: int, pid: int, plan: list[tuple[int, str]]) -> tuple[list[Session], int]:
    sem = asyncio.Semaphore(CONCURRENCY)
    heavy = asyncio.Semaphore(HEAVY_CONCURRENCY)
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, rss_kb(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    async def one(sid: int, kind: str) -> Session:
        async with sem:
            if kind in HEAVY_KINDS:
                async with heavy:
                    return await run_session(port, sid, kind)
            return await run_session(port, sid, kind)

    sampler = asyncio.create_task(sample())
    sessions = await asyncio.gather(*(one(sid, kind) for sid, kind in plan))
    done.set()
    await sampler
    return list(sessions), peak


# --- judging ---------------------------------------------------------------------------------


def judge(s: Session) -> list[tuple[str, str]]:
    """Every problem with one session's replies and its end: [(category, what)]."""
    out = list(s.notes)
    by_node = s.closed_by in ("node", "half")
    out += reply_problems(bytes(s.received), closed_by_node=by_node)
    out += [("internal", r.text) for r in s.replies if r.text.startswith("500 Error: (")]
    last = s.replies[-1].text if s.replies else ""
    owed = (s.expected - len(s.replies)) if s.expected is not None else int(s.waiting)
    if s.expected is not None and len(s.replies) > s.expected:
        out.append(("count", f"{len(s.replies)} replies to {s.expected} commands"))
    if by_node and last[:3] not in ("221", "421") and not (s.tls and last.startswith("220")):
        timed_out = (s.eof_at or 0.0) >= 0.9 * TIMEOUT
        if owed > 0 or (s.closed_by == "node" and not timed_out):
            eof_at = s.eof_at or 0.0
            out.append(("disconnect", f"the node closed the connection {eof_at:.2f}s in "
                                      f"after {last[:60]!r}, owing {max(owed, 0)} replies"))
    # What the client can tell about its messages, from the replies' positions.
    for att in s.attempts:
        if att.state == "unread" and by_node and att.reply_index is not None:
            if att.reply_index < len(s.replies):
                resolve(att, s.replies[att.reply_index])
            else:
                att.state = "unanswered"
    return out


def judge_spool(sessions: list[Session], stored: dict[str, Any],
                final_id: str) -> list[tuple[Session | None, str]]:
    """The spool must hold exactly the messages that got a 250 after their final dot."""
    problems: list[tuple[Session | None, str]] = []
    owner: dict[str, tuple[Session, Attempt]] = {}
    acked_ids: dict[str, tuple[Session, Attempt]] = {}
    for s in sessions:
        for att in s.attempts:
            if att.marker:
                owner[att.marker] = (s, att)
            if att.state == "acked":
                acked_ids[att.message_id] = (s, att)
    session_of_id: dict[str, Session] = {}
    for s in sessions:
        for r in s.replies:
            if m := _QUEUED_RE.search(r.text):
                session_of_id[m.group(1)] = s
    seen: Counter[str] = Counter()
    for mid, msg in stored.items():
        if mid == final_id:
            continue
        end = msg.body.find(b"\r\n\r\n")
        m = _MARKER_RE.search(msg.body, 0, len(msg.body) if end < 0 else end + 2)
        if m is None:
            if mid not in acked_ids and mid not in session_of_id:
                problems.append((None, f"stored message {mid} that no session sent: "
                                       f"{msg.body[:200]!r}"))
            continue
        marker = m.group(1).decode()
        seen[marker] += 1
        if marker not in owner:
            problems.append((None, f"stored message {mid} with unknown marker {marker}"))
            continue
        s, att = owner[marker]
        if att.state == "acked" and att.message_id == mid:
            continue
        if att.state == "unread":
            if att.reply_index is not None or s.closed_by not in ("node", "half"):
                continue  # the client closed before it could read the reply: either way
            if session_of_id.get(mid) is s:
                continue  # read to the end (a mutated session): its "queued as" named this
        problems.append((s, f"message {marker} is in the spool as {mid} but its session "
                            f"{'named ' + att.message_id if att.message_id else 'got no 250'} "
                            f"(state {att.state}, reply {att.reply[:60]!r})"))
    for marker, n in seen.items():
        if n > 1:
            problems.append((owner[marker][0], f"message {marker} stored {n} times"))
    for mid, (s, att) in acked_ids.items():
        msg = stored.get(mid)
        if msg is None:
            problems.append((s, f"acknowledged message {mid} ({att.marker}) is not in the spool"))
            continue
        if att.content is not None:
            prefix = msg.body[:len(msg.body) - len(att.content)]
            if not msg.body.endswith(att.content) or not _RECEIVED_RE.fullmatch(prefix):
                problems.append((s, f"message {mid} ({att.marker}) stored as {msg.body[:300]!r}"
                                    f", expected one Received: header + {att.content[:200]!r}"))
        if att.rcpts is not None and len(msg.envelope.recipients) != att.rcpts:
            problems.append((s, f"message {mid} has {len(msg.envelope.recipients)} "
                                f"recipients, {att.rcpts} were accepted"))
    for mid, s in session_of_id.items():  # every "queued as" a client saw is kept
        if mid not in stored:
            problems.append((s, f"message {mid} was answered 250 but is not in the spool"))
    return problems


@dataclass
class FuzzRun:
    sessions: list[Session]
    violations: list[Violation]
    seconds: float
    rss_before: int
    rss_after: int
    rss_peak: int
    final_reply: tuple[int, bytes]
    final_stored: bool
    alive_after_run: bool
    exit_code: int | None
    node_log: str

    def of(self, *categories: str, bug: str | None = None) -> list[Violation]:
        return [v for v in self.violations if v.category in categories and v.bug == bug]


def collect(sessions: list[Session], stored: dict[str, Any], final_id: str) -> list[Violation]:
    out: list[Violation] = []

    def add(s: Session | None, category: str, what: str) -> None:
        bug = None  # every problem is new: the known ones are fixed
        out.append(Violation(category, bug, s.sid if s else -1, f"{s.kind}/{s.sub}" if s else "-",
                             what, repr(bytes(s.sent_head)) if s else "-"))

    for s in sessions:
        for category, what in judge(s):
            add(s, category, what)
    for s, what in judge_spool(sessions, stored, final_id):
        add(s, "spool", what)
    return out


def describe(violations: list[Violation], limit: int = 12) -> str:
    kinds = Counter(v.kind.split("/")[0] for v in violations)
    head = "\n".join(str(v) for v in violations[:limit])
    return f"{len(violations)} violations (by kind: {dict(kinds)}):\n{head}"


# --- the run -----------------------------------------------------------------------------------


FINAL = (b"From: <final@example.com>\r\nTo: <r@example.org>\r\nSubject: after the fuzz\r\n"
         b"Message-ID: <final@fuzz.example>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
         b"\r\nThe node still takes mail.\r\n")


def node_smtp_options(users_file: str, tls_files: tuple[str, str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "max_connections": 4000, "max_connections_per_ip": 4000,
        "command_timeout": f"{TIMEOUT:g}s", "data_timeout": f"{TIMEOUT:g}s",
        "max_message_size": "8M", "max_recipients": MAX_RCPTS,
        "users_file": users_file, "tls_cert": tls_files[0], "tls_key": tls_files[1],
    }
    # Password guessing defences (when this node has them) would lock 127.0.0.1 out of AUTH
    # after a few of the fuzzer's wrong passwords; AUTH parsing is what is fuzzed here.
    known = {f.name for f in dataclasses.fields(SmtpConfig)}
    for key, value in {"auth_max_failures": 1_000_000, "auth_failure_delay": "1ms"}.items():
        if key in known:
            opts[key] = value
    return opts


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory, users_file: str,
         tls_files: tuple[str, str]) -> Iterator[FuzzRun]:
    workdir = tmp_path_factory.mktemp("fuzz")
    raw = node_config(workdir / "spool", smtp=node_smtp_options(users_file, tls_files))
    # A fixed mmap threshold: glibc then returns every freed multi-megabyte buffer to the
    # system, so RSS shows what the node holds, not the heap its dynamic threshold leaves behind
    # after the megabyte lines and messages (that alone is ~85 MB more, and no leak).
    node = NodeProcess(workdir, raw, env={"MALLOC_MMAP_THRESHOLD_": "131072"}).start()
    try:
        assert node.proc is not None
        pid = node.proc.pid
        plan = make_plan()
        print(f"\nfuzz: MTA_FUZZ_SEED={SEED}, {len(plan)} sessions, node pid {pid}")
        rss_before = rss_kb(pid)
        t0 = time.monotonic()
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            sessions, peak = runner.run(run_plan(node.smtp_port, pid, plan))
        seconds = time.monotonic() - t0
        alive = node.proc.poll() is None
        final: tuple[int, bytes] = (0, b"")
        if alive:
            with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30) as smtp:
                smtp.ehlo("after.example")
                smtp.mail("final@example.com")
                smtp.rcpt("r@example.org")
                final = smtp.data(FINAL)
            rss_after = rss_kb(pid)
        else:
            rss_after = 0
        node.signal(signal.SIGTERM)
        exit_code = node.wait(60)
    finally:
        node.kill()
    stored = read_spool(workdir / "spool", SHARDS)
    final_id = final[1].decode(errors="replace").rsplit(" ", 1)[-1]
    final_stored = final_id in stored and stored[final_id].body.endswith(FINAL)
    violations = collect(sessions, stored, final_id)
    run = FuzzRun(sessions, violations, seconds, rss_before, rss_after, max(peak, rss_after),
                  final, final_stored, alive, exit_code, node.log())
    kinds = Counter(s.kind for s in sessions)
    print(f"fuzz: {len(sessions)} sessions in {seconds:.1f}s: "
          + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    print(f"fuzz: node RSS before {rss_before} kB, after {rss_after} kB (growth "
          f"{rss_after - rss_before} kB), peak {run.rss_peak} kB")
    print(f"fuzz: {len(stored)} messages in the spool, "
          f"{sum(a.state == 'acked' for s in sessions for a in s.attempts)} acknowledged")
    yield run


# --- the checks ------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_drove_ten_thousand_sessions(fuzz: FuzzRun) -> None:
    client = fuzz.of("client")
    assert not client, "the fuzzer itself failed:\n" + describe(client)
    if ONLY:
        pytest.skip("MTA_FUZZ_ONLY replays part of the plan")
    assert len(fuzz.sessions) >= 10_000
    assert {s.kind for s in fuzz.sessions} == set(PLAN)
    acked = sum(a.state == "acked" for s in fuzz.sessions for a in s.attempts)
    assert acked >= 1000, f"only {acked} messages accepted: the fuzz hardly reached DATA"


@pytest.mark.slow
def test_node_survived_and_still_takes_mail(fuzz: FuzzRun) -> None:
    assert fuzz.alive_after_run, "the node died during the fuzz:\n" + fuzz.node_log[-3000:]
    code, text_ = fuzz.final_reply
    assert code == 250, (code, text_)
    assert fuzz.final_stored, "the final message is not in the spool"
    assert fuzz.exit_code == 0, fuzz.node_log[-3000:]


@pytest.mark.slow
def test_every_byte_sent_back_is_a_well_formed_reply(fuzz: FuzzRun) -> None:
    bad = fuzz.of("framing", "ctl")
    assert not bad, describe(bad)


@pytest.mark.slow
def test_node_closes_connections_only_when_entitled(fuzz: FuzzRun) -> None:
    bad = fuzz.of("disconnect", "stall")
    assert not bad, describe(bad)


@pytest.mark.slow
def test_one_reply_per_command_as_the_state_demands(fuzz: FuzzRun) -> None:
    bad = fuzz.of("count", "semantic", "internal")
    assert not bad, describe(bad)


@pytest.mark.slow
def test_memory_stays_bounded(fuzz: FuzzRun) -> None:
    print(f"node RSS before {fuzz.rss_before} kB, after {fuzz.rss_after} kB, "
          f"peak {fuzz.rss_peak} kB")
    assert fuzz.rss_after - fuzz.rss_before < RSS_GROWTH_BOUND_KB


@pytest.mark.slow
def test_spool_holds_exactly_the_acknowledged_messages(fuzz: FuzzRun) -> None:
    bad = fuzz.of("spool")
    assert not bad, describe(bad)
