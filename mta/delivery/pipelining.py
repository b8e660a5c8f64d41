"""SMTP PIPELINING (RFC 2920) for outbound transactions: MAIL, every RCPT and DATA in one write.

aiosmtplib sends a command and waits for its reply before the next one: four round trips per
message (MAIL, RCPT, DATA, the message), each a write, a wake-up and a timer on both sides of
the connection. Its protocol keeps only the first reply of a packet and drops data that
arrives while no command waits, so it cannot read a group's replies either.
:class:`PipeliningProtocol` is aiosmtplib's protocol with :meth:`~PipeliningProtocol.exchange`
(write a group of commands, collect each of their replies, in order); :func:`install` makes
aiosmtplib connect with it. Commands sent one at a time work exactly as before, and servers
that do not advertise PIPELINING get them one at a time.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

import aiosmtplib
import aiosmtplib.smtp as _smtp
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

from mta.delivery.smtpdata import normalize_line_endings, stuff_periods

__all__ = ["PipeliningProtocol", "body", "can_pipeline", "envelope", "install",
           "mail_command", "rcpt_command"]

# An address aiosmtplib's quote_address would return unchanged inside <>: no specials,
# one @, no whitespace or controls. Anything else goes through the library's parser.
_PLAIN_ADDRESS = re.compile(r'[^\x00-\x20\x7f<>()\[\]\\,;:@"]+@[^\x00-\x20\x7f<>()\[\]\\,;:@"]+')
_DOMAIN_UNAVAILABLE = 421


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol that can also read the replies of a pipelined group."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # The group being read: its replies so far (kept afterwards, so a caller can tell
        # whether any reply came before the connection failed), how many are still owed,
        # and futures for its first reply and for all of them.
        self.received: list[SMTPResponse] = []
        self._owed = 0
        self._first: asyncio.Future[None] | None = None
        self._all: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._all is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        self._collect()

    def _collect(self) -> None:
        try:
            while self._owed:
                response = self._read_response_from_buffer()
                if response is None:
                    if len(self._buffer) > MAX_RESPONSE_LENGTH:
                        raise aiosmtplib.SMTPResponseException(
                            aiosmtplib.SMTPStatus.invalid_response, "Response too long")
                    break
                self.received.append(response)
                self._owed -= 1
        except aiosmtplib.SMTPException as exc:
            self._fail(exc)
            return
        if self.received and self._first is not None and not self._first.done():
            self._first.set_result(None)
        if not self._owed and self._all is not None and not self._all.done():
            self._all.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        for fut in (self._first, self._all):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: nobody may be waiting any more

    def connection_lost(self, exc: Exception | None) -> None:
        if self._all is not None and not self._all.done():
            if self.received and self.received[-1].code == _DOMAIN_UNAVAILABLE:
                # 421 and gone (RFC 5321 3.8): the replies it did not send are that 421.
                self._owed = 0
                self._collect()
            else:
                lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
                lost.__cause__ = exc
                self._fail(lost)
        super().connection_lost(exc)

    async def exchange(self, data: bytes, replies: int, timeout: float | None,
                       first_timeout: float | None = None) -> list[SMTPResponse]:
        """Write ``data`` (whole command lines, or a message and its final dot) and return
        the next ``replies`` replies in order; fewer only when the server said 421 and
        closed. ``first_timeout`` bounds the wait for the first reply, ``timeout`` each
        wait after it. Raises SMTPServerDisconnected, SMTPReadTimeoutError, or
        SMTPResponseException for a malformed reply."""
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            self.received = []
            self._owed = replies
            self._first = self._loop.create_future()
            self._all = self._loop.create_future()
            try:
                self.write(data)
                self._collect()  # as aiosmtplib does: whatever the buffer already holds
                try:
                    if first_timeout is not None and not self._first.done():
                        await asyncio.wait_for(self._first, first_timeout)
                    await asyncio.wait_for(self._all, timeout)
                except TimeoutError:
                    raise aiosmtplib.SMTPReadTimeoutError(
                        "Timed out waiting for server response") from None
            finally:
                self._first = self._all = None
                self._owed = 0
        return self.received


def install() -> None:
    """Make aiosmtplib connect with :class:`PipeliningProtocol` (idempotent)."""
    _smtp.SMTPProtocol = PipeliningProtocol  # type: ignore[misc]


def can_pipeline(smtp: aiosmtplib.SMTP) -> bool:
    """Does this connection's server take pipelined commands, and can we read them?"""
    return isinstance(smtp.protocol, PipeliningProtocol) and smtp.supports_extension(
        "pipelining")


def _command(verb: bytes, *args: bytes) -> bytes:
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join((verb, *args)) + b"\r\n"


def _quoted(address: str, encoding: str) -> bytes:
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>".encode(encoding)
    return quote_address(address).encode(encoding)


def mail_command(sender: str, options: Iterable[str], encoding: str) -> bytes:
    """The MAIL line aiosmtplib would send. Raises ValueError (nothing may be sent)."""
    return _command(b"MAIL", b"FROM:" + _quoted(sender, encoding),
                    *(option.encode("ascii") for option in options))


def rcpt_command(recipient: str, encoding: str) -> bytes:
    """The RCPT line aiosmtplib would send. Raises ValueError (nothing may be sent)."""
    return _command(b"RCPT", b"TO:" + _quoted(recipient, encoding))


async def envelope(smtp: aiosmtplib.SMTP, commands: list[bytes], timeout: float,
                   first_timeout: float | None = None) -> list[SMTPResponse]:
    """Send ``commands`` (MAIL, RCPTs, DATA) in one write; one reply per command, in order.
    A connection that fails or times out is closed, as aiosmtplib closes it."""
    return await _exchange(smtp, b"".join(commands), len(commands), timeout, first_timeout)


async def body(smtp: aiosmtplib.SMTP, message: bytes, timeout: float) -> SMTPResponse:
    """After DATA's 354: the message (line endings made CRLF, dot-stuffed) and the final
    dot; its reply."""
    data = stuff_periods(normalize_line_endings(message)) + b".\r\n"
    return (await _exchange(smtp, data, 1, timeout))[0]


async def _exchange(smtp: aiosmtplib.SMTP, data: bytes, replies: int, timeout: float,
                    first_timeout: float | None = None) -> list[SMTPResponse]:
    protocol = smtp.protocol
    if not isinstance(protocol, PipeliningProtocol):
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        out = await protocol.exchange(data, replies, timeout, first_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()  # a reply given up on would be paired with the next command
        raise
    except aiosmtplib.SMTPResponseException as exc:
        # A reply that cannot be read: nothing after it can be paired with its command.
        smtp.close()
        raise aiosmtplib.SMTPServerDisconnected(
            f"unreadable reply: {exc.message[:200]}") from None
    if len(out) < replies or any(r.code == _DOMAIN_UNAVAILABLE for r in out):
        smtp.close()
        out = out + [out[-1]] * (replies - len(out))
    return out
