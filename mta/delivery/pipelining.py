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
from collections.abc import Callable, Iterable

import aiosmtplib
import aiosmtplib.smtp as _smtp
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse

from mta.delivery.smtpdata import normalize_line_endings, stuff_periods

__all__ = ["OutOfStep", "PipeliningProtocol", "body", "can_pipeline", "envelope", "install",
           "mail_command", "rcpt_command"]

# An address aiosmtplib's quote_address would return unchanged inside <>: no specials,
# one @, no whitespace or controls. Anything else goes through the library's parser.
_PLAIN_ADDRESS = re.compile(r'[^\x00-\x20\x7f<>()\[\]\\,;:@"]+@[^\x00-\x20\x7f<>()\[\]\\,;:@"]+')
_DOMAIN_UNAVAILABLE = 421


class OutOfStep(aiosmtplib.SMTPServerDisconnected):
    """The server sent more replies than the group had commands (the connection is closed):
    which reply answers which command is anybody's guess, so none of them is judged."""


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol that can also read the replies of a pipelined group."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # The group being read: its replies so far (kept afterwards, so a caller can tell
        # whether any reply came before the connection failed), how many are still owed,
        # what ended it early (a malformed reply, the connection lost), and a future the
        # reader waits on, resolved by each reply read and by the end.
        self.received: list[SMTPResponse] = []
        self._owed = 0
        self._reading = False
        self._error: BaseException | None = None
        self._progress: asyncio.Future[None] | None = None

    @property
    def unsolicited(self) -> bool:
        """Does the buffer hold data no command asked for (between groups, or after the last
        reply of one: a server out of step with its commands)?"""
        return bool(self._buffer)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            super().data_received(data)
            return
        self._buffer.extend(data)
        self._collect()

    def _collect(self) -> None:
        before = len(self.received)
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
                if response.code == _DOMAIN_UNAVAILABLE:
                    # 421: the server is closing (RFC 5321 3.8), whether or not it closes
                    # at once; the replies it did not send are that 421.
                    self._owed = 0
        except aiosmtplib.SMTPException as exc:
            self._fail(exc)
            return
        if len(self.received) > before:
            self._wake()

    def _wake(self) -> None:
        if self._progress is not None and not self._progress.done():
            self._progress.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reading and self._owed:
            lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
            lost.__cause__ = exc
            self._fail(lost)
        super().connection_lost(exc)

    async def exchange(self, data: bytes, replies: int, timeout: float | None,
                       first_timeout: float | None = None,
                       on_reply: Callable[[], None] | None = None) -> list[SMTPResponse]:
        """Write ``data`` (whole command lines, or a message and its final dot) and return
        the next ``replies`` replies in order; fewer only when the server said 421.
        ``first_timeout`` bounds the wait for the first reply, ``timeout`` each wait after
        it (a server that takes its time over every RCPT is not cut off for having many);
        ``on_reply()`` is called after each wait that read a reply.
        Raises SMTPServerDisconnected, SMTPReadTimeoutError, or SMTPResponseException for a
        malformed reply or one that came before any command of the group was written."""
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            self.received = []
            self._owed = replies
            self._error = None
            self._reading = True
            try:
                if self._buffer:
                    # A reply nobody asked for (with an earlier one's, or one's second): it
                    # would be taken for MAIL's, and every reply after for the command
                    # before. Nothing is written.
                    raise aiosmtplib.SMTPResponseException(
                        aiosmtplib.SMTPStatus.invalid_response, "unsolicited reply: "
                        + bytes(self._buffer[:200]).decode("utf-8", "replace"))
                self.write(data)
                self._collect()  # as aiosmtplib does: whatever the buffer already holds
                while self._owed and self._error is None:
                    self._progress = progress = self._loop.create_future()
                    wait = timeout if self.received or first_timeout is None \
                        else first_timeout
                    # A timer on the future itself: asyncio.wait_for adds a waiter future
                    # and callbacks, twice per message delivered.
                    timer = (None if wait is None
                             else self._loop.call_later(wait, _expire, progress))
                    try:
                        await progress
                    except TimeoutError:
                        raise aiosmtplib.SMTPReadTimeoutError(
                            "Timed out waiting for server response") from None
                    finally:
                        if timer is not None:
                            timer.cancel()
                    if on_reply is not None and self._error is None:
                        on_reply()
                if self._error is not None:
                    raise self._error
            finally:
                self._reading = False
                self._progress = None
                self._owed = 0
        return self.received


def _expire(progress: asyncio.Future[None]) -> None:
    if not progress.done():
        progress.set_exception(TimeoutError())


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
    """The MAIL line aiosmtplib would send (its address parsing included, which may rewrite
    an odd address: callers refuse those first). Raises ValueError where aiosmtplib would."""
    return _command(b"MAIL", b"FROM:" + _quoted(sender, encoding),
                    *(option.encode("ascii") for option in options))


def rcpt_command(recipient: str, encoding: str) -> bytes:
    """The RCPT line aiosmtplib would send, as ``mail_command``. Raises ValueError where
    aiosmtplib would."""
    return _command(b"RCPT", b"TO:" + _quoted(recipient, encoding))


async def envelope(smtp: aiosmtplib.SMTP, commands: list[bytes], timeout: float,
                   first_timeout: float | None = None,
                   on_reply: Callable[[], None] | None = None) -> list[SMTPResponse]:
    """Send ``commands`` (MAIL, RCPTs, DATA) in one write; one reply per command, in order.
    A connection that fails or times out is closed, as aiosmtplib closes it, and so is one
    whose server sent more than those replies (OutOfStep: which reply answers which command
    is anybody's guess, and after a 354 the message must not follow)."""
    return await _exchange(smtp, b"".join(commands), len(commands), timeout, first_timeout,
                           strict=True, on_reply=on_reply)


async def body(smtp: aiosmtplib.SMTP, message: bytes, timeout: float) -> SMTPResponse:
    """After DATA's 354: the message (line endings made CRLF, dot-stuffed) and the final
    dot; its reply. More than that reply closes the connection (the message's is kept)."""
    data = stuff_periods(normalize_line_endings(message)) + b".\r\n"
    return (await _exchange(smtp, data, 1, timeout))[0]


async def _exchange(smtp: aiosmtplib.SMTP, data: bytes, replies: int, timeout: float,
                    first_timeout: float | None = None, *, strict: bool = False,
                    on_reply: Callable[[], None] | None = None) -> list[SMTPResponse]:
    protocol = smtp.protocol
    if not isinstance(protocol, PipeliningProtocol):
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        out = await protocol.exchange(data, replies, timeout, first_timeout, on_reply)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()  # a reply given up on would be paired with the next command
        raise
    except aiosmtplib.SMTPResponseException as exc:
        # A reply that cannot be read: nothing after it can be paired with its command.
        smtp.close()
        raise aiosmtplib.SMTPServerDisconnected(
            f"unreadable reply: {exc.message[:200]}") from None
    if out[-1].code == _DOMAIN_UNAVAILABLE:
        # Collecting stops at a 421 (it is always the last reply, and the only reason for
        # fewer replies than commands): the connection ends, the rest of the group is that.
        smtp.close()
        return out + [out[-1]] * (replies - len(out))
    if protocol.unsolicited:
        # More replies than commands: the connection cannot be trusted with another.
        smtp.close()
        if strict:
            raise OutOfStep("more replies than commands")
    return out
