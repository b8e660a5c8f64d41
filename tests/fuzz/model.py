"""What a fuzz session is and what a correct node does: sessions, replies and attempts,
the messages sent, reply parsing, and the SMTP state model."""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass, field

from tests.fuzz.settings import KNOWN_VERBS, MAX_RCPTS, MAX_SIZE, SEED

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


class Model:
    """The SMTP state a correct node is in, and the reply each simple command deserves."""

    VERBS = ("noop", "rset", "helo", "mail", "mail", "mail_bad", "rcpt", "rcpt", "rcpt_bad",
             "data", "data_arg", "vrfy", "expn", "help", "quit_arg", "unknown", "unknown")

    def __init__(self) -> None:
        self.helo = False
        self.mail = False
        self.rcpts = 0

    def step(self, rng: random.Random, *, bogus_ok: bool, allow_data: bool) -> tuple[bytes, str]:
        """A random next command and the reply it deserves; the state moves on with it."""
        verb = rng.choice(self.VERBS)
        handler = getattr(self, f"_{verb}", None)
        if handler is not None:
            return handler(rng, allow_data)  # type: ignore[no-any-return]
        if bogus_ok:  # "unknown"
            word = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-") for _ in range(
                rng.randint(1, 10)))
            return rng.choice([b"BDAT 100 LAST", b"BDAT 0", word, b"  NOOP", b"TURN",
                               b"ETRN example.org", b"XCLIENT ADDR=1.2.3.4", b"MAIL_FROM:<a@b.c>",
                               b"SEND FROM:<a@example.com>", word + b" " + word]), "500"
        return b"NOOP", "250"

    @staticmethod
    def _case(rng: random.Random, b: bytes) -> bytes:
        return b.lower() if rng.random() < 0.2 else b

    def _noop(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        return self._case(rng, b"NOOP") + rng.choice([b"", b" ignored", b"   "]), "250"

    def _rset(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        self.mail, self.rcpts = False, 0
        return self._case(rng, b"RSET"), "250"

    def _helo(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        self.helo, self.mail, self.rcpts = True, False, 0
        return self._case(rng, rng.choice([b"EHLO", b"HELO"])) + b" model.example", "250"

    def _mail(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        line = self._case(rng, b"MAIL FROM:") + rng.choice(
            [b"<m@example.com>", b" <m@example.com>", b"<>", b"<m@example.com>   "])
        if not self.helo or self.mail:
            return line, "503"
        self.mail = True
        return line, "250"

    def _mail_bad(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        line = rng.choice([b"MAIL FROM:", b"MAIL TO:<m@example.com>", b"MAIL"])
        return line, "501" if self.helo else "503"

    def _rcpt(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        line = self._case(rng, b"RCPT TO:") + rng.choice(
            [b"<r@example.org>", b" <r@example.org>", b"<R@Example.ORG>  "])
        if not self.helo or not self.mail:
            return line, "503"
        if self.rcpts >= MAX_RCPTS:
            return line, "452"
        self.rcpts += 1
        return line, "250"

    def _rcpt_bad(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        line = rng.choice([b"RCPT TO:<nodomain>", b"RCPT TO:<a@b>", b"RCPT FROM:<r@ex.org>",
                           b"RCPT"])
        return line, "501" if self.helo and self.mail else "503"

    def _data(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        if not self.helo or not self.rcpts:
            return self._case(rng, b"DATA"), "503"
        if not allow_data:
            self.mail, self.rcpts = False, 0
            return b"RSET", "250"
        self.mail, self.rcpts = False, 0
        return self._case(rng, b"DATA"), "354"

    def _data_arg(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        return b"DATA now", "501" if self.helo and self.rcpts else "503"

    def _vrfy(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        return rng.choice([(b"VRFY r@example.org", "252"), (b"VRFY", "501")])

    def _expn(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        return b"EXPN list", "502"

    def _help(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        return rng.choice([(b"HELP", "250"), (b"HELP MAIL", "250"), (b"HELP NOSUCH", "501")])

    def _quit_arg(self, rng: random.Random, allow_data: bool) -> tuple[bytes, str]:
        return b"QUIT now", "501"
