"""One SMTP session: aiosmtpd's protocol with our admission, command loop, timeouts and replies.

The DATA reader (mta/ingress/data.py) and the AUTH exchange (mta/ingress/auth_exchange.py)
are mixed into the session class, in their own modules.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import (
    LoginPassword,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)

from mta.ingress.auth_exchange import AuthExchange
from mta.ingress.data import Body, DataReader
from mta.ingress.policy import in_networks
from mta.ingress.trace import SessionTrace, printable, redact_command
from mta.logs import describe
from mta.text import has_controls

if TYPE_CHECKING:
    from mta.ingress.server import IngressServer

__all__ = ["IngressSession"]

log = structlog.get_logger("mta.ingress")

# Unrecognised commands a session may send before it is closed (with 421, RFC 5321 3.8).
_BOGUS_LIMIT = 10
_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\S*)", re.IGNORECASE)

# aiosmtpd's fixed replies, mapped to the codes RFC 3463/5321 ask for (we advertise
# ENHANCEDSTATUSCODES, so every reply to a transaction command carries one).
_REWRITES: dict[str, str] = {
    "250 OK": "250 2.0.0 OK",
    "553 5.1.3 Error: malformed address": "501 5.1.3 Bad address syntax",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 Message size exceeds fixed limit",
    "500 Line too long (see RFC5321 4.5.3.1.6)":
        "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6 allows 1000 octets)",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command first",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command first",
    "503 Error: nested MAIL command": "503 5.5.1 Nested MAIL command",
    "503 Error: send HELO first": "503 5.5.1 Send HELO/EHLO first",
    "503 Error: send EHLO first": "503 5.5.1 Send EHLO first",
    "501 Syntax: MAIL FROM: <address>": "501 5.5.4 Syntax: MAIL FROM:<address>",
    "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]":
        "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]",
    "501 Syntax: RCPT TO: <address>": "501 5.5.4 Syntax: RCPT TO:<address>",
    "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]":
        "501 5.5.4 Syntax: RCPT TO:<address> [SP <mail-parameters>]",
    "501 Error: SMTPUTF8 takes no arguments": "501 5.5.4 SMTPUTF8 takes no arguments",
    "501 Error: BODY can only be one of 7BIT, 8BITMIME":
        "501 5.5.4 BODY must be 7BIT or 8BITMIME",
    "555 MAIL FROM parameters not recognized or not implemented":
        "555 5.5.4 MAIL FROM parameters not recognized",
    "555 RCPT TO parameters not recognized or not implemented":
        "555 5.5.4 RCPT TO parameters not recognized",
    "500 Error: strict ASCII mode": "500 5.5.2 Non-ASCII input without SMTPUTF8",
    "538 5.7.11 Encryption required for requested authentication mechanism":
        "538 5.7.11 Encryption required: use STARTTLS before AUTH",
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused: TLS failed",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH <mechanism> [<initial-response>]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH <mechanism> [<initial-response>]",
    "500 Error: command 'AUTH' not recognized": "500 5.5.1 Command not recognized",
    "501 Syntax: HELO hostname": "501 5.5.4 Syntax: HELO hostname",
    "501 Syntax: EHLO hostname": "501 5.5.4 Syntax: EHLO hostname",
    "501 Syntax: QUIT": "501 5.5.4 Syntax: QUIT",
    "501 Syntax: RSET": "501 5.5.4 Syntax: RSET",
    "501 Syntax: VRFY <address>": "501 5.5.4 Syntax: VRFY <address>",
    "501 Syntax: STARTTLS": "501 5.5.4 Syntax: STARTTLS",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "501 Error: SMTPUTF8 disabled": "501 5.5.4 SMTPUTF8 disabled",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
}
# aiosmtpd's replies that end in the client's argument (VRFY) or a list (HELP), by prefix.
_PREFIX_REWRITES: tuple[tuple[str, str], ...] = (
    ("502 Could not VRFY ", "502 5.1.3 Could not VRFY "),
    ("501 Supported commands: ", "501 5.5.4 Supported commands: "),
)
_CODE_RE = re.compile(r"^(\d)\d\d")
# A 4xx/5xx reply line that carries an enhanced status code (RFC 3463 2, RFC 2034 4).
_ENHANCED_RE = re.compile(r"^[45]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
# The common "<local@domain> [params]" form; anything else goes to aiosmtpd's full parser.
_SIMPLE_ADDR_RE = re.compile(r"^\s*<([^<>()\[\]\\,;:\s@\"]+@[^<>()\[\]\\,;:\s@\"]+)>(.*)$", re.S)
# Replies that may wait in our buffer while more pipelined commands are already read in;
# anything else (greeting, 221, 421, 334 challenges, 220 before TLS) is flushed at once.
# 354 is not among them: the client waits for it before sending the message.
# DATA's go-ahead (aiosmtpd's text), whether the loop or data_received answers it.
_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
_DEFERRABLE = frozenset({"250", "251", "252", "451", "452", "500", "501", "502",
                         "503", "550", "552", "553", "554", "555"})


def _with_enhanced_code(status: str) -> str:
    """A 4xx/5xx reply without an enhanced status code, given one: we advertise
    ENHANCEDSTATUSCODES, so every such reply carries one (RFC 2034 4). The known ones get
    theirs by prefix; anything else ``X.0.0``, "other undefined status" (RFC 3463 3.1)."""
    for prefix, replacement in _PREFIX_REWRITES:
        if status.startswith(prefix):
            return replacement + status[len(prefix):]
    sep = "-" if status[3:4] == "-" else " "
    return f"{status[:3]}{sep}{status[0]}.0.0 {status[4:]}".rstrip()


@dataclass(frozen=True)
class _Introspection:
    """What aiosmtpd looks up by name on a session class and a handler class."""

    auth: dict[str, tuple[str, bool]]  # mechanism -> (method name, defined on the session)
    hooks: dict[str, str]  # hook -> handler method name
    commands: dict[str, str]  # SMTP verb -> session method name
    ehlo_hook_ver: str | None

    @classmethod
    def of(cls, session_cls: type, handler: Any) -> _Introspection:
        auth: dict[str, tuple[str, bool]] = {}
        for builtin, obj in ((True, session_cls), (False, handler)):
            for name, func in inspect.getmembers(obj):
                if name.startswith("auth_"):
                    mech = getattr(func, "__auth_mechanism_name__",
                                   name.replace("auth_", "").replace("__", "-"))
                    auth[mech] = (name, builtin)
        hooks = {m.replace("handle_", ""): m for m in dir(handler) if m.startswith("handle_")}
        ehlo = getattr(handler, "handle_EHLO", None)
        ehlo_ver = None
        if ehlo is not None:
            ehlo_ver = "new" if len(inspect.signature(ehlo).parameters) == 5 else "old"
        commands = {m.replace("smtp_", ""): m for m in dir(session_cls) if m.startswith("smtp_")}
        return cls(auth, hooks, commands, ehlo_ver)


class IngressSession(AuthExchange, DataReader):
    """aiosmtpd ``SMTP`` with connection limits, drain, DATA timeout and async AUTH: the
    command loop and replies here, the DATA reader and the AUTH exchange mixed in."""

    _introspected: dict[tuple[type, int], _Introspection] = {}
    # This session's live-trace state (mta/ingress/trace.py), made when it first reports
    # while somebody watches; a class default, so __init__ stays aiosmtpd's attributes.
    _trace: SessionTrace | None = None
    # What the command loop waits on while nothing is buffered (data_received answers MAIL,
    # RCPT and DATA meanwhile), set to what ends the wait: None (the reader has something)
    # or a body data_received read whole. data_received has more complete lines after the
    # one it answers. The body of a DATA answered at once, while it arrives.
    _wake: asyncio.Future[tuple[bytes, str | None] | None] | None = None
    _more_lines: bool = False
    _arriving: Body | None = None
    _bogus: int = 0  # unrecognised commands so far

    def __init__(self, handler: Any, server: IngressServer, *, data_size_limit: int,
                 hostname: str, tls_context: ssl.SSLContext | None, timeout: float,
                 auth: bool, loop: asyncio.AbstractEventLoop) -> None:
        """``SMTP.__init__`` for our fixed options, with its introspection cached.

        aiosmtpd runs ``inspect.getmembers``/``dir`` over the session and the handler on every
        connection: 22% of the event loop at one connection per message. This sets the same
        attributes (``test_session_init_matches_aiosmtpd`` compares them with the installed
        aiosmtpd) and binds the cached method names per instance.
        """
        self.__ident__ = "mta ESMTP"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # Per session: aiosmtpd keeps this dict on the class, so every session's EHLO
        # (and every unknown verb) changed the limits of all the others.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._deadline = 0.0
        self._gone = False
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        key = (type(handler), id(type(self)))
        info = self._introspected.get(key)
        if info is None:
            info = self._introspected[key] = _Introspection.of(type(self), handler)
        self._auth_methods = {
            mech: _AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mech, (name, builtin) in info.auth.items()
        } if auth else {}
        self._handle_hooks = {hook: getattr(handler, name) for hook, name in info.hooks.items()}
        self._ehlo_hook_ver = info.ehlo_hook_ver
        self._smtp_methods = {cmd: getattr(self, name) for cmd, name in info.commands.items()}
        self._enforce_call_limit = False
        self._server = server
        self._client_ip = ""
        self._admitted = False
        self.relay_allowed = False  # client address in relay_networks (decided at connect)
        self.in_data = False
        self._pending_login: LoginPassword | None = None
        self._out: list[bytes] = []

    # --- connection admission and life -----------------------------------------------------

    async def _handle_client(self) -> None:
        assert self.session is not None and self.transport is not None
        peer = self.session.peer
        self._client_ip = peer[0] if isinstance(peer, tuple) else "unknown"
        # Decided before admission: relay_networks clients may use the reserved slots.
        self.relay_allowed = in_networks(self._client_ip, self._server.cfg.relay_networks)
        if self._server.trace.active and self._traced().wanted:
            self._trace_connect(peer)
        refusal = self._server.admit(self, self._client_ip)
        if refusal is not None:
            await self.push(refusal)
            self.transport.close()
            return
        self._admitted = True
        if self._server.auth_without_tls(self._client_ip):
            self._auth_require_tls = False
        await self.push(f"220 {self.hostname} {self.__ident__}")
        await self._command_loop()

    def _buffered_line(self) -> bytes:
        """The next command line if the reader already holds all of it (pipelined commands),
        taken without a coroutine; else b"" and the caller awaits :meth:`_read_line`. The same
        line, limit and exception rules as ``StreamReader.readuntil``."""
        reader: Any = self._reader
        buffer = reader._buffer
        end = buffer.find(b"\n")
        if end < 0 or end > reader._limit or reader._exception is not None:
            return b""
        line = bytes(buffer[:end + 1])
        del buffer[:end + 1]
        reader._maybe_resume_transport()
        return line

    async def _read_line(self) -> bytes | None:
        """One line from the client; None (the whole line discarded) if it is too long.
        Raises IncompleteReadError when the client has closed its side."""
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
            while True:
                await self._reader.readexactly(consumed)
                try:
                    await self._reader.readuntil(b"\n")
                    return None
                except asyncio.LimitOverrunError as more:
                    consumed = more.consumed

    async def _next_command(self) -> bytes | tuple[bytes, str | None] | None:
        """The command loop's next line (as :meth:`_read_line`), or the (body, refusal) of a
        DATA that :meth:`data_received` answered and read whole meanwhile."""
        reader: Any = self._reader
        if not reader._buffer and not reader._eof and reader._exception is None:
            wake = self._wake = self.loop.create_future()
            try:
                taken = await wake
            except asyncio.CancelledError:
                # Cancelled after a body was read whole, before the loop took it: nobody
                # else will give its budget back.
                if not wake.cancelled() and wake.done() and wake.result() is not None:
                    self._out_of_data()
                raise
            finally:
                self._wake = None
            if taken is not None:
                return taken
        return await self._read_line()

    @property
    def _waiting_command(self) -> bool:
        """The command loop waits for its next command, and nothing has ended the wait."""
        wake = self._wake
        return wake is not None and not wake.done() and self._arriving is None

    def _wake_loop(self, taken: tuple[bytes, str | None] | None) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(taken)

    def data_received(self, data: bytes) -> None:
        # While the command loop waits for a command with nothing buffered, the MAIL, RCPT
        # and DATA lines that arrive are answered here, and a DATA's body read, without
        # waking it: a client that waits for each reply (no PIPELINING) costs a wake-up of
        # the session, and a trip through the stream reader, per command otherwise. Anything
        # else, and all that follows it, goes to the reader as before, and wakes the loop.
        if self._arriving is not None:
            data = self._body_arrives(data)
        elif self._waiting_command and not self._reader._buffer:  # type: ignore[attr-defined]
            data = self._answer_at_once(data)
        if data:
            super().data_received(data)
            self._wake_loop(None)

    def _body_arrives(self, data: bytes) -> bytes:
        """Feed the body of a DATA answered at once; once it has ended, wake the command loop
        with it and return what follows it."""
        assert self._arriving is not None
        after = self._arriving.feed(data)
        if after is None:
            return b""
        body, self._arriving = self._arriving, None
        self._wake_loop(body.result())
        return after

    def _abandon_body(self) -> None:
        """The client went away while the body of a DATA answered at once arrived."""
        if self._arriving is not None:
            self._arriving = None
            self._out_of_data()

    def _answer_at_once(self, data: bytes) -> bytes:
        """Answer the MAIL and RCPT lines at the start of ``data``, and a DATA line after them
        (its body then read as it arrives); return the rest, for the reader."""
        limit = self._reader._limit  # type: ignore[attr-defined]
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\n", start)
            head = data[start:start + 6].upper()
            answer = _ANSWERED_AT_ONCE_LINES.get(head[:5])
            is_data = answer is None and head == b"DATA\r\n"
            if ((answer is None and not is_data) or end < 0 or end - start > limit
                    or self._paused or self.transport is None or self.transport.is_closing()):
                break
            if is_data:
                if not self._begin_body(data[start:end + 1]):
                    break  # refused: the command loop answers it, as ever
                rest = data[end + 1:]
                return self._body_arrives(rest) if rest else b""
            raw, start = data[start:end + 1], end + 1
            # Replies wait while further complete lines are still to be answered (RFC 2920).
            self._more_lines = data.find(b"\n", start) >= 0
            try:
                parsed = self._parse_command(raw)
                if isinstance(parsed, str):
                    self._reply(parsed)
                else:
                    self._reset_timeout()
                    self._reply(answer(self, parsed[1]))
            except ConnectionError:
                return b""  # the transport is gone: the command loop learns it from the reader
            except Exception as exc:
                self._reply(self._failed(raw[:4].decode("ascii", "replace").upper(), exc))
            finally:
                self._more_lines = False
        return data[start:] if start else data

    async def _command_loop(self) -> None:
        """aiosmtpd's command loop, owned here so that: unknown commands are not echoed
        back; too many of them end in 421 after the replies already owed; arguments must be
        valid UTF-8 (501) instead of failing later; a client that half-closes still gets
        every reply it is owed (and its 250); an internal error answers 451, not a 500
        carrying the exception text."""
        while self.transport is not None and not self.transport.is_closing():
            try:
                raw = self._buffered_line() or await self._next_command()
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the client closed its side: send what it is owed, then close
            method: Any
            if isinstance(raw, tuple):  # a DATA answered, and its body read, at once
                command, arg, method = "DATA", raw, self._data_taken
            else:
                parsed = self._parse_command(raw)
                if isinstance(parsed, str):
                    await self.push(parsed)
                    continue
                command, arg = parsed
                method = self._smtp_methods.get(command)
                if method is None:
                    await self._unrecognized()
                    continue
                self._reset_timeout()
            try:
                answer = _ANSWERED_AT_ONCE.get(command)
                if answer is None:
                    await method(arg)
                elif self._reply(answer(self, arg)):
                    await self._writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            except TLSSetupException:
                # The TLS handshake failed: nothing can be said on this connection any more.
                log.info("smtp.tls_failed", client_ip=self._client_ip)
                if self.transport is not None:
                    self.transport.close()
                return
            except Exception as exc:
                await self.push(self._failed(command, exc))
        await self._close_after_replies()

    async def _unrecognized(self) -> None:
        """500 to a command we do not know; 421, and the end, after too many of them."""
        self._bogus += 1
        if self._bogus <= _BOGUS_LIMIT:
            await self.push("500 5.5.1 Command not recognized")
            return
        await self.push("421 4.7.0 Too many unrecognized commands, closing connection")
        if self.transport is not None:
            self.transport.close()

    def _failed(self, command: str, exc: Exception) -> str:
        """Log a command that failed inside (a bug); the reply to it: 451, not the text."""
        log.exception("smtp.command_failed", client_ip=self._client_ip, command=command,
                      error=describe(exc))
        return "451 4.3.0 Internal error, try again later"

    def _parse_command(self, raw: bytes | None) -> tuple[str, str | None] | str:
        """A command line as (verb, argument), or the reply refusing it before its verb is
        looked up (``raw`` None: the line was too long and has been discarded)."""
        if self._server.trace.active and self._traced().wanted:
            self._trace_command(raw)
        if raw is None:
            return "500 5.5.2 Command line too long"
        line = raw.rstrip(b"\r\n")
        if not line:
            return "500 5.5.2 Syntax error"
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            return "500 5.5.2 Syntax error"
        arg: str | None = None
        if arg_bytes:
            try:
                arg = arg_bytes.strip().decode("utf-8")
            except UnicodeDecodeError:
                # MAIL and RCPT keep the bytes (surrogate-escaped) so their own checks run
                # in order; _getaddr then refuses the address. Elsewhere (a sloppy HELO
                # name, VRFY, HELP) tolerate it, visibly.
                arg = arg_bytes.strip().decode(
                    "utf-8", "surrogateescape" if command in ("MAIL", "RCPT") else "replace")
        assert self.session is not None
        limit = (self.command_size_limits[command] if self.session.extended_smtp
                 else self.command_size_limit)
        if len(line) > limit:
            return "500 5.5.2 Command line too long"
        if not self._tls_handshake_okay and command != "QUIT":
            return "554 5.7.0 Command refused: TLS failed"
        return command, arg

    async def _close_after_replies(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            await self._flush()
        except (ConnectionError, RuntimeError):
            pass
        transport.close()

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session here, dropping the replies (and the 250 of a message
        # already stored) a half-closing client is owed. Only tell the reader instead: the
        # command loop answers what was read, then closes.
        assert self.session is not None
        self._abandon_body()
        asyncio.StreamReaderProtocol.eof_received(self)
        self._wake_loop(None)
        return self.session.ssl is None

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd raises the MAIL line limit on every EHLO; once per session is right.
        self.command_size_limits.clear()
        await super().smtp_EHLO(hostname)

    # MAIL and RCPT are answered by plain functions (the command loop calls them through
    # _ANSWERED_AT_ONCE): aiosmtpd's coroutines awaited four more per command (HELO and AUTH
    # checks, the handler hook, the reply), a tenth of the ingress event loop. The checks and
    # replies are aiosmtpd's, in its order; the handler decides the address.

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await self.push(self._mail(arg))

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        await self.push(self._rcpt(arg))

    def _mail(self, arg: str | None) -> str:
        """The reply to ``MAIL``; the envelope takes the sender if it is accepted."""
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        syntaxerr = ("501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
                     if session.extended_smtp else "501 Syntax: MAIL FROM: <address>")
        if arg and "=" in arg:
            # aiosmtpd checks SIZE with str.isdigit(), which lets "²" through to int().
            m = _SIZE_PARAM.search(arg)
            if m is not None and not (m.group(1).isascii() and m.group(1).isdigit()):
                return "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
        if not session.host_name:
            return "503 Error: send HELO first"
        parsed = self._address_arg(arg, "FROM:", syntaxerr)
        if isinstance(parsed, str):
            return parsed
        address, addrparams = parsed
        if envelope.mail_from:
            return "503 Error: nested MAIL command"
        mail_options = addrparams.upper().split() if addrparams else []
        refusal = self._mail_params(mail_options, syntaxerr)
        if refusal is not None:
            return refusal
        return self.event_handler.mail(self, session, envelope, address, mail_options)

    def _address_arg(self, arg: str | None, keyword: str, syntaxerr: str
                     ) -> tuple[str, str] | str:
        """The address and parameters after MAIL's ``FROM:`` or RCPT's ``TO:``, or the
        reply refusing them (aiosmtpd's checks, in its order)."""
        assert self.session is not None
        if arg is None or (arg := self._strip_command_keyword(keyword, arg)) is None:
            return syntaxerr
        address, params = self._getaddr(arg)
        if address is None:
            return "553 5.1.3 Error: malformed address"
        if not address or (params and not self.session.extended_smtp):
            return syntaxerr
        return address, params or ""

    def _mail_params(self, mail_options: list[str], syntaxerr: str) -> str | None:
        """aiosmtpd's checks of MAIL's parameters: the reply refusing them, or None (and
        the envelope's SMTPUTF8 flag set)."""
        params = self._getparams(mail_options)
        if params is None:
            return syntaxerr
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            return "501 Error: BODY can only be one of 7BIT, 8BITMIME"
        smtputf8 = params.pop("SMTPUTF8", False)
        if not isinstance(smtputf8, bool):
            return "501 Error: SMTPUTF8 takes no arguments"
        assert self.envelope is not None
        self.envelope.smtp_utf8 = smtputf8
        size = params.pop("SIZE", None)
        if size:
            if isinstance(size, bool) or not size.isdigit():
                return syntaxerr
            if self.data_size_limit and int(size) > self.data_size_limit:
                return "552 Error: message size exceeds fixed maximum message size"
        if params:
            return "555 MAIL FROM parameters not recognized or not implemented"
        return None

    def _rcpt(self, arg: str | None) -> str:
        """The reply to ``RCPT``; the envelope takes the recipient if it is accepted."""
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        if not session.host_name:
            return "503 Error: send HELO first"
        if not envelope.mail_from:
            return "503 Error: need MAIL command"
        syntaxerr = ("501 Syntax: RCPT TO: <address> [SP <mail-parameters>]"
                     if session.extended_smtp else "501 Syntax: RCPT TO: <address>")
        parsed = self._address_arg(arg, "TO:", syntaxerr)
        if isinstance(parsed, str):
            return parsed
        address, params = parsed
        rcpt_options = params.upper().split() if params else []
        options = self._getparams(rcpt_options)
        if options is None:
            return syntaxerr
        if options:
            # No RCPT parameter is supported (no DSN extension).
            return "555 RCPT TO parameters not recognized or not implemented"
        return self.event_handler.rcpt(self, session, envelope, address, rcpt_options)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        await super().smtp_STARTTLS(arg)
        if self._server.trace.active and self._traced().wanted and self._tls_protocol is not None:
            self._trace_tls()

    def connection_lost(self, error: Exception | None) -> None:
        if self._server.trace.active and self._traced().wanted:
            self._traced().emit("disconnect", error=printable(describe(error)) if error else None)
        if self._admitted:
            self._admitted = False
            self._server.release(self, self._client_ip)
        self._gone = True
        self._abandon_body()
        super().connection_lost(error)

    def close_for_shutdown(self, reply: str) -> None:
        """Tell an idle client we are going away (RFC 5321 3.8) and close the connection."""
        if self.transport is None or self.transport.is_closing():
            return
        pending, self._out = b"".join(self._out), []
        self.transport.write(pending + reply.encode() + b"\r\n")
        self.transport.close()

    # --- DATA ------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        self._enter_data()
        try:
            await self._data(arg)
        finally:
            await self._leave_data()

    async def _data_taken(self, taken: tuple[bytes, str | None]) -> None:
        """A DATA that data_received answered (:meth:`_begin_body`) and read whole: the rest
        of ``smtp_DATA``."""
        try:
            await self._data_done(*taken)
        finally:
            await self._leave_data()

    def _enter_data(self) -> None:
        self.in_data = True
        # aiosmtpd resets its idle timer per command only, so this bounds the whole DATA
        # phase (slow-drip clients) instead of each line.
        self._reset_timeout(self._server.cfg.data_timeout)

    def _out_of_data(self) -> None:
        """The body is stored, refused or abandoned: its budget and the in-DATA mark go."""
        self._release_inflight()
        self.in_data = False

    async def _leave_data(self) -> None:
        # The body has reached the spool (or was refused) and the envelope let go of it.
        self._out_of_data()
        self._reset_timeout()
        if self._server.draining and self.transport is not None:
            await self._flush()
            self.close_for_shutdown(self._server.closing_reply)

    def _data_refusal(self, arg: str | None) -> str | None:
        """aiosmtpd's reply refusing a DATA command, or None."""
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        return ("503 Error: send HELO first" if not session.host_name
                else "503 Error: need RCPT command" if not envelope.rcpt_tos
                else "501 5.5.4 Syntax: DATA" if arg else None)

    def _begin_body(self, raw: bytes) -> bool:
        """Answer a DATA line in data_received (the command loop waits): 354, and its body
        read by :meth:`_body_arrives`. False, nothing done, if it is to be refused."""
        if not self._tls_handshake_okay or self._data_refusal(None) is not None:
            return False
        if self._server.trace.active and self._traced().wanted:
            self._trace_command(raw)
        self._enter_data()
        self._arriving = Body(self)
        self._reply(_GO_AHEAD)
        return True

    async def _data(self, arg: str) -> None:
        """DATA with the same replies as aiosmtpd's; the body is read by ``DataReader``
        (mta/ingress/data.py), in pieces instead of line by line."""
        refusal = self._data_refusal(arg)
        if refusal is not None:
            await self.push(refusal)
            return
        if self._reply(_GO_AHEAD):
            await self._writer.drain()
        await self._data_done(*await self._read_body())

    async def _data_done(self, content: bytes, error: str | None) -> None:
        """Store a body read whole, or refuse it; the reply."""
        session, envelope = self.session, self.envelope
        assert session is not None and envelope is not None
        if error is not None:
            if self._server.trace.active and self._traced().wanted:
                self._traced().emit("data", size=None, accepted=False, queue_id=None)
            await self.push(error)
            self._set_post_data_state()
            return
        envelope.content = envelope.original_content = content
        status = await self.event_handler.handle_DATA(self, session, envelope)
        if self._server.trace.active and self._traced().wanted:
            self._trace_data(len(content), status)
        self._set_post_data_state()
        if self._reply(status):
            await self._writer.drain()

    # --- addresses -------------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's version builds a typing.Protocol class and runs the RFC 5322 header
        # parser on every MAIL and RCPT; the plain form needs neither.
        if arg and not arg.isascii():
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                return None, None  # not valid UTF-8: not an address (RFC 6531)
        if arg and has_controls(arg):
            # Refused here, before aiosmtpd's RFC 5322 parser, which drops some of them
            # (the mail would go to an address the client never sent).
            return None, None
        m = _SIMPLE_ADDR_RE.match(arg) if arg else None
        if m is not None:
            return m.group(1), m.group(2)
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError, TypeError, AttributeError):
            return None, None  # e.g. "<" alone trips the RFC 5322 parser: a syntax error

    # --- replies ---------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._reply(status):
            await self._writer.drain()

    def _reply(self, status: str | bytes) -> bool:
        """:meth:`push` without a coroutine: the reply queued or sent. True when the caller
        must await ``self._writer.drain()`` (the transport is paused, closing or gone)."""
        if isinstance(status, str):
            status = _REWRITES.get(status, status)
            if status[:1] in "45" and not _ENHANCED_RE.match(status):
                status = _with_enhanced_code(status)
            if not status.isprintable():
                # Never echo a client's control characters (NUL, bare CR) back (VRFY does).
                status = "".join(ch if ch.isprintable() else "?" for ch in status)
            code = status[:3]
            if code[:1] in "45" and _CODE_RE.match(status):
                self._server.count_rejection(code)
            data = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n"
        else:
            code = status[:3].decode("ascii", "replace")
            data = status + b"\r\n"
        if self._server.trace.active and self._traced().wanted:
            self._traced().emit("reply", line=printable(data[:-2].decode("utf-8", "replace")))
        self._out.append(data)
        # Pipelining: while further complete commands already sit in the input buffer, keep
        # replies back and send them in one write (RFC 2920 4). A multi-line reply's
        # continuation lines always wait for its last line.
        if data[3:4] == b"-" and code == "250":
            return False
        buffered = getattr(self._reader, "_buffer", None)
        if code in _DEFERRABLE and (self._more_lines or (buffered and b"\n" in buffered)):
            return False
        return self._send_out()

    async def _flush(self) -> None:
        if self._send_out():
            await self._writer.drain()

    def _send_out(self) -> bool:
        """Write the queued replies; True when ``drain()`` must be awaited after them. Only
        then does drain do anything: it waits while the transport is paused for writing and
        raises once the connection is lost (FlowControlMixin's own flags)."""
        if not self._out:
            return False
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return False  # the client is gone: nobody to tell
        try:
            self._writer.write(data)
        except (RuntimeError, AttributeError) as exc:
            # A transport torn down under us (a failed TLS layer): the connection is dead.
            raise ConnectionResetError(f"transport gone: {describe(exc)}") from None
        return self._paused or self._connection_lost or transport.is_closing()

    def shorten_timeout(self, seconds: float) -> None:
        """Stress: from now on wait at most ``seconds`` for the next command."""
        self._timeout_duration = min(self._timeout_duration, seconds)
        if self._timeout_handle is not None and self._deadline - self.loop.time() > seconds:
            self._reset_timeout(seconds)

    def _reset_timeout(self, duration: float | None = None) -> None:
        # One timer per session, moved lazily: a reset only pushes the deadline, and a timer
        # that fires before it re-arms itself. Cancelling and creating a timer at each of the
        # ~5 resets per message showed in the ingress profile.
        if self._gone:
            return  # connection lost (a cancelled DATA's cleanup): nothing left to time out
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self._gone:
            return
        if self._deadline - self.loop.time() > 0.01:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()

    @property
    def client_ip(self) -> str:
        return self._client_ip

    # --- live trace (mta/ingress/trace.py): called only while somebody watches --------------

    def _traced(self) -> SessionTrace:
        trace = self._trace
        if trace is None:
            trace = self._trace = self._server.trace.session(self._client_ip)
        return trace

    def _trace_connect(self, peer: Any) -> None:
        assert self.session is not None
        port = peer[1] if isinstance(peer, tuple) and len(peer) > 1 else None
        self._traced().emit("connect", client=self._client_ip, port=port,
                            tls=self.session.ssl is not None,
                            relay_allowed=self.relay_allowed)

    def _trace_command(self, raw: bytes | None) -> None:
        if raw is None:
            self._traced().emit("command", line=None, too_long=True)
            return
        line = raw.rstrip(b"\r\n")[:1024].decode("utf-8", "backslashreplace")
        # AUTH's initial response is the credentials: only the mechanism is told.
        self._traced().emit("command", line=printable(redact_command(line)))

    def _trace_data(self, size: int, status: Any) -> None:
        reply = status if isinstance(status, str) else ""
        queue_id = reply.rsplit("queued as ", 1)[1].strip() if "queued as " in reply else None
        self._traced().emit("data", size=size, accepted=reply.startswith("250"),
                            queue_id=queue_id)

    def _trace_tls(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        version = ssl_object.version() if ssl_object is not None else None
        cipher = ssl_object.cipher() if ssl_object is not None else None
        self._traced().emit("tls", version=version, cipher=cipher[0] if cipher else None)



# The commands the loop answers with a plain function (reply text, rewritten by _reply).
_ANSWERED_AT_ONCE: dict[str, Any] = {"MAIL": IngressSession._mail, "RCPT": IngressSession._rcpt}
# The same, by the first five bytes of a line (upper-cased), for data_received.
_ANSWERED_AT_ONCE_LINES: dict[bytes, Any] = {
    f"{verb} ".encode(): answer for verb, answer in _ANSWERED_AT_ONCE.items()}
