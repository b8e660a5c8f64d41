"""The SMTP listener: sessions, limits, TLS, and the graceful-shutdown drain."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import ssl
import time
from collections.abc import Callable

import structlog

from mta.config import SmtpConfig, TenantsConfig
from mta.dkim.signer import Signer
from mta.ingress.auth import UsersFile
from mta.ingress.guard import AuthAttempt, AuthGuard
from mta.ingress.handler import IngressHandler
from mta.ingress.policy import ConnectionLimiter, is_loopback
from mta.ingress.session import IngressSession
from mta.ingress.trace import TraceHub
from mta.metrics import NodeMetrics
from mta.spool import Spool

__all__ = ["IngressServer", "load_tls_context"]

log = structlog.get_logger("mta.ingress")

# After a burst that held at least this much DATA at once, give the freed heap back to the
# system once the burst is over: glibc keeps freed multi-megabyte bodies in its heaps (its
# mmap threshold grows with the sizes it sees), so RSS otherwise stays at the burst's peak.
_TRIM_AFTER = 16 * 1024 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl has no malloc_trim): nothing to give back this way
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def reserved_for(cfg: SmtpConfig) -> int:
    """Connection slots only ``relay_networks`` clients may take: the configured number, by
    default a tenth of ``max_connections``."""
    if cfg.reserved_connections is not None:
        return cfg.reserved_connections
    return cfg.max_connections // 10


def load_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """Server context for STARTTLS; raises ``ssl.SSLError``/``OSError`` on a bad pair."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class IngressServer:
    """Accepts SMTP submissions into the spool."""

    def __init__(self, cfg: SmtpConfig, spool: Spool, metrics: NodeMetrics,
                 users: UsersFile | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.metrics = metrics
        self.users = users
        self.tls = tls
        self.signer: Signer | None = None  # DKIM, set (and replaced on reload) by the node
        # Which headers name the tenant and campaign (replaced on reload by the node).
        self.tenants = TenantsConfig()
        self.limiter = ConnectionLimiter(cfg.max_connections, cfg.max_connections_per_ip,
                                         reserved_for(cfg))
        self.auth_guard = AuthGuard(cfg.auth_max_failures, cfg.auth_lockout,
                                    cfg.auth_failure_delay, cfg.auth_user_max_failures)
        # Bytes of DATA bodies held by sessions right now (read, not yet in the spool).
        self.inflight_bytes = 0
        self._burst_peak = 0
        self.stressed = False
        self._stress_at = max(1, int(cfg.max_connections * 0.8))
        self.sessions: set[IngressSession] = set()
        self.draining = False
        self.closing_reply = "421 4.3.2 Service shutting down, try again later"
        # Cleared while the node is fenced (cluster lease lost): sessions get 421.
        self.accepting_writes = True
        self._handler = IngressHandler(self)
        # The live SMTP trace (mtactl trace): sessions report to it only while watched.
        self.trace = TraceHub()
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def _make_session(self) -> IngressSession:
        return IngressSession(
            self._handler,
            server=self,
            data_size_limit=self.cfg.max_message_size,
            hostname=self.cfg.hostname,
            tls_context=self.tls,
            timeout=self.cfg.stress_timeout if self.stressed else self.cfg.command_timeout,
            auth=self.users is not None,
            loop=self._loop,
        )

    async def start(self) -> None:
        host, port = self.cfg.listen
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            self._make_session, host=host, port=port, backlog=1024,
            reuse_address=True, reuse_port=self.cfg.reuse_port or None,
        )
        log.info("smtp.listening", address=f"{host}:{self.port}", tls=self.tls is not None,
                 auth=self.users is not None)

    @property
    def listening(self) -> bool:
        """True once the listener is bound (readiness: a node with SO_REUSEPORT peers must not
        look ready before the kernel can hand it connections)."""
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def drain(self, grace: float) -> None:
        """Stop accepting: new sessions get 421, idle ones are told and closed, and sessions
        in DATA may finish (up to ``grace`` seconds) so their 250 can still be sent."""
        self.draining = True
        for sess in list(self.sessions):
            if not sess.in_data:
                sess.close_for_shutdown(self.closing_reply)
        deadline = time.monotonic() + grace
        while any(s.in_data for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        busy = sum(1 for s in self.sessions if s.in_data)
        log.info("smtp.drained", cut_in_data=busy)

    async def close(self) -> None:
        self.trace.close()
        if self._server is not None:
            self._server.close()
        for sess in list(self.sessions):
            if sess.transport is not None:
                sess.transport.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
            self._server = None

    # --- called by sessions ----------------------------------------------------------------

    def admit(self, session: IngressSession, ip: str) -> str | None:
        """None to serve the session, or the 421 reply to close it with."""
        if self.draining:
            self.metrics.connections_refused.labels("shutdown").inc()
            return self.closing_reply
        if not self.accepting_writes:
            self.metrics.connections_refused.labels("fenced").inc()
            return "421 4.3.2 Not accepting mail right now, try again later"
        # relay_networks clients may use the reserved slots: a flood from elsewhere cannot
        # shut out the applications this node serves (AUTH users are not known yet here).
        reason = self.limiter.acquire(ip, privileged=session.relay_allowed)
        if reason is not None:
            self.metrics.connections_refused.labels(reason).inc()
            log.warning("smtp.connection_refused", client_ip=ip, reason=reason)
            if reason == "per_ip":
                return "421 4.7.0 Too many connections from your address, try again later"
            return "421 4.7.0 Too many connections, try again later"
        self.sessions.add(session)
        self.metrics.connections.set(self.limiter.total)
        if not self.stressed and self.limiter.total >= self._stress_at:
            self._enter_stress()
        return None

    def _enter_stress(self) -> None:
        """Near the connection limit (a slow-client flood, or a burst): every idle session
        gets the short stress timeout, so slots free up for clients that send mail."""
        self.stressed = True
        self.metrics.stressed.set(1)
        log.warning("smtp.stress", sessions=self.limiter.total,
                    max_connections=self.cfg.max_connections,
                    stress_timeout=self.cfg.stress_timeout)
        for sess in self.sessions:
            if not sess.in_data:
                sess.shorten_timeout(self.cfg.stress_timeout)

    def release(self, session: IngressSession, ip: str) -> None:
        self.sessions.discard(session)
        self.limiter.release(ip)
        self.metrics.connections.set(self.limiter.total)
        if self.stressed and self.limiter.total < self._stress_at // 2:
            self.stressed = False
            self.metrics.stressed.set(0)
            log.info("smtp.stress_over", sessions=self.limiter.total)

    def auth_without_tls(self, ip: str) -> bool:
        """AUTH before STARTTLS only from loopback, or when explicitly allowed."""
        return self.cfg.auth_allow_insecure or is_loopback(ip)

    def count_rejection(self, code: str) -> None:
        self.metrics.rejected.labels(code).inc()

    def count_auth_failure(self, attempt: AuthAttempt) -> float:
        """Settle a failed AUTH; returns how long to wait before answering it."""
        self.metrics.auth_failures.inc()
        outcome = self.auth_guard.finish(attempt, ok=False)
        log.warning("smtp.auth_failed", client_ip=attempt.ip, user=attempt.user,
                    checked=attempt.check, locked=outcome.address_locked)
        if outcome.address_locked:
            self.metrics.auth_lockouts.inc()
            log.warning("smtp.auth_lockout", client_ip=attempt.ip,
                        seconds=self.cfg.auth_lockout)
        if outcome.user_locked:
            self.metrics.auth_lockouts.inc()
            log.warning("smtp.auth_user_lockout", user=attempt.user,
                        seconds=self.cfg.auth_lockout)
        return outcome.delay

    # --- the in-flight DATA budget ---------------------------------------------------------

    def reserve_data(self, size: int) -> bool:
        """Take ``size`` bytes of the node-wide DATA budget; False (nothing taken) if the
        budget cannot hold them."""
        if self.inflight_bytes + size > self.cfg.max_inflight_bytes:
            return False
        self.inflight_bytes += size
        self._burst_peak = max(self._burst_peak, self.inflight_bytes)
        return True

    def count_over_budget(self, ip: str, size: int) -> None:
        log.warning("smtp.inflight_budget_full", client_ip=ip, size=size,
                    inflight_bytes=self.inflight_bytes,
                    max_inflight_bytes=self.cfg.max_inflight_bytes)

    def release_data(self, size: int) -> None:
        self.inflight_bytes -= size
        if self.inflight_bytes == 0 and self._burst_peak >= _TRIM_AFTER:
            self._burst_peak = 0
            if _malloc_trim is not None and self._loop is not None:
                # In a thread: trimming a heap of hundreds of megabytes takes milliseconds.
                with contextlib.suppress(RuntimeError):  # the loop is shutting down
                    self._loop.run_in_executor(None, _malloc_trim, 0)

