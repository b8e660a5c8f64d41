"""The SMTP AUTH exchange (RFC 4954): challenges, the guessing guard, hashing off the loop.

aiosmtpd runs the exchange (``smtp_AUTH``, ``auth_PLAIN``/``auth_LOGIN``) but checks the
credentials synchronously, on the event loop; here they are only remembered there and checked
afterwards, in a thread, behind the server's guard against guessing (mta/ingress/guard.py).
The users file itself is mta/ingress/auth.py.
"""

from __future__ import annotations

import asyncio
import binascii
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, _Missing, syntax

from mta.ingress.trace import REDACTED, SessionTrace, printable

if TYPE_CHECKING:
    from mta.ingress.server import IngressServer

__all__ = ["AuthExchange"]

_INVALID = "535 5.7.8 Authentication credentials invalid"
_IN_TRANSACTION = "503 5.5.1 AUTH not permitted during a mail transaction"


def _refusal(seconds: float) -> str:
    return (f"454 4.7.0 Too many failed authentications from your address, "
            f"try again in {int(seconds) + 1}s")


class AuthExchange(SMTP):
    """aiosmtpd's AUTH with the credentials checked off the event loop, failures counted
    and tarpitted per client address; mixed into the ingress session."""

    # Set by the session (mta/ingress/session.py).
    _server: IngressServer
    _client_ip: str
    relay_allowed: bool
    _pending_login: LoginPassword | None
    _read_line: Callable[[], Awaitable[bytes | None]]
    _flush: Callable[[], Awaitable[None]]
    _traced: Callable[[], SessionTrace]

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.envelope is not None and self.envelope.mail_from:
            # RFC 4954 4: "The AUTH command is not permitted during a mail transaction."
            await self.push(_IN_TRANSACTION)
            return
        locked = self._server.auth_guard.locked_for(self._client_ip)
        if locked and self._auth_methods:
            self._server.metrics.auth_refused.inc()
            await self.push(_refusal(locked))
            return
        await super().smtp_AUTH(arg)

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> _Missing | bytes:
        """aiosmtpd's, with a too-long answer read to its end and refused (its readline()
        left the rest to be parsed as the next command)."""
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (b64encode(data) if encode_to_b64 else data))
        await self._flush()
        line = await self._read_line()
        if self._server.trace.active:
            # An AUTH response is the credentials (or half of them): never told.
            self._traced().emit("command", line=REDACTED)
        if line is None:
            await self.push("500 5.5.2 Line too long")
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Auth aborted")
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Can't decode base64")
            return MISSING

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd's PLAIN (its replies), but the authorization identity is not ignored: a
        client may only act as the user it authenticates as (RFC 4616 2: the server must
        reject an authzid it does not allow); an empty one means that user."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)  # answered by challenge_auth
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except (binascii.Error, ValueError):
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        assert isinstance(blob, bytes)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        if authzid and authzid != login:
            # Refused before any password is checked: nothing is guessed, nothing counted.
            return AuthResult(success=False, handled=False, message=_INVALID)
        return await self._finish_auth(self._authenticate("PLAIN", LoginPassword(login, password)))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_LOGIN(_, args))

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        # aiosmtpd calls this synchronously; remember the credentials and let the async
        # auth_* wrappers above verify them off the event loop.
        self._pending_login = auth_data
        return AuthResult(success=False, handled=False)

    async def _finish_auth(self, result: AuthResult) -> AuthResult:
        login, self._pending_login = self._pending_login, None
        if login is None or not isinstance(login, LoginPassword):
            return result  # aiosmtpd already answered (bad base64, aborted...)
        server = self._server
        users = server.users
        user = login.login.decode("utf-8", "replace")
        # Reserved before hashing: parallel connections get no more guesses than one.
        attempt = server.auth_guard.begin(
            self._client_ip, user, track_user=users is not None and user in users,
            trusted=self.relay_allowed)
        if attempt.refused_for:
            server.metrics.auth_refused.inc()
            return AuthResult(success=False, handled=False,
                              message=_refusal(attempt.refused_for))
        try:
            if users is None:
                ok = False
            elif attempt.check:
                ok = await users.verify(user, login.password)
            else:
                # The user is locked for this address: take as long as a real check and
                # answer as for a wrong password, so the lock is neither seen nor an oracle.
                await users.burn(user, login.password)
                ok = False
        except BaseException:
            server.count_auth_failure(attempt)  # gone mid-check: it was a guess all the same
            raise
        if ok:
            server.auth_guard.finish(attempt, ok=True)
            if server.trace.active:
                trace = self._traced()
                trace.authenticated(user)
                trace.emit("auth", user=printable(user), ok=True)
            return AuthResult(success=True, auth_data=user)
        if server.trace.active:
            self._traced().emit("auth", user=printable(user), ok=False)
        delay = server.count_auth_failure(attempt)
        if delay:
            await asyncio.sleep(delay)  # tarpit: guessing gets slower with every miss
        return AuthResult(success=False, handled=False, message=_INVALID)
