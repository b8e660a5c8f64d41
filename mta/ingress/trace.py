"""Live SMTP trace: what ingress sessions say and hear, for an operator watching them.

Sessions report to the server's :class:`TraceHub` only while somebody subscribes
(``hub.active``, the one attribute the session path checks otherwise). Each subscriber has a
filter (client address or network, AUTH user, session id) and a bounded queue: a subscriber
that does not keep up loses events, and is told how many, but never slows a session.

What is reported is safe to print on a terminal: command and reply lines are cut to
:data:`MAX_LINE` characters and their control characters escaped; AUTH responses (which
carry the credentials) are never reported, and of DATA only the size and the queue id.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import re
import secrets
import time
import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import Any

import structlog

from mta.text import escape_controls

__all__ = ["MAX_LINE", "MAX_SUBSCRIBERS", "QUEUE_SIZE", "SessionTrace", "TooManyTraces",
           "TraceClosed",
           "TraceEvent", "TraceFilter", "TraceFilterError", "TraceHub", "TraceSubscription",
           "printable", "redact_command"]

log = structlog.get_logger("mta.ingress.trace")

MAX_SUBSCRIBERS = 16
QUEUE_SIZE = 1000  # events a subscriber may lag behind before it loses some
MAX_LINE = 200  # characters of a command or reply line reported
# Events of a session kept before it authenticates, for subscribers filtering on the AUTH
# user (they see the session's connect, EHLO... once it turns out to be their user's).
_BACKLOG = 64
_SESSION_ID_RE = re.compile(r"^[0-9a-f]{1,16}-[0-9a-f]{1,16}$")
_USER_MAX = 256
REDACTED = "***"


class TooManyTraces(Exception):
    """Refused: the node already serves :data:`MAX_SUBSCRIBERS` traces."""


class TraceClosed(Exception):
    """The subscription was ended by the node (it is stopping)."""


class TraceFilterError(ValueError):
    """A filter value that is not what it should be; the message says which and why."""


_HIDDEN = {"Cf", "Co", "Cn"}
# What an AUTH mechanism name looks like (RFC 4422: up to 20 of A-Z 0-9 - _); anything else
# in its place may be a credential.
_MECHANISM = re.compile(r"[A-Za-z0-9_-]{1,20}")
_TOKEN = re.compile(r"[A-Za-z0-9+/=*._-]+")
_VERBS = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
          "HELP", "STARTTLS", "AUTH", "BDAT", "ETRN", "TURN", "ATRN", "XCLIENT", "XFORWARD"}


def printable(text: str, limit: int = MAX_LINE) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut), with control
    characters escaped, and invisible ones too (format, private use, unassigned: bidi
    overrides, zero-width spaces): a hostile client cannot drive the operator's terminal
    nor disguise one user name as another."""
    if len(text) > limit:
        text = text[:limit] + "..."
    text = escape_controls(text)
    if not text.isascii():
        text = "".join(f"\\x{{{ord(c):04X}}}" if unicodedata.category(c) in _HIDDEN else c
                       for c in text)
    return text


def redact_command(line: str) -> str:
    """The command line as reported, with whatever may be a credential hidden: an AUTH
    initial response (split on any white space, as aiosmtpd splits it: a tab or a
    no-break space must not let it through) and a line that is no command but a bare token
    (a password or a base64 response sent after an AUTH that was refused or aborted)."""
    words = line.split()
    if not words:
        return line
    verb = words[0].upper()
    if verb == "AUTH":
        if len(words) == 1:
            return words[0]
        mech = words[1] if _MECHANISM.fullmatch(words[1]) else REDACTED
        return f"{words[0]} {mech}" + (f" {REDACTED}" if len(words) > 2 else "")
    if verb not in _VERBS and len(words) == 1 and _TOKEN.fullmatch(words[0]):
        return REDACTED
    return line


@dataclass(frozen=True)
class TraceFilter:
    """Which sessions a subscriber sees; every criterion given must hold (none: all)."""

    client: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    user: str | None = None
    session: str | None = None

    @classmethod
    def parse(cls, client: str | None = None, user: str | None = None,
              session: str | None = None) -> TraceFilter:
        """A filter from the API's query values; raises TraceFilterError."""
        network = None
        if client is not None:
            try:
                network = ipaddress.ip_network(client.strip(), strict=False)
                if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 \
                        and network.network_address.ipv4_mapped is not None:
                    # Sessions are matched in their IPv4 form: so is the filter.
                    network = ipaddress.ip_network(
                        f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
            except ValueError:
                raise TraceFilterError(
                    f"client: {printable(client, 60)!r} is not an IP address or network "
                    "(e.g. 192.0.2.7, 192.0.2.0/24, 2001:db8::/32)") from None
        if user is not None and (not user or len(user) > _USER_MAX or has_bad_chars(user)):
            raise TraceFilterError(f"user: {printable(user, 60)!r} is not a user name (1 to "
                                   f"{_USER_MAX} printable characters)")
        if session is not None and not _SESSION_ID_RE.match(session):
            raise TraceFilterError(f"session: {printable(session, 60)!r} is not a session id "
                                   "(as a trace shows them, e.g. 3fa2c1d0-1b)")
        return cls(network, user or None, session or None)

    def matches(self, trace: SessionTrace) -> bool:
        """Whether events of the session ``trace`` are for this filter."""
        if self.session is not None and trace.sid != self.session:
            return False
        if self.user is not None and trace.user != self.user:
            return False
        if self.client is not None:
            addr = trace.address
            if addr is None or addr.version != self.client.version or addr not in self.client:
                return False
        return True

    def describe(self) -> dict[str, str]:
        """The filter as the API's query would give it back."""
        out = {}
        if self.client is not None:
            out["client"] = str(self.client)
        if self.user is not None:
            out["user"] = self.user
        if self.session is not None:
            out["session"] = self.session
        return out


def has_bad_chars(text: str) -> bool:
    """Whether ``text`` holds characters no filter value may (controls, separators)."""
    return not text.isprintable()


@dataclass(frozen=True)
class TraceEvent:
    """One thing a session did: ``kind`` (connect, command, reply, tls, auth, data,
    disconnect, or dropped) with its fields."""

    time: float
    session: str | None
    kind: str
    fields: dict[str, Any]

    def as_dict(self, node: str) -> dict[str, Any]:
        """The event as one line of the API's stream."""
        return {"time": round(self.time, 6), "node": node, "session": self.session,
                "event": self.kind, "fields": self.fields}


class TraceSubscription:
    """One subscriber: its filter and its bounded queue of events. Use as a context
    manager (or call :meth:`close`) so its slot is given back."""

    def __init__(self, hub: TraceHub, flt: TraceFilter, maxsize: int) -> None:
        self.filter = flt
        self._hub = hub
        self._maxsize = maxsize
        self._queue: deque[TraceEvent] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0  # lost since the last "dropped" event
        self.dropped_total = 0
        self.closed = False
        self.ended = asyncio.Event()  # set when the node ends the trace (it is stopping)

    def put(self, event: TraceEvent) -> None:
        """Queue ``event``, or count it lost if the queue is full; never waits."""
        if len(self._queue) >= self._maxsize:
            self.dropped += 1
            self.dropped_total += 1
            return
        if self.dropped:
            # Said in its place in the stream (the notice may take one slot over the bound).
            self._queue.append(self._dropped_event())
        self._queue.append(event)
        self._wake.set()

    def _dropped_event(self) -> TraceEvent:
        count, self.dropped = self.dropped, 0
        return TraceEvent(time.time(), None, "dropped", {"count": count})

    def pending(self) -> int:
        """Events queued and not yet taken."""
        return len(self._queue)

    async def get(self) -> TraceEvent:
        """The next event, waiting for one; a "dropped" event when events were lost.
        Raises TraceClosed once the node ended the trace and every event was taken."""
        while not self._queue:
            if self.dropped:
                return self._dropped_event()
            if self.closed:
                raise TraceClosed("the trace was ended")
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    def close(self) -> None:
        """Stop receiving events and give the slot back (idempotent)."""
        if not self.closed:
            self.closed = True
            self._hub.unsubscribe(self)
            self._wake.set()

    def end(self, reason: str) -> None:
        """Ended by the node: a last ``trace_ended`` event, then :meth:`get` raises."""
        if not self.closed:
            self._queue.append(TraceEvent(time.time(), None, "trace_ended",
                                          {"reason": reason}))
            self.close()
            self.ended.set()

    def __enter__(self) -> TraceSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionTrace:
    """The trace state of one SMTP session, made when it first has something to report."""

    __slots__ = ("_gen", "_hub", "_wanted", "address", "backlog", "ip", "sid", "user")

    def __init__(self, hub: TraceHub, sid: str, ip: str) -> None:
        self._hub = hub
        self.sid = sid
        self.ip = ip
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            addr = None  # "unknown" (not a TCP peer): only a filter without client sees it
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        self.address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = addr
        self.user: str | None = None
        self.backlog: deque[TraceEvent] = deque(maxlen=_BACKLOG)
        self._gen = -1
        self._wanted = False

    @property
    def wanted(self) -> bool:
        """Does any subscriber want this session's events (or may, once it authenticates)?
        Worked out again only when subscribers come or go: a trace filtered on one client
        costs the other sessions one comparison per event, not an event each."""
        hub = self._hub
        if self._gen != hub.generation:
            self._gen = hub.generation
            self._wanted = bool(hub.user_filters and self.user is None) or any(
                sub.filter.matches(self) for sub in hub.subscribers)
        return self._wanted

    def emit(self, kind: str, **fields: Any) -> None:
        """Report one event of this session to the subscribers whose filter it matches."""
        self._hub.dispatch(self, TraceEvent(time.time(), self.sid, kind, fields))

    def authenticated(self, user: str) -> None:
        """The session is now ``user``'s: subscribers filtering on that user get the
        session's events so far, then what follows."""
        self.user = user
        self._gen = -1  # who matches may change with the user
        hub = self._hub
        for sub in hub.subscribers:
            if sub.filter.user is not None and sub.filter.matches(self):
                for event in self.backlog:
                    sub.put(event)
        self.backlog.clear()


class TraceHub:
    """Subscribers of one ingress server's live trace."""

    def __init__(self, max_subscribers: int = MAX_SUBSCRIBERS,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self.subscribers: list[TraceSubscription] = []
        # The one thing sessions check on their path: False (nobody watching) costs nothing.
        self.active = False
        self.user_filters = 0
        self.generation = 0  # bumped when subscribers change: sessions re-check interest
        # Session ids unique on this node and, by the random prefix, across the cluster and
        # restarts (the trace of a cluster merges every node's sessions).
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)

    def subscribe(self, flt: TraceFilter, queue_size: int | None = None) -> TraceSubscription:
        """A new subscriber; raises TooManyTraces past ``max_subscribers``."""
        if len(self.subscribers) >= self.max_subscribers:
            raise TooManyTraces(f"{self.max_subscribers} traces are open on this node "
                                "already")
        sub = TraceSubscription(self, flt, queue_size or self.queue_size)
        self.subscribers.append(sub)
        self.user_filters += flt.user is not None
        self.generation += 1
        self.active = True
        log.info("trace.subscribed", filter=flt.describe(), subscribers=len(self.subscribers))
        return sub

    def unsubscribe(self, sub: TraceSubscription) -> None:
        """Remove ``sub`` (called by its ``close``)."""
        if sub in self.subscribers:
            self.subscribers.remove(sub)
            self.user_filters -= sub.filter.user is not None
            self.generation += 1
            self.active = bool(self.subscribers)
            log.info("trace.unsubscribed", subscribers=len(self.subscribers),
                     dropped=sub.dropped_total)

    def close(self, reason: str = "the node is stopping") -> None:
        """End every subscription (the SMTP listener is closing): the streams that serve
        them finish instead of holding the node's shutdown."""
        for sub in list(self.subscribers):
            sub.end(reason)

    def session(self, ip: str) -> SessionTrace:
        """The trace state of a session from ``ip``, with a new session id."""
        return SessionTrace(self, f"{self._prefix}-{next(self._ids):x}", ip)

    def dispatch(self, trace: SessionTrace, event: TraceEvent) -> None:
        """Hand ``event`` to every matching subscriber (and to the session's backlog while
        some subscriber waits for a user the session has not authenticated as yet)."""
        for sub in self.subscribers:
            if sub.filter.matches(trace):
                sub.put(event)
        if self.user_filters and trace.user is None:
            trace.backlog.append(event)
