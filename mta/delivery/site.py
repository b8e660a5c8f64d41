"""A destination site: its ready queue, connection pool, throttle, back-off and breaker."""

from __future__ import annotations

import _ssl
import asyncio
import contextlib
import heapq
import ipaddress
import itertools
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeAlias

import aiosmtplib
import structlog
from aiosmtplib.email import quote_address

from mta.delivery import pipelining
from mta.delivery.breaker import Breaker
from mta.delivery.dane import DaneError, Tlsa, authenticate
from mta.delivery.errors import DeliveryError, NotOwnerError, SuspendedError, TemporaryError
from mta.delivery.mtasts import StsPolicy
from mta.delivery.routes import Route
from mta.delivery.throttle import Backoff, Throttle
from mta.logs import describe
from mta.metrics import NodeMetrics
from mta.queue.turns import Turns
from mta.tasks import cancel_and_wait, keep
from mta.text import has_controls, one_line

__all__ = ["Job", "RecipientResult", "Site", "SiteLimits"]

log = structlog.get_logger("mta.delivery")

# An unquoted ASCII local part and a host name: sent exactly as it is, no parse needed.
_PLAIN_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                       r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


# An address a reply echoes in brackets (``<a@b>``, ``<"x y"@b>``); linear: it starts at a
# "<" and stops at the next bracket.
_BRACKETED_RE = re.compile(r"<[^<>@]*@[^<>]*>")


def _unechoed(text: str, echoes: tuple[str, ...]) -> str:
    """``text`` without the envelope addresses a reply may repeat (``<spamhaus@x>: Sender
    address rejected``): the client chose them, so they must not decide that a site refuses
    the sending address. Bracketed addresses and words with an "@" go (in linear time: the
    text is the remote's); an address with a space or a bracket in it (a quoted local part)
    is taken out as it is first."""
    for address in echoes:
        if any(c.isspace() or c in "<>" for c in address):
            text = re.sub(re.escape(address), " ", text, flags=re.IGNORECASE)
    text = _BRACKETED_RE.sub(" ", text)
    return " ".join(word for word in text.split() if "@" not in word)


def _family(host: str) -> int | None:
    """4 or 6 for an address literal, None for a host name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _unsendable(address: str, encoding: str) -> str | None:
    """Why aiosmtplib would not put ``address`` on the wire as it is, or None.

    It re-parses addresses (a quoted local part holding CR and ``<victim@other>`` went out
    as ``<victim@other>``) and raises ValueError for what it cannot quote; a message that
    got past the doors (written by an older version, or through the spool API) must fail
    for that address alone, not send to a different one or fail every attempt."""
    if _PLAIN_RE.fullmatch(address):
        return None  # the common case: quote_address would give it back as it is
    if has_controls(address):
        return "control character in address"
    try:
        quoted = quote_address(address)
        quoted.encode(encoding)
    except ValueError:  # UnicodeEncodeError included
        return "not sendable over SMTP"
    if quoted != f"<{address}>":
        return "not sendable over SMTP as it is"
    return None


@dataclass(frozen=True)
class SiteLimits:
    """How politely a site is treated."""

    max_connections: int
    max_messages_per_connection: int
    rate: float | None
    tls: str  # opportunistic | disabled: whether connections STARTTLS at all
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    idle_timeout: float
    helo: str
    reuse_timeout: float = 5.0  # first command on a reused pooled connection
    stall_timeout: float = 30.0  # unanswered this long: the worker stops counting as capacity
    keepalive: float = 15.0  # TCP keepalive idle time on outbound sockets; 0 = off
    # What the site itself demands of every transaction: "", "required" or "verify" (the
    # stronger of it and the message's domain policy applies).
    tls_policy: str = ""
    tls_ca_file: str = ""  # the trust store for "verify" (empty: the system's)
    source_address: str = ""  # the egress source's address to send from ("": any)
    # The rate is cluster-wide (this node takes its share), or this node's own (a source's:
    # an address belongs to one machine).
    rate_shared: bool = True


@dataclass(slots=True)
class RecipientResult:
    """The outcome for one recipient of one attempt."""

    code: int
    text: str
    remote: str = ""
    tls: str = ""  # the connection's TLS as the accounting record shows it (empty: clear)
    source: str = ""  # the egress source it went out through (empty: the default address)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}".strip()


@dataclass
class Job:
    """One message's recipients at one domain, waiting in a site's ready queue."""

    message_id: str
    domain: str
    sender: str
    recipients: list[str]
    body: bytes
    smtputf8: bool
    body_8bit: bool
    # The domain's own TLS policy (opportunistic | required | verify), checked per
    # transaction: a site's connections are shared by every domain on its MX set, and must
    # not decide TLS for all of them from the first.
    tls: str = "opportunistic"
    tenant: str = ""  # whose mail: tenants take turns in the site's ready queue
    campaign: str = ""
    # DANE: the TLSA records of the route's MX hosts when the job was queued. Checked per
    # transaction too: a connection opened for another route (a pooled one) must meet them.
    dane: tuple[tuple[str, tuple[Tlsa, ...]], ...] = ()
    # The domain's MTA-STS policy (enforce or testing), if it has one: enforce made ``tls``
    # "verify" and left only matching MX hosts in the route; both are checked and counted
    # per transaction, testing failures logged.
    sts: StsPolicy | None = None
    future: asyncio.Future[list[RecipientResult]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def finish(self, results: list[RecipientResult]) -> None:
        if not self.future.done():
            self.future.set_result(results)

    def fail(self, exc: DeliveryError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _opportunistic_context() -> ssl.SSLContext:
    # Opportunistic STARTTLS (RFC 3207 as commonly deployed): encrypt whenever offered, do not
    # reject on certificate problems.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_TLS_CONTEXT = _opportunistic_context()
_VERIFYING: dict[str, ssl.SSLContext] = {}
_UNVERIFIED_FOR = 600.0  # a host whose certificate did not verify is not asked again for this
_POLICY_RANK = {"opportunistic": 0, "": 0, "required": 1, "verify": 2}


def _verifying_context(ca_file: str) -> ssl.SSLContext:
    """Chains to ``ca_file`` (or the system's trust store) and names the MX host."""
    ctx = _VERIFYING.get(ca_file)
    if ctx is None:
        ctx = _VERIFYING[ca_file] = ssl.create_default_context(cafile=ca_file or None)
    return ctx


def _cert_error(exc: BaseException) -> str | None:
    """Why a certificate did not verify, if that is what ``exc`` (or its cause) says."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return one_line(seen.verify_message or str(seen))[:200]
        seen = seen.__cause__ or seen.__context__
    return None


def tls_policy(*policies: str) -> str:
    """The strongest of ``policies`` (opportunistic < required < verify)."""
    return max(policies, key=lambda p: _POLICY_RANK.get(p, 0))


class ReadyQueue:
    """A site's jobs: tenants take turns in proportion to their weights (stride scheduling),
    and each tenant's jobs go oldest message first (ids are time-ordered).

    FIFO would put mail that waited longest (retries, and above all the backlog of a dead node
    this one just took over) behind everything that arrived since: after a failover its first
    delivery would wait for the whole local queue to drain. Ties keep arrival order. Turns
    keep one tenant's backlog from holding up another's mail at a shared site.
    """

    def __init__(self, weight_of: Callable[[str], int] = lambda _tenant: 1) -> None:
        self._heaps: dict[str, list[tuple[str, int, Job]]] = {}
        self._turns = Turns(weight_of)  # one per tenant with jobs waiting
        self._seq = itertools.count()
        self._len = 0

    def append(self, job: Job) -> None:
        heap = self._heaps.get(job.tenant)
        if heap is None:
            heap = self._heaps[job.tenant] = []
            self._turns.join(job.tenant)
        heapq.heappush(heap, (job.message_id, next(self._seq), job))
        self._len += 1

    def popleft(self) -> Job:
        turn = self._turns.pop()
        heap = self._heaps[turn[2]]
        job = heapq.heappop(heap)[2]
        self._len -= 1
        if not heap:
            del self._heaps[turn[2]]
        self._turns.took(turn, more=bool(heap))
        return job

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Job]:
        return (entry[2] for heap in self._heaps.values() for entry in heap)

    def remove_if(self, match: Callable[[Job], bool]) -> list[Job]:
        """Take out (and return) the jobs ``match`` selects; the others keep their order."""
        taken = [job for job in self if match(job)]
        if taken:
            for tenant, heap in list(self._heaps.items()):
                kept = [entry for entry in heap if not match(entry[2])]
                if kept:
                    heapq.heapify(kept)
                    self._heaps[tenant] = kept
                else:
                    del self._heaps[tenant]
            self._turns.keep(self._heaps)
            self._len -= len(taken)
        return taken


# A transaction's end: the result for every recipient (MAIL refused), or the recipients
# accepted and the result they share (None when none was accepted).
_Outcome: TypeAlias = RecipientResult | tuple[list[int], RecipientResult | None]


class _StaleConnection(Exception):
    """The first command on a reused pooled connection got no answer (or the connection was
    found gone): nothing of the job was accepted, so it moves to a fresh connection."""


class _ReplyWatch:
    """One command waiting for its reply. Past ``stall_timeout`` its worker stops counting
    against the site's connection limit: a reply that may never come (a path gone dark with
    no reset) must not keep the site from opening a connection or the breaker from probing."""

    __slots__ = ("_job", "_site", "_timer", "stalled")

    def __init__(self, site: Site, job: Job) -> None:
        self._site = site
        self._job = job
        self.stalled = False
        self._timer = self._arm()

    def _arm(self) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(self._site.limits.stall_timeout,
                                                     self._stall)

    def _stall(self) -> None:
        self.stalled = True
        self._site.on_stalled(self._job)

    def progress(self) -> None:
        """A reply of a pipelined group came: the wait for the next one starts afresh, as
        each command's does one at a time (a group is not stalled for being long)."""
        self.__exit__()
        self._timer = self._arm()

    def __enter__(self) -> _ReplyWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self.stalled:
            self.stalled = False
            self._site.stalled -= 1


@dataclass(slots=True)
class TlsState:
    """How a connection is protected: ``verified`` (the certificate chains to the trust store
    and names the host), ``dane-ee`` / ``dane-ta`` (authenticated by the host's TLSA
    records), ``unverified`` (TLS, any certificate: ``why`` it did not verify, if that was
    tried) or ``none`` (clear text); the protocol and cipher for the records."""

    state: str = "none"
    why: str = ""
    version: str = ""
    cipher: str = ""

    def record(self) -> str:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384 verified``; empty in clear text."""
        return "" if self.state == "none" else f"{self.version} {self.cipher} {self.state}"

    @property
    def authenticated(self) -> bool:
        """Is the server the host it should be (PKIX or DANE)?"""
        return self.state in _AUTHENTICATED


_AUTHENTICATED = frozenset(("verified", "dane-ee", "dane-ta"))


class SourceBlockedError(TemporaryError):
    """The site refused the sending address (a reply matched a block pattern) before the
    job was tried: another source may take it at once."""


class _DaneFailure(Exception):
    """The host has usable TLSA records and the connection did not meet them."""


def _peer_chain(smtp: aiosmtplib.SMTP) -> list[bytes]:
    """The certificates the server presented (DER, leaf first), unverified."""
    obj = smtp.get_transport_info("ssl_object")
    if obj is None:
        return []
    getter = getattr(obj, "get_unverified_chain", None)  # public from Python 3.13
    if getter is None:
        inner = getattr(obj, "_sslobj", None)
        getter = getattr(inner, "get_unverified_chain", None)
    chain = getter() if getter is not None else None
    if not chain:
        leaf = obj.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]


async def _dane_authenticate(smtp: aiosmtplib.SMTP, records: tuple[Tlsa, ...],
                             name: str) -> str:
    # In a thread: a DANE-TA path build over a server-chosen chain is CPU work.
    try:
        return await asyncio.to_thread(authenticate, _peer_chain(smtp), records, name)
    except DaneError as exc:
        raise _DaneFailure(str(exc)) from None


def _tls_state(smtp: aiosmtplib.SMTP, state: str, why: str) -> TlsState:
    ssl_object = smtp.get_transport_info("ssl_object")
    version = ssl_object.version() if ssl_object is not None else None
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return TlsState(state, why, version or "", cipher[0] if cipher else "")


class _Connection:
    """A worker's SMTP connection (None between connections) and what it has carried."""

    __slots__ = ("remote", "sent", "smtp", "tls")

    def __init__(self) -> None:
        self.smtp: aiosmtplib.SMTP | None = None
        self.remote = ""
        self.sent = 0  # transactions sent over it
        self.tls = TlsState()

    async def quit(self) -> None:
        if self.smtp is not None:
            await _quit(self.smtp)
            self.smtp = None


class Site:
    """Delivers jobs for one MX set over a bounded pool of reused connections."""

    def __init__(self, key: str, route: Route, limits: SiteLimits, breaker: Breaker,
                 share: Callable[[], float], node_id: str,
                 permit: Callable[[str], bool] = lambda _mid: True,
                 metrics: NodeMetrics | None = None,
                 weight_of: Callable[[str], int] = lambda _tenant: 1) -> None:
        self.key = key
        self.route = route
        self.limits = limits
        self.breaker = breaker
        self.backoff = Backoff()
        self._share = share
        self.node_id = node_id
        self.throttle = Throttle(limits.rate)
        self.rate_override: float | None = None
        # The runtime key (``site:...``) an operator suspended this site with, or None: while
        # set, no job is queued here and no connection is opened for one.
        self.held_by: str | None = None
        self.ready = ReadyQueue(weight_of)
        self.connections = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Event = asyncio.Event()
        self._closed = False
        self._idle = 0  # workers holding an open connection, waiting for a job
        # May this node send for the message's shard right now (it provably holds it)? Asked
        # before a job is queued, before connecting for it, and before MAIL, each RCPT and
        # DATA: a node that lost its shard stops between commands, never mid-DATA.
        self._permit = permit
        self._metrics = metrics
        # MX host -> (until when, why): its certificate did not verify; connections to it
        # use any certificate meanwhile, and mail that needs a verified one is deferred.
        self._unverified: dict[str, tuple[float, str]] = {}
        self.stalled = 0  # workers waiting for a reply for longer than stall_timeout
        # Attempts routed here and not finished (waiting on a domain throttle, or queued):
        # the engine must not forget a site someone is about to use.
        self.holders = 0
        self._last_used = time.monotonic()
        # Egress: the source this site's connections leave from (its address and EHLO are in
        # limits), and whether the site has refused it (a block pattern matched a reply):
        # then it is not used here until blocked_until (monotonic), doubling while blocks
        # recur, reset by a message the site accepts.
        self.source = ""
        self.is_block: Callable[[str], bool] = lambda _text: False
        self.block_backoff = (600.0, 4 * 3600.0)
        self.blocked_until = 0.0
        self.block_level = 0
        self.block_reply = ""
        # The source is gone from the config (a reload): nothing new is queued here.
        self.retired = False

    # --- use, for reaping ------------------------------------------------------------------

    @contextlib.contextmanager
    def held(self) -> Iterator[Site]:
        """Mark the site in use by one attempt for the duration."""
        self.holders += 1
        try:
            yield self
        finally:
            self.holders -= 1
            self._last_used = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds nothing has used the site (no attempt holds it, no job waits, no
        connection is open); 0 while in use."""
        if self.holders or self.ready or self.connections or self._workers:
            return 0.0
        return max(0.0, now - self._last_used)

    def settled(self) -> bool:
        """Nothing worth remembering: breaker closed and no back-off in force."""
        return self.breaker.state == "closed" and self.backoff.factor >= 1.0

    def blocked(self, now: float | None = None) -> bool:
        """Is this site refusing its source now?"""
        return self.blocked_until > (time.monotonic() if now is None else now)

    def _blocked_by(self, code: int, text: str, echoes: tuple[str, ...] = ()) -> bool:
        """Note a reply that refuses the sending address (True), else False. A block found
        while one is in force does not lengthen it (concurrent connections see the same).
        ``echoes``: the envelope addresses the reply may repeat, which do not count."""
        if not self.is_block(text) or not self.is_block(_unechoed(text, echoes)):
            return False
        now = time.monotonic()
        if self.blocked(now):
            return True
        # Bounded: 2 ** 1024 is no float, and block_backoff_max is reached long before.
        self.block_level = min(self.block_level + 1, 64)
        base, ceiling = self.block_backoff
        seconds = min(ceiling, base * 2 ** (self.block_level - 1))
        self.blocked_until = now + seconds
        self.block_reply = f"{code} {one_line(text)}"[:300]
        if self._metrics is not None:
            self._metrics.egress_blocks.labels(self.source).inc()
        log.warning("delivery.source_blocked", site=self.key, source=self.source,
                    node_id=self.node_id, reply=self.block_reply, seconds=seconds,
                    level=self.block_level)
        # What waits here goes back to the dispatcher for another source (or a deferral).
        self._fail_ready(self._block_error())
        return True

    def retire(self) -> None:
        """The source left the config: what waits here goes back to the dispatcher (for a
        source of the config of the day); connections in flight keep their address."""
        self.retired = True
        self._fail_ready(self._retired_error())

    def _fail_ready(self, error: DeliveryError) -> None:
        """Fail every queued job with ``error`` (their messages stay in the spool)."""
        while self.ready:
            self.ready.popleft().fail(error)

    def _retired_error(self) -> SourceBlockedError:
        return SourceBlockedError(451, f"4.7.0 Source {self.source} is no longer configured")

    def _hosts(self) -> list[tuple[str, int, str]]:
        """The route's hosts this site's source can reach: addresses of its family (a host
        name, a smarthost's, is left to the connection)."""
        source = self.limits.source_address
        if not source:
            return list(self.route.hosts)
        return [h for h in self.route.hosts if _family(h[0]) in (None, _family(source))]

    def _unreachable_error(self) -> SourceBlockedError:
        family = "IPv6" if ":" in self.limits.source_address else "IPv4"
        return SourceBlockedError(451, f"4.4.1 No {family} address at {self.route.site} for "
                                       f"source {self.source} ({self.limits.source_address})")

    def _refuses_source(self, reply: str) -> str:
        """The text of a deferral because the site refuses this site's source."""
        return f"4.7.0 {self.key} refuses source {self.source or '(default)'}: {reply}"

    def _block_error(self) -> SourceBlockedError:
        return SourceBlockedError(451, self._refuses_source(self.block_reply))

    # --- limits that move at run time ------------------------------------------------------

    def _effective_rate(self) -> float | None:
        rate = self.rate_override if self.rate_override is not None else self.limits.rate
        if rate is None:
            return None
        share = self._share() if self.limits.rate_shared else 1.0
        return rate * share * self.backoff.factor

    def _max_connections(self) -> int:
        return max(1, int(self.limits.max_connections * self.backoff.factor))

    def _live(self) -> int:
        """Connections that count against the limits: not those stalled in a command."""
        return self.connections - self.stalled

    def _room(self) -> bool:
        """May one more connection be opened? A stalled worker leaves its slot to a new one,
        but never more than max_connections extra in all (politeness still bounds us)."""
        return (self._live() < self._max_connections()
                and self.connections < 2 * self.limits.max_connections)

    # --- queueing --------------------------------------------------------------------------

    async def deliver(self, job: Job) -> list[RecipientResult]:
        """Queue ``job`` and wait for its per-recipient results (or a DeliveryError)."""
        if self._closed:
            raise TemporaryError(451, "4.3.2 Delivery engine shutting down")
        if not self._permit(job.message_id):
            raise self._not_owner(job, "queued", log_it=False)
        if self.held_by is not None:
            raise SuspendedError(self.held_by)
        if self.blocked():
            raise self._block_error()
        if self.retired:
            raise self._retired_error()
        if self.limits.source_address and not self._hosts():
            raise self._unreachable_error()  # another source of the pool may take it
        self.ready.append(job)
        self._wakeup.set()
        self._spawn()
        return await job.future

    def _circuit_open_error(self) -> TemporaryError:
        return TemporaryError(451, f"4.4.1 Site {self.key} unreachable (circuit open, retry "
                                   f"in {self.breaker.retry_in():.0f}s)", connection=True)

    def may_send(self, job: Job) -> bool:
        """Its attempt still waits for it, and this node provably holds its shard now."""
        return not job.future.done() and self._permit(job.message_id)

    def _not_owner(self, job: Job, stage: str, *, log_it: bool = True) -> NotOwnerError:
        if job.future.done():
            return NotOwnerError(stage)  # its attempt was cancelled: nobody to tell
        if self._metrics is not None:
            self._metrics.not_owner_stops.labels(stage).inc()
        if log_it:
            log.info("delivery.not_owner_stop", message_id=job.message_id, site=self.key,
                     node_id=self.node_id, stage=stage)
        return NotOwnerError(stage)

    def drop(self, match: Callable[[Job], bool]) -> int:
        """Fail at once, unsent, the queued jobs ``match`` selects (fenced: all of them; a
        released shard: its own); their messages stay in the spool. Returns how many."""
        dropped = 0
        for job in self.ready.remove_if(match):
            if not job.future.done():
                job.fail(NotOwnerError("queued"))
                dropped += 1
        if dropped and self._metrics is not None:
            self._metrics.not_owner_stops.labels("queued").inc(dropped)
        return dropped

    def give_back(self, held: Callable[[Job], str | None]) -> int:
        """Fail unsent, with :class:`SuspendedError`, the queued jobs ``held`` names a
        suspension for (their attempts end without counting); returns how many."""
        taken = 0
        for job in self.ready.remove_if(lambda j: held(j) is not None):
            if not job.future.done():
                job.fail(SuspendedError(held(job) or ""))
                taken += 1
        return taken

    def on_stalled(self, job: Job) -> None:
        """A command of ``job`` has waited stall_timeout for its reply."""
        self.stalled += 1
        if self._metrics is not None:
            self._metrics.stalled_commands.inc()
        log.warning("delivery.command_stalled", message_id=job.message_id, site=self.key,
                    node_id=self.node_id, seconds=self.limits.stall_timeout,
                    connections=self.connections, stalled=self.stalled)
        self._spawn()  # queued jobs need not wait behind it

    def _pop_live(self) -> Job | None:
        """The next queued job whose attempt still waits for it (cancelled ones are dropped:
        their shard may belong to another node by now)."""
        while self.ready:
            job = self.ready.popleft()
            if not job.future.done():
                return job
        return None

    def _spawn(self) -> None:
        """Open connections while queued jobs outnumber idle ones, up to the limit."""
        if self._closed:
            return
        if self.breaker.state != "closed":
            # Open or half-open: at most the one probe connection the breaker admits (a
            # worker stalled in a command is no probe in progress).
            if self._live() == 0 and self.ready and self._room():
                if self.breaker.allow():
                    self._start_worker()
                else:
                    self._fail_ready(self._circuit_open_error())
            return
        while self.ready and len(self.ready) > self._idle and self._room():
            if not self._start_worker():
                return

    def _start_worker(self) -> bool:
        job = self._pop_live()
        if job is None:
            return False
        self.connections += 1
        keep(self._workers, self._worker(job), name=f"site:{self.key}")
        return True

    async def _next_job(self, wait: float) -> Job | None:
        while not any(not j.future.done() for j in self.ready):
            if wait <= 0 or self._closed:
                return None
            self._wakeup.clear()
            self._idle += 1
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait)
            except TimeoutError:
                return None
            finally:
                self._idle -= 1
        return self._pop_live()

    # --- a connection ----------------------------------------------------------------------

    async def _worker(self, first: Job) -> None:
        conn = _Connection()
        job: Job | None = first
        try:
            while True:
                if job is None:
                    job = await self._next_job(self.limits.idle_timeout if conn.smtp else 0.0)
                    if job is None:
                        return
                if conn.smtp is None and not self.may_send(job):
                    # Not ours to send any more: do not even connect for it.
                    if not job.future.done():
                        job.fail(self._not_owner(job, "before connecting"))
                    job = None
                    continue
                if self.held_by is not None:
                    # Suspended since it was queued: no new connection or transaction.
                    job.fail(SuspendedError(self.held_by))
                    job = None
                    continue
                if conn.smtp is None and not await self._connect_for(conn, job):
                    return  # the job failed with the connection
                job = await self._take_job(conn, job)
        finally:
            self.connections -= 1
            self._last_used = time.monotonic()
            if job is not None:  # cancelled with a job in hand (a no-op if it has a result)
                job.fail(TemporaryError(451, "4.3.2 Delivery interrupted"))
            if conn.smtp is not None:
                await _quit(conn.smtp)
            if self.ready and not self._closed:
                self._spawn()

    async def _connect_for(self, conn: _Connection, job: Job) -> bool:
        """Open ``conn`` for ``job``; False (the job failed, breaker told) if no host took
        the connection."""
        try:
            conn.smtp, conn.remote, conn.tls = await self._connect()
        except SourceBlockedError as exc:
            job.fail(exc)  # not the site's failure: no breaker
            return False
        except DeliveryError as exc:
            self._connection_failed(job, exc)
            return False
        conn.sent = 0
        self._spawn()  # a probe that got through lets the pool grow again
        return True

    async def _take_job(self, conn: _Connection, job: Job) -> Job | None:
        """Send ``job`` over ``conn``; returns it when it must go on a fresh connection."""
        await self.throttle_wait(job)
        if job.future.done():  # its attempt was cancelled while we waited
            return None
        if self.held_by is not None:  # suspended while it waited for the throttle
            job.fail(SuspendedError(self.held_by))
            return None
        assert conn.smtp is not None
        if not conn.smtp.is_connected:
            # Closed (by the server, or by us after a 421 or replies out of step): what it
            # offered (SMTPUTF8, PIPELINING) is forgotten with it, and the job would be
            # judged against nothing. Pooled: a fresh connection takes the job. Fresh: the
            # server hung up after its greeting; that is the connection failing (retrying
            # at once would reconnect in a loop), for the breaker to count.
            conn.smtp.close()
            conn.smtp = None
            if conn.sent > 0:
                return job
            self._connection_failed(job, TemporaryError(
                451, f"4.4.2 Connection to {conn.remote} lost before MAIL", remote=conn.remote,
                connection=True))
            return None
        try:
            results = await self._send(conn.smtp, job, conn.remote, reused=conn.sent > 0,
                                       tls=conn.tls)
        except _StaleConnection as exc:
            # Gone dark (or closed) while pooled: the job was not tried, so it is no
            # failure of the message; a fresh connection (full timeouts) takes it.
            if self._metrics is not None:
                self._metrics.stale_connections.inc()
            log.warning("delivery.pooled_connection_stale", message_id=job.message_id,
                        site=self.key, node_id=self.node_id, remote=conn.remote,
                        error=describe(exc), reuse_timeout=self.limits.reuse_timeout)
            conn.smtp.close()  # no QUIT: it would wait for a reply that is not coming
            conn.smtp = None
            return job
        except DeliveryError as exc:
            # The connection broke mid-transaction (this job is retried later), or the node
            # may no longer send for its shard (QUIT ends the transaction).
            job.fail(exc)
            await conn.quit()
            return None
        job.finish(results)
        conn.sent += 1
        if conn.sent >= self.limits.max_messages_per_connection:
            await conn.quit()
        return None

    async def throttle_wait(self, job: Job) -> None:
        self.throttle.rate = self._effective_rate()
        await self.throttle.acquire()

    def _connection_failed(self, job: Job, exc: DeliveryError) -> None:
        opened = self.breaker.on_failure()
        job.fail(exc)
        if opened:
            log.warning("delivery.breaker_open", site=self.key, node_id=self.node_id,
                        failures=self.breaker.failures, cooldown=self.breaker.cooldown,
                        error=exc.reply)
            # Everything queued behind it fails fast and is retried on its own schedule;
            # the messages stay in the spool.
            self._fail_ready(TemporaryError(
                451, f"4.4.1 Site {self.key} unreachable (circuit open)", connection=True))

    async def _connect(self) -> tuple[aiosmtplib.SMTP, str, TlsState]:
        last: DeliveryError | None = None
        hosts = self._hosts()
        if not hosts:
            raise self._unreachable_error()
        while hosts:
            addr, port, name = hosts[0]
            source = self.limits.source_address
            smtp = aiosmtplib.SMTP(hostname=addr, port=port, local_hostname=self.limits.helo,
                                   timeout=self.limits.command_timeout, start_tls=False,
                                   validate_certs=False,
                                   source_address=(source, 0) if source else None)
            # Verification first (its outcome is what the records and the metrics report,
            # and what "verify" mail needs); a host whose certificate failed it recently gets
            # any certificate, never clear text.
            until, why = self._unverified.get(name, (0.0, ""))
            verify = time.monotonic() >= until
            # DANE (RFC 7672): a host with validated TLSA records gets TLS or nothing, and
            # usable records decide who it is (no PKIX check then). A site an operator set
            # to tls = "disabled" is left as set.
            dane = self.route.tlsa(name) if self.limits.tls != "disabled" else None
            try:
                await asyncio.wait_for(smtp.connect(timeout=self.limits.connect_timeout),
                                       self.limits.connect_timeout + 1)
                _keepalive(smtp, self.limits.keepalive)
                await smtp.ehlo()
                tls = await self._start_tls(smtp, name, dane, verify, why)
            except _DaneFailure as exc:
                await _quit(smtp)
                hosts.pop(0)
                self._policy_failure("dane")
                log.warning("delivery.dane_failed", site=self.key, node_id=self.node_id,
                            host=name, error=str(exc))
                last = TemporaryError(451, f"4.7.5 DANE: {name} refused: {exc}", remote=name,
                                      connection=True)
                continue
            except aiosmtplib.SMTPResponseException as exc:
                await _quit(smtp)
                if self._blocked_by(exc.code, exc.message):
                    raise self._block_error() from None
                hosts.pop(0)
                last = TemporaryError(exc.code if 400 <= exc.code < 500 else 451,
                                      one_line(exc.message) or "4.4.2 refused at greeting",
                                      remote=name,
                                      connection=True)
                continue
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                await _quit(smtp)
                if verify and (reason := _cert_error(exc)) is not None:
                    # Its certificate did not verify: again, taking any certificate.
                    self._unverified[name] = (time.monotonic() + _UNVERIFIED_FOR, reason)
                    log.info("delivery.tls_unverified", site=self.key, node_id=self.node_id,
                             host=name, reason=reason)
                    continue
                hosts.pop(0)
                # describe(): a bare TimeoutError() would leave "failed: TimeoutError", and
                # asyncio's refusal carries the address as a tuple repr.
                last = TemporaryError(451, f"4.4.1 Connection to {name} [{addr}]:{port} failed:"
                                           f" {describe(exc)}", remote=name,
                                      connection=True)
                continue
            self.breaker.on_success()
            if self._metrics is not None:
                self._metrics.outbound_tls.labels(tls.state).inc()
            return smtp, name, tls
        assert last is not None
        raise last

    async def _start_tls(self, smtp: aiosmtplib.SMTP, name: str, dane: tuple[Tlsa, ...] | None,
                         verify: bool, why: str) -> TlsState:
        """STARTTLS if offered (and not disabled); how the connection is protected. Raises
        _DaneFailure if ``dane`` records exist and the connection does not meet them."""
        offered = smtp.supports_extension("starttls")
        if dane is not None and not offered:
            raise _DaneFailure("it does not offer STARTTLS")
        if self.limits.tls == "disabled" or not offered:
            return TlsState()
        ctx = (_verifying_context(self.limits.tls_ca_file) if verify and not dane
               else _TLS_CONTEXT)
        await smtp.starttls(tls_context=ctx, server_hostname=name)
        if dane:
            tls = _tls_state(smtp, await _dane_authenticate(smtp, dane, name), "")
        else:
            tls = _tls_state(smtp, "verified" if verify else "unverified", why)
        await smtp.ehlo()
        return tls

    async def _send(self, smtp: aiosmtplib.SMTP, job: Job, remote: str, reused: bool = False,
                    tls: TlsState | None = None) -> list[RecipientResult]:
        """One SMTP transaction; per-recipient results. Raises TemporaryError if the
        connection fails mid-way (nothing can be known about that transaction),
        NotOwnerError if this node stopped provably holding the shard before DATA, and
        _StaleConnection if a ``reused`` connection does not answer MAIL in reuse_timeout."""
        tls = tls or TlsState()
        options, encoding, refused = self._prepare(smtp, job, remote, tls)
        if refused is not None:
            return [refused] * len(job.recipients)
        # Decided here, before MAIL: no remote server answered for these (so no remote).
        results: list[RecipientResult | None] = [
            None if (why := _unsendable(rcpt, encoding)) is None else _bad_recipient(why)
            for rcpt in job.recipients]
        if None not in results:
            return [r for r in results if r is not None]
        # The last word before anything goes out: a node resuming from a pause, or whose
        # lease deadline passed while it waited for a connection or the throttle, stops here.
        if not self.may_send(job):
            raise self._not_owner(job, "before MAIL")
        try:
            if pipelining.can_pipeline(smtp):
                outcome = await self._pipelined(smtp, job, remote, options, encoding, reused,
                                                results)
            else:
                outcome = await self._one_by_one(smtp, job, remote, options, encoding, reused,
                                                 results)
        except _LOST as exc:
            raise TemporaryError(451, f"4.4.2 Connection to {remote} lost: "
                                      f"{describe(exc)}", remote=remote) from None
        if isinstance(outcome, RecipientResult):  # MAIL refused: the same for everyone
            return [outcome] * len(job.recipients)
        accepted, final = outcome
        for i in accepted:
            results[i] = final
        shown = tls.record()
        out = [r for r in results if r is not None]
        for r in out:
            if r.remote:
                r.tls = shown
                r.source = self.source
        if self._metrics is not None:
            self._metrics.egress_transactions.labels(self.source).inc()
        return out

    async def _one_by_one(self, smtp: aiosmtplib.SMTP, job: Job, remote: str,
                          options: list[str], encoding: str, reused: bool,
                          results: list[RecipientResult | None]) -> _Outcome:
        """MAIL, each RCPT, DATA and the message, each after the previous reply (a server
        that does not advertise PIPELINING)."""
        refused = await self._mail(smtp, job, remote, options, encoding, reused)
        if refused is not None:
            return refused
        accepted = await self._rcpts(smtp, job, remote, encoding, results)
        if not accepted:
            await _rset(smtp)
            return accepted, None
        if not self.may_send(job):
            raise self._not_owner(job, "before DATA")
        return accepted, await self._data(smtp, job, remote)

    async def _pipelined(self, smtp: aiosmtplib.SMTP, job: Job, remote: str,
                         options: list[str], encoding: str, reused: bool,
                         results: list[RecipientResult | None]) -> _Outcome:
        """MAIL, every RCPT and DATA in one write (RFC 2920), then the message once DATA's
        354 is in. The ownership check before MAIL covers the group (none of it delivers
        anything); the one before the message, after the 354, ends the connection instead
        of sending it (a server in DATA takes any line as the message's)."""
        group = _group(job, options, encoding, results)
        if isinstance(group, RecipientResult):
            return group
        commands, sent = group
        if not sent:
            return [], None
        protocol = smtp.protocol
        try:
            with _ReplyWatch(self, job) as watch:
                replies = await pipelining.envelope(
                    smtp, commands, self.limits.command_timeout,
                    self.limits.reuse_timeout if reused else None, watch.progress)
        except _LOST as exc:
            received = list(getattr(protocol, "received", None) or [])
            if reused and not received:
                raise _StaleConnection(f"MAIL: {describe(exc)}") from None
            refused = None if isinstance(exc, pipelining.OutOfStep) else \
                self._lost_group(job, remote, received, sent)
            if refused is not None:
                return refused
            raise
        outcome = await self._group_replies(smtp, job, remote, replies, sent, results)
        if outcome is not None:
            return outcome
        accepted = [i for i in sent if results[i] is None]
        if not self.may_send(job):
            smtp.close()  # in DATA: only a closed connection ends it without a message
            raise self._not_owner(job, "before DATA")
        with _ReplyWatch(self, job):
            final = await pipelining.body(smtp, job.body, self.limits.data_timeout)
        if final.code != 250:
            await _rset(smtp)
            return accepted, self._refusal(aiosmtplib.SMTPDataError(final.code, final.message),
                                           remote, (job.sender, *job.recipients))
        return accepted, self._accepted(final, remote)

    async def _group_replies(self, smtp: aiosmtplib.SMTP, job: Job, remote: str,
                             replies: list[aiosmtplib.SMTPResponse], sent: list[int],
                             results: list[RecipientResult | None]) -> _Outcome | None:
        """Judge a pipelined group's replies (refused RCPTs go to ``results``): the outcome
        if the message is not to be sent, None if it goes (DATA answered 354)."""
        mail, rcpts, data = replies[0], replies[1:-1], replies[-1]
        in_data = data.code == 354
        if mail.code != 250:
            await _end_transaction(smtp, in_data)
            return self._mail_refused(job, mail.code, mail.message, remote)
        accepted = self._rcpt_replies(job, remote, sent, rcpts, results)
        if in_data and accepted:
            return None
        await _end_transaction(smtp, in_data)
        if not accepted:
            return accepted, None
        return accepted, self._refusal(aiosmtplib.SMTPDataError(data.code, data.message),
                                       remote, (job.sender, *job.recipients))

    def _lost_group(self, job: Job, remote: str, received: list[aiosmtplib.SMTPResponse],
                    sent: list[int]) -> RecipientResult | None:
        """The connection failed after ``received``, the first replies of a group: judged as
        one command at a time would have judged them before finding the connection gone. A
        refused MAIL is every recipient's result (or a block); refused RCPTs count (a
        block, a back-off) and the loss defers the job (None)."""
        if received and received[0].code != 250:
            return self._mail_refused(job, received[0].code, received[0].message, remote)
        # Judged for what they tell about the site (a block, a back-off); the job is deferred.
        self._rcpt_replies(job, remote, sent, received[1:], [None] * len(job.recipients))
        return None

    def _mail_refused(self, job: Job, code: int, text: str, remote: str) -> RecipientResult:
        """A refused MAIL: every recipient's result; raises the block error if the reply
        blocks this source (nothing was tried: another source may take the job)."""
        if self._blocked_by(code, text, (job.sender,)):
            raise self._block_error()
        self._note_reply(code)
        return _refused(code, text, remote)

    def _rcpt_replies(self, job: Job, remote: str, sent: list[int],
                      replies: list[aiosmtplib.SMTPResponse],
                      results: list[RecipientResult | None]) -> list[int]:
        """Judge the RCPT replies of a group (``sent``: their recipients' indexes, in order;
        fewer replies when the connection failed): refusals go to ``results``; returns the
        indexes accepted."""
        accepted = []
        for i, reply in zip(sent, replies, strict=False):
            if reply.code in (250, 251):
                accepted.append(i)
            else:
                rcpt = job.recipients[i]
                results[i] = self._refusal(aiosmtplib.SMTPRecipientRefused(
                    reply.code, reply.message, rcpt), remote, (job.sender, rcpt))
        return accepted

    def _accepted(self, reply: aiosmtplib.SMTPResponse, remote: str) -> RecipientResult:
        self.backoff.on_success()
        self.block_level = 0
        return RecipientResult(reply.code, one_line(reply.message), remote)

    def _prepare(self, smtp: aiosmtplib.SMTP, job: Job, remote: str, tls: TlsState
                 ) -> tuple[list[str], str, RecipientResult | None]:
        """MAIL options and the address encoding for ``job`` on this connection, or the
        result for every recipient when the job cannot be sent over it at all."""
        options: list[str] = []
        encoding = "ascii"
        if job.smtputf8 and not smtp.supports_extension("smtputf8"):
            return options, encoding, RecipientResult(
                553, "5.6.7 Remote server does not support SMTPUTF8 and the addresses need "
                     "it", remote)
        if job.smtputf8:
            options.append("SMTPUTF8")
            encoding = "utf-8"
        if job.body_8bit and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        policy = tls_policy(job.tls, self.limits.tls_policy)
        if job.sts is not None:
            self._sts_report(job, remote, tls)
        by = " by its MTA-STS policy" if job.sts is not None and job.sts.mode == "enforce" \
            else ""
        for host, records in () if self.limits.tls == "disabled" else job.dane:
            if host == remote and (tls.state == "none" or (
                    records and tls.state not in ("dane-ee", "dane-ta"))):
                self._policy_failure("dane")
                return options, encoding, RecipientResult(
                    451, f"4.7.5 DANE: {remote} has TLSA records and this connection is not "
                         "authenticated by them", remote)
        if policy != "opportunistic" and tls.state == "none":
            self._policy_failure(policy)
            return options, encoding, RecipientResult(
                451, f"4.7.5 {remote} does not offer STARTTLS and TLS is required for "
                     f"{job.domain}{by}", remote)
        if policy == "verify" and not tls.authenticated:
            # Never sent with a certificate that did not verify: deferred, and retried.
            self._policy_failure(policy)
            why = tls.why or "not checked"
            return options, encoding, RecipientResult(
                451, f"4.7.5 TLS certificate of {remote} not verified ({why}) and "
                     f"{job.domain} requires a verified one{by}", remote)
        if (why := _unsendable(job.sender, encoding)) is not None:
            return options, encoding, _bad_sender(why)
        return options, encoding, None

    def _sts_report(self, job: Job, remote: str, tls: TlsState) -> None:
        """Count the transaction against the domain's MTA-STS policy; in testing mode, log
        what enforce would have refused (the mail goes all the same)."""
        assert job.sts is not None
        problem = ""
        if not job.sts.matches(remote):
            problem = f"MX host {remote} is not in the policy"
        elif not tls.authenticated:
            problem = ("no TLS" if tls.state == "none"
                       else f"certificate not verified ({tls.why or 'not checked'})")
        if self._metrics is not None:
            self._metrics.outbound_mta_sts.labels(job.sts.mode,
                                                  "failed" if problem else "ok").inc()
        if problem and job.sts.mode == "testing":
            log.warning("delivery.mta_sts_testing_failure", message_id=job.message_id,
                        domain=job.domain, node_id=self.node_id, remote=remote,
                        policy_id=job.sts.id, problem=problem)

    def _policy_failure(self, policy: str) -> None:
        if self._metrics is not None:
            self._metrics.outbound_tls_policy_failures.labels(policy).inc()

    async def _mail(self, smtp: aiosmtplib.SMTP, job: Job, remote: str, options: list[str],
                    encoding: str, reused: bool) -> RecipientResult | None:
        """MAIL FROM; the result for every recipient if it is refused, else None."""
        try:
            with _ReplyWatch(self, job):
                await smtp.mail(job.sender, options=options, encoding=encoding,
                                timeout=(self.limits.reuse_timeout if reused
                                         else self.limits.command_timeout))
        except aiosmtplib.SMTPResponseException as exc:
            await _rset(smtp)
            refused = exc.code, exc.message
        except ValueError as exc:  # refused by aiosmtplib itself: nothing was sent
            return _bad_sender(str(exc))
        except _LOST as exc:
            if reused:
                raise _StaleConnection(f"MAIL: {describe(exc)}") from None
            raise
        else:
            return None
        return self._mail_refused(job, *refused, remote)  # out of the except: no chained cause

    async def _rcpts(self, smtp: aiosmtplib.SMTP, job: Job, remote: str, encoding: str,
                     results: list[RecipientResult | None]) -> list[int]:
        """RCPT TO for every recipient still without a result (refusals go to
        ``results``); returns the indexes accepted."""
        accepted = []
        for i, rcpt in enumerate(job.recipients):
            if results[i] is not None:
                continue
            if not self.may_send(job):
                raise self._not_owner(job, "before RCPT")
            try:
                with _ReplyWatch(self, job):
                    await smtp.rcpt(rcpt, encoding=encoding)
                accepted.append(i)
            except aiosmtplib.SMTPResponseException as exc:
                results[i] = self._refusal(exc, remote, (job.sender, rcpt))
            except ValueError as exc:  # refused by aiosmtplib itself: nothing was sent
                results[i] = _bad_recipient(str(exc))
        return accepted

    async def _data(self, smtp: aiosmtplib.SMTP, job: Job, remote: str) -> RecipientResult:
        """DATA and the message: the result for every accepted recipient. Once DATA is sent
        the remote may accept, so its reply is read and recorded, never abandoned."""
        try:
            with _ReplyWatch(self, job):
                resp = await smtp.data(job.body, timeout=self.limits.data_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await _rset(smtp)
            return self._refusal(exc, remote, (job.sender, *job.recipients))
        return self._accepted(resp, remote)

    def _refusal(self, exc: aiosmtplib.SMTPResponseException, remote: str,
                 echoes: tuple[str, ...]) -> RecipientResult:
        """A refused RCPT or DATA: its reply, or a deferral when it refuses the source (the
        message is not at fault, another source or a later try may carry it)."""
        if self._blocked_by(exc.code, exc.message, echoes):
            return RecipientResult(451, self._refuses_source(
                f"{exc.code} {one_line(exc.message)}")[:500], remote)
        self._note_reply(exc.code)
        return _refused(exc.code, exc.message, remote)

    def _note_reply(self, code: int) -> None:
        if 400 <= code < 500 and self.backoff.on_temp_failure(code):
            log.warning("delivery.site_backoff", site=self.key, node_id=self.node_id,
                        code=code, factor=self.backoff.factor)

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._fail_ready(TemporaryError(451, "4.3.2 Delivery engine shutting down"))
        await cancel_and_wait(*self._workers)


# A connection that failed under a command: its reply will not come.
_LOST = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError)


def _keepalive(smtp: aiosmtplib.SMTP, idle: float) -> None:
    """TCP keepalive sized in seconds (the kernel default waits two hours): a path that goes
    silent (dropped packets, no reset) ends the connection in about ``2 * idle`` seconds
    instead of leaving it ESTAB in retransmission for as long as the command timeout.
    TCP_USER_TIMEOUT bounds unacknowledged data the same way (keepalive does not probe
    while data waits for its ACK)."""
    if idle <= 0:
        return
    try:
        sock = smtp.get_transport_info("socket")
        if sock is None:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle / 3),
                            ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", idle * 2 * 1000)):
            if (opt := getattr(socket, name, None)) is not None:  # Linux; others vary
                sock.setsockopt(socket.IPPROTO_TCP, opt, max(1, int(value)))
    except (OSError, AttributeError, aiosmtplib.SMTPException):
        # Best effort: an exotic transport without a socket still delivers.
        pass


def _refused(code: int, text: str, remote: str) -> RecipientResult:
    """The result of a reply that did not take the message (a refused MAIL, RCPT, DATA or
    message). A 4xx or 5xx is the result as it stands; any other code (DATA answered 250,
    RCPT 252, a 1xx or 3xx) accepted nothing either, and as a result its 2xx would record
    a delivery of a message that never went: deferred, with the reply in the text."""
    if 400 <= code < 600:
        return RecipientResult(code, one_line(text), remote)
    return RecipientResult(451, f"4.5.0 Unexpected reply {code} {one_line(text)}"[:500],
                           remote)


def _bad_sender(why: str) -> RecipientResult:
    return RecipientResult(553, f"5.1.7 Bad sender address syntax: {one_line(why)}")


def _bad_recipient(why: str) -> RecipientResult:
    return RecipientResult(553, f"5.1.3 Bad recipient address syntax: {one_line(why)}")


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        await smtp.rset()


def _group(job: Job, options: list[str], encoding: str, results: list[RecipientResult | None]
           ) -> tuple[list[bytes], list[int]] | RecipientResult:
    """A pipelined group's command lines (MAIL, a RCPT for each recipient still without a
    result, DATA) and the indexes of the recipients in it; the result for everyone if MAIL
    cannot be written. A recipient that cannot be written gets its result here."""
    try:
        commands = [pipelining.mail_command(job.sender, options, encoding)]
    except ValueError as exc:  # nothing was sent
        return _bad_sender(str(exc))
    sent = []
    for i, rcpt in enumerate(job.recipients):
        if results[i] is None:
            try:
                commands.append(pipelining.rcpt_command(rcpt, encoding))
                sent.append(i)
            except ValueError as exc:
                results[i] = _bad_recipient(str(exc))
    commands.append(b"DATA\r\n")
    return commands, sent


async def _end_transaction(smtp: aiosmtplib.SMTP, in_data: bool) -> None:
    """After a pipelined group that will not be sent: RSET, or, if a server answered DATA
    with 354 all the same, close the connection (any line would be taken as the message)."""
    if in_data:
        smtp.close()
    else:
        await _rset(smtp)


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError, RuntimeError):
        if smtp.is_connected:
            try:
                await asyncio.wait_for(smtp.quit(), 5)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                smtp.close()

