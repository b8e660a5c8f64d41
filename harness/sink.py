"""A scripted "remote" SMTP server (aiosmtpd) on loopback, in its own thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from harness.net import free_port
from harness.poll import wait_until, wait_until_sync


@dataclass
class Received:
    """One message the sink accepted."""

    sender: str
    recipients: list[str]
    content: bytes
    session: int
    at: float
    tls: bool = False  # the session had negotiated TLS (STARTTLS) before this DATA
    peer: str = ""  # the client's address (the sender's egress source)
    helo: str = ""  # the name it gave in EHLO/HELO


@dataclass
class SinkScript:
    """What a scripted remote server answers. ``rcpt`` and ``data`` may be callables taking
    (recipient or recipients, attempt number) so a test can change its mind over time."""

    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: Callable[[list[str], int], str | None] | None = None
    data_delay: float = 0.0
    # e.g. "421 busy": refuse at connect; or a function of the client's address.
    greeting_reply: str | Callable[[str], str | None] | None = None
    drop_on_data: bool = False


class _CountingSMTP(SMTP):
    def __init__(self, sink: Sink, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._sink = sink
        self.session_no = 0

    def connection_made(self, transport: Any) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            with self._sink.lock:
                self._sink.sessions += 1
                self.session_no = self._sink.sessions
                self._sink.active += 1
                self._sink.max_active = max(self._sink.max_active, self._sink.active)
                peer = transport.get_extra_info("peername")[0]
                self._sink.peers.append(peer)
                by_peer = self._sink.active_by_peer
                by_peer[peer] = by_peer.get(peer, 0) + 1
                self._sink.max_active_by_peer[peer] = max(
                    self._sink.max_active_by_peer.get(peer, 0), by_peer[peer])

    def connection_lost(self, exc: Exception | None) -> None:
        with self._sink.lock:
            self._sink.active -= 1
            peer = self.session.peer[0] if self.session is not None else None
            if peer in self._sink.active_by_peer:
                self._sink.active_by_peer[peer] -= 1
        super().connection_lost(exc)

    async def _handle_client(self) -> None:
        reply = self._sink.script.greeting_reply
        if callable(reply):
            reply = reply(self.session.peer[0])
        if reply:
            await self.push(reply)
            self.transport.close()
            return
        await super()._handle_client()


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.pipelining:
            # aiosmtpd reads and answers commands in order, so pipelined ones just work.
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self.sink.script.rcpt.get(address.lower())
        if callable(reply):
            reply = reply(address, self.sink.attempts_for(address))
        if reply and not reply.startswith("2"):
            self.sink.refused.append((address, reply))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        script = self.sink.script
        if script.drop_on_data:
            server.transport.abort()
            return "451 dropped"
        if script.data_delay:
            await asyncio.sleep(script.data_delay)
        if script.data_reply is not None:
            reply = script.data_reply(envelope.rcpt_tos, self.sink.data_count)
            self.sink.data_count += 1
            if reply:
                return reply
        with self.sink.lock:
            self.sink.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                               envelope.original_content, server.session_no,
                                               time.monotonic(), session.ssl is not None,
                                               session.peer[0], session.host_name or ""))
        return "250 2.0.0 OK queued"


class Sink(Controller):
    """A scripted "remote" SMTP server on ``host``:``port`` running in its own thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 script: SinkScript | None = None, tls_context: Any = None,
                 pipelining: bool = True) -> None:
        self.script = script or SinkScript()
        self.pipelining = pipelining  # advertise PIPELINING (RFC 2920), as real servers do
        self.messages: list[Received] = []
        self.refused: list[tuple[str, str]] = []
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.data_count = 0
        self.peers: list[str] = []  # the client address of each session
        self.active_by_peer: dict[str, int] = {}
        self.max_active_by_peer: dict[str, int] = {}  # most sessions at once per client
        self.lock = threading.Lock()
        self._tls = tls_context
        self._rcpt_attempts: dict[str, int] = {}
        if port == 0:
            port = free_port(host)
        super().__init__(_SinkHandler(self), hostname=host, port=port, ready_timeout=10)

    def attempts_for(self, address: str) -> int:
        """How many times ``address`` was offered before (and count this one)."""
        n = self._rcpt_attempts.get(address, 0)
        self._rcpt_attempts[address] = n + 1
        return n

    def factory(self) -> SMTP:
        """aiosmtpd's protocol per connection, counting sessions."""
        return _CountingSMTP(self, self.handler, hostname="sink.test", enable_SMTPUTF8=True,
                             tls_context=self._tls, auth_require_tls=False)

    def start(self) -> None:
        """Serve, and return once the readiness probe's session is over and forgotten."""
        super().start()
        # The controller's own readiness probe is a session too: once it has ended, start
        # counting from zero.
        wait_until_sync(self._probe_ended, 10, "the sink's readiness probe to end", step=0.005)
        with self.lock:
            self.sessions = self.max_active = 0
            self.peers.clear()
            self.max_active_by_peer.clear()

    def _probe_ended(self) -> bool:
        with self.lock:
            return self.sessions >= 1 and self.active == 0

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait (without blocking the event loop the node runs on) for ``count`` messages."""
        try:
            await wait_until(lambda: len(self.messages) >= count, timeout)
        except AssertionError:
            raise AssertionError(f"sink got {len(self.messages)} messages, expected {count}"
                                 ) from None
        return list(self.messages)


class AnyAddress(dict):  # type: ignore[type-arg]
    """A SinkScript.rcpt that answers every address through one function."""

    def __init__(self, reply: Callable[[str, int], str | None]) -> None:
        super().__init__()
        self._reply = reply

    def get(self, address: str, default: Any = None) -> Any:
        return self._reply


def _greylist(address: str, attempt: int) -> str | None:
    domain = address.lower().rpartition("@")[2]
    if domain == "held.test":
        return "451 4.7.1 Greylisted, come back later"
    if domain == "later.test" and attempt == 0:
        return "451 4.7.1 Try again"
    return None


def greylisting_script() -> SinkScript:
    """Accept everything, except: held.test is deferred for ever, later.test once."""
    return SinkScript(rcpt=AnyAddress(_greylist))
