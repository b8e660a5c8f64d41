"""The DATA reader: a message body off the wire, checked, unstuffed, within the budget.

The body is taken in large pieces, not line by line (the per-line loop was the top cost of
ingress): as they arrive, when the session answered DATA in ``data_received``
(:meth:`Body.feed`), else by ``readuntil`` of the end marker. Each piece is checked for line
length and unstuffed on its own, and the pieces are joined once at the end. Its bytes are held
in the node's in-flight budget as they arrive, so many large bodies at once cannot exhaust
memory.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from aiosmtpd.smtp import SMTP

if TYPE_CHECKING:
    from mta.ingress.server import IngressServer

__all__ = ["Body", "DataReader"]

_DOT_LINE = b".\r\n"
_END_OF_DATA = b"\r\n.\r\n"
_STUFFED = re.compile(rb"\r\n\.")
# The reader's limit while in DATA: the body is taken in pieces of at most this much, so the
# reader's own buffer (asyncio pauses the socket at twice its limit) stays small per session.
_BODY_CHUNK = 256 * 1024
# Smaller pieces (lines ending in "." end a readuntil) are gathered into pieces this large,
# so a body of short lines is not held as hundreds of thousands of small objects.
_COALESCE = 64 * 1024

# What is wrong with a body, ranked: the reply names the highest-ranked fault seen.
_FINE, _OVER_BUDGET, _LONG_LINE, _TOO_BIG = range(4)
_FAULT_REPLIES = {
    _OVER_BUDGET: "452 4.3.1 Insufficient system resources for this message now, "
                  "try again later",
    # aiosmtpd's texts: the session's reply rewriting gives them their enhanced codes.
    _LONG_LINE: "500 Line too long (see RFC5321 4.5.3.1.6)",
    _TOO_BIG: "552 5.3.4 Message size exceeds fixed limit",
}


def _scan_lines(data: bytes, prev: bytes, carry: int, max_line: int) -> tuple[int, bool]:
    """Line lengths of the next piece of a stream: returns (length of the line still open at
    its end, whether a line longer than ``max_line`` ended in it). ``carry`` is the length of
    the line open before it, ``prev`` the stream's two bytes before it (a CRLF may straddle)."""
    start, long = 0, False
    if prev[-1:] == b"\r" and data[:1] == b"\n":
        long = carry - 1 > max_line  # that line ended with the CR counted in ``carry``
        carry, start = 0, 1
    last = data.rfind(b"\r\n", start)
    if last < 0:
        return carry + len(data) - start, long
    # From the start of each line (the first began ``carry`` bytes before this piece), the
    # last CRLF within max_line bytes ends every line up to it: no line is too long while
    # one is always found. Most jumps cross many lines (splitting the piece into lines cost
    # 5% of ingress).
    begin = start - carry
    while not long and begin <= last:
        lo, hi = max(begin, start), begin + max_line + 2
        end = data.rfind(b"\r\n", lo, hi) if hi - lo >= 2 else -1  # (hi may be < 0)
        if end < 0:
            long = True
        else:
            begin = end + 2
    return len(data) - last - 2, long


def _unstuff(data: bytes, prev: bytes) -> bytes:
    """Undo dot-stuffing (RFC 5321 4.5.2) in the next piece of a stream (``prev``: its two
    bytes before): without a stuffed line the same object comes back, nothing is copied."""
    if data[:1] == b"." and prev == b"\r\n":
        data = data[1:]
    elif data[:2] == b"\n." and prev[-1:] == b"\r":
        data = b"\n" + data[2:]
    # Searched first: re finds the pattern about twice as fast as bytes.replace scans for it,
    # and most pieces have none.
    return data.replace(b"\r\n.", b"\r\n") if _STUFFED.search(data) else data


def _keep(parts: list[bytes], stage: bytearray, piece: bytes, last: bool) -> bytearray:
    """Add ``piece`` to the body so far (``parts``, then ``stage``); return the stage to go
    on with. Large pieces and the last one are kept as they are (the final join copies)."""
    if len(piece) >= _COALESCE or last:
        if stage:
            parts.append(bytes(stage))
            stage = bytearray()
        parts.append(piece)
        return stage
    stage += piece
    if len(stage) >= _COALESCE:
        parts.append(bytes(stage))
        stage = bytearray()
    return stage


class Body:
    """A body in the making: each piece of the stream checked for line length, unstuffed,
    held in the session's in-flight budget and kept, whichever way the pieces come (the
    reader's ``readuntil`` or ``data_received``)."""

    __slots__ = ("_carry", "_fault", "_limit", "_max_line", "_owner", "_parts", "_size",
                 "_stage", "held", "prev")

    def __init__(self, owner: DataReader) -> None:
        self._owner = owner
        self._limit = owner.data_size_limit or (1 << 30)
        self._max_line = owner.line_length_limit - 2
        self._parts: list[bytes] = []
        self._stage = bytearray()
        self._size = 0  # unstuffed bytes so far
        self._carry = 0  # length of the line still open
        # The stream's last two bytes taken: a "." as the very first line ends the body.
        self.prev = b"\r\n"
        self._fault = _FINE
        # For data_received: the stream's last bytes, not taken yet: they may begin the end
        # of DATA.
        self.held = b""

    def take(self, data: bytes, ended: bool) -> None:
        """The next piece of the stream; ``ended``: the end-of-data line came right after."""
        if data:
            self._carry, long = _scan_lines(data, self.prev, self._carry, self._max_line)
            piece = _unstuff(data, self.prev)
            self.prev = data[-2:] if len(data) >= 2 else (self.prev + data)[-2:]
            size = self._size = self._size + len(piece)
            fault = self._fault
            if long or size > self._limit:
                fault = max(fault, _TOO_BIG if size > self._limit else _LONG_LINE)
            # Only bytes that arrived are held: a SIZE= declaration held up front would let
            # a few idle sessions that declare the maximum shut everyone out of the budget.
            owner = self._owner
            if not fault and size > owner._inflight and not owner._hold(size, self._limit):
                fault = _OVER_BUDGET
            self._fault = fault
            if not fault:
                self._stage = _keep(self._parts, self._stage, piece, ended)
            elif self._parts or self._stage or owner._inflight:  # refused: let go of it
                self._parts, self._stage = [], bytearray()
                owner._release_inflight()

    def feed(self, data: bytes) -> bytes | None:
        """Bytes as they arrived: None while the body goes on, else what follows its end
        (the next commands). Each arrival is taken whole (no copy) unless it ends in what
        may begin the end-of-data line ("." or ".\\r" at a line start): those bytes wait
        for the next arrival to tell."""
        if self.held:
            held = self.held
            joint = held + data[:3 - len(held)]
            if len(joint) < 3:
                self.held = joint
                return None
            self.held = b""
            if joint == _DOT_LINE:
                return data[3 - len(held):]
            self.take(held, False)
        prev = self.prev
        # The end of DATA right at the start of the arrival, its CRLF already taken.
        if prev == b"\r\n" and data[:3] == _DOT_LINE:
            return data[3:]
        if prev[-1:] == b"\r" and data[:4] == b"\n.\r\n":
            self.take(data[:1], True)
            return data[4:]
        end = data.find(_END_OF_DATA)
        if end >= 0:
            self.take(data[:end + 2], True)
            return data[end + len(_END_OF_DATA):]
        tail = data[-4:] if len(data) >= 4 else (prev + data)[-4:]
        keep = 2 if tail.endswith(b"\r\n.\r") else 1 if tail[-3:] == b"\r\n." else 0
        if keep:
            self.held = data[-keep:]
            data = data[:-keep]
        self.take(data, False)
        return None

    def result(self) -> tuple[bytes, str | None]:
        """(unstuffed body, None), or (b"", the reply refusing it)."""
        if self._fault:
            return b"", self._owner._refusal(self._fault, self._size)
        if self._stage:
            self._parts.append(bytes(self._stage))
        return b"".join(self._parts), None


class DataReader(SMTP):
    """The body of a DATA command and the share of the in-flight budget it holds; mixed
    into the ingress session, whose ``smtp_DATA`` calls :meth:`_read_body`."""

    # Set by the session (mta/ingress/session.py).
    _server: IngressServer
    _client_ip: str
    # Bytes of the server's in-flight DATA budget this session holds. A class default, set on
    # the instance only in DATA: the session's __init__ stays aiosmtpd's attributes plus its own.
    _inflight: int = 0

    async def _read_body(self) -> tuple[bytes, str | None]:
        """Read up to the ``.`` line; return (unstuffed body, None) or (b"", error reply).

        Once the budget is full, or the body is refused, the rest is read and dropped (the
        session stays in step with the client) and the reply says why.
        """
        reader = self._reader
        # asyncio keeps the limit in ``_limit`` (aiosmtpd's own STARTTLS code relies on
        # ``_buffer``); lowered or raised here, it is restored below.
        saved = reader._limit  # type: ignore[attr-defined]
        reader._limit = _BODY_CHUNK  # type: ignore[attr-defined]
        body = Body(self)
        try:
            while True:
                try:
                    chunk = await reader.readuntil(_DOT_LINE)
                except asyncio.LimitOverrunError as exc:
                    data, ended = await reader.readexactly(exc.consumed), False
                else:
                    before = chunk[-5:-3] if len(chunk) >= 5 else (body.prev + chunk)[-5:-3]
                    ended = before == b"\r\n"  # ".\r\n" starts a line: the end of DATA
                    data = chunk[:-3] if ended else chunk
                body.take(data, ended)
                if ended:
                    break
        finally:
            reader._limit = saved  # type: ignore[attr-defined]
        return body.result()

    def _refusal(self, fault: int, size: int) -> str:
        """The reply to a body refused for ``fault`` after ``size`` bytes."""
        if fault == _OVER_BUDGET:
            self._server.count_over_budget(self._client_ip, size)
        return _FAULT_REPLIES[fault]

    def _hold(self, total: int, limit: int) -> bool:
        """Hold at least ``total`` bytes of the in-flight budget in all. Taken a piece ahead
        when it fits (a body of short lines would otherwise ask for every line)."""
        server = self._server
        for want in (min(total + _COALESCE, limit), total):
            more = want - self._inflight
            if more <= 0:
                return True
            if server.reserve_data(more):
                self._inflight += more
                return True
        return False

    def _release_inflight(self) -> None:
        """Give back the budget this session holds (the body reached the spool, or not)."""
        if self._inflight:
            self._server.release_data(self._inflight)
            self._inflight = 0
