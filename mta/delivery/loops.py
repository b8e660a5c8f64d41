"""Mail loops: messages that went round too often, and routes that lead back to us.

Two guards, as in Postfix: a hop count (``Received:`` headers, ``[smtp] max_hops``) stops a
loop through other MTAs after a bounded number of rounds, and the route check stops the
direct one (a smarthost, a route or an MX that is this node or a peer) before the first
round: handing mail to ourselves would accept it again, as a new message, for ever.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from mta.coordinator import Member
from mta.delivery.routes import Route
from mta.logs import describe
from mta.netaddr import IPAddress as _IP
from mta.netaddr import ip_address

__all__ = ["LoopGuard", "received_count"]

log = structlog.get_logger("mta.delivery")

_RECEIVED_RE = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_BLANK_LINE_RE = re.compile(rb"\n\r?\n")
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "*"})
# Entries each memo keeps before it starts over (a sender reaches many MX hosts a day).
_MAX_MEMO = 4096


def received_count(content: bytes) -> int:
    """``Received:`` fields in the header section of ``content``.

    Only the header block is scanned (up to the first empty line), so the cost does not
    grow with the body; continuation lines start with white space and never match.
    """
    end = _BLANK_LINE_RE.search(content)
    head = content if end is None else content[:end.start() + 1]
    return len(_RECEIVED_RE.findall(head))


def _split_hostport(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class _Listener:
    """Where a node of ours accepts SMTP; ``addrs`` None means every local address."""

    addrs: frozenset[_IP] | None
    port: int
    node: str


class LoopGuard:
    """Knows this node's and its peers' SMTP listeners; finds them in a route.

    ``members`` is the coordinator's member list (it carries each live node's advertised
    SMTP address); it is re-read every ``refresh`` seconds, and a failed read keeps the last
    answer, so an etcd outage neither blocks delivery nor forgets the peers.
    """

    def __init__(self, listen: tuple[str, int], node_id: str,
                 members: Callable[[], Awaitable[list[Member]]], refresh: float = 10.0,
                 addr_ttl: float = 60.0) -> None:
        self._listen = listen
        self._node_id = node_id
        self._members = members
        self._refresh = refresh
        self._addr_ttl = addr_ttl
        self._listeners: list[_Listener] = []
        self._loaded_at = -float("inf")
        self._lock = asyncio.Lock()
        self._resolved: dict[str, tuple[float, frozenset[_IP]]] = {}
        # Answers per route (routes are cached by the router, so the same few come back for
        # every message); valid for one load of the listeners.
        self._checked: dict[Route, tuple[float, Route | None]] = {}
        self._local: dict[_IP, tuple[float, bool]] = {}

    async def outside(self, route: Route) -> Route | None:
        """``route`` cut before its first host that is one of ours; None if that is the
        first host. Hosts come in preference order, so when we are an MX of the domain only
        the better ones remain (RFC 5321 5.1); a smarthost that is us leaves nothing."""
        listeners = await self._current()
        memo = self._checked.get(route)
        if memo is not None and memo[0] == self._loaded_at:
            return memo[1]
        if len(self._checked) > _MAX_MEMO:
            self._checked.clear()
        result = await self._outside(route, listeners)
        if self._loaded_at != -float("inf"):  # not while our own listener is still unknown
            self._checked[route] = (self._loaded_at, result)
        return result

    async def _outside(self, route: Route, listeners: list[_Listener]) -> Route | None:
        for n, (host, port, _name) in enumerate(route.hosts):
            for addr in await self._addresses(host):
                for lst in listeners:
                    # Connecting to 0.0.0.0 or :: reaches this machine (Linux treats it as
                    # loopback), so it is our own listener whatever address that is bound to.
                    if lst.port == port and (
                            (addr.is_unspecified and lst.node == self._node_id)
                            or (addr in lst.addrs if lst.addrs is not None
                                else self._is_local(addr))):
                        log.warning("delivery.loop_detected", node_id=self._node_id,
                                    site=route.site, host=host, port=port, ours=lst.node,
                                    kept=n)
                        return dataclasses.replace(route, hosts=route.hosts[:n]) if n \
                            else None
        return route

    # --- our listeners ---------------------------------------------------------------------

    async def _current(self) -> list[_Listener]:
        if time.monotonic() - self._loaded_at < self._refresh:
            return self._listeners
        async with self._lock:
            if time.monotonic() - self._loaded_at >= self._refresh:
                await self._load()
        return self._listeners

    async def _load(self) -> None:
        host, port = self._listen
        try:
            members = await self._members()
        except Exception as exc:
            # Store down (or node not started yet): keep the peers we knew, and ask again
            # after the refresh interval, not at every attempt (each would wait for the
            # store's timeout, holding the lock the other attempts wait on).
            log.debug("delivery.loop_members_unavailable", node_id=self._node_id,
                      error=describe(exc))
            if not self._listeners and port:
                self._listeners = [await self._own(host, port)]
            self._loaded_at = time.monotonic()
            return
        out: list[_Listener] = []
        for member in members:
            where = _split_hostport(member.smtp)
            if where is None or where[1] == 0:
                continue
            if member.node == self._node_id:
                # Our own entry gives the bound port (listen port 0); the host comes from the
                # config, where a wildcard still means "every local address".
                port = port or where[1]
                continue
            out.append(_Listener(await self._addresses(where[0]), where[1], member.node))
        if port:
            out.append(await self._own(host, port))
        self._listeners = out
        # A port-0 listener not bound yet (tests): ask again at the next attempt.
        self._loaded_at = time.monotonic() if port else -float("inf")

    async def _own(self, host: str, port: int) -> _Listener:
        addrs = None if host in _WILDCARDS else await self._addresses(host)
        return _Listener(addrs, port, self._node_id)

    # --- addresses -------------------------------------------------------------------------

    async def _addresses(self, host: str) -> frozenset[_IP]:
        literal = ip_address(host)
        if literal is not None:
            return frozenset({literal})
        now = time.monotonic()
        cached = self._resolved.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, type=socket.SOCK_STREAM)
        except OSError:
            found: frozenset[_IP] = frozenset()
        else:
            found = frozenset(a for info in infos if (a := ip_address(str(info[4][0]))) is not None)
        if len(self._resolved) >= _MAX_MEMO:  # one per MX host reached: keep it bounded
            self._resolved.clear()
        self._resolved[host] = (now + self._addr_ttl, found)
        return found

    def _is_local(self, addr: _IP) -> bool:
        """Whether ``addr`` belongs to this machine (what a wildcard listener answers on)."""
        if addr.is_loopback or addr.is_unspecified:
            return True
        now = time.monotonic()
        cached = self._local.get(addr)
        if cached is not None and cached[0] > now:
            return cached[1]
        # The kernel routes a datagram to one of its own addresses through the local table,
        # with that very address as the source: no packet is sent, and unlike bind() this is
        # not fooled by ip_nonlocal_bind (common on hosts with floating addresses).
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((str(addr), 9))
                local = ip_address(str(probe.getsockname()[0])) == addr
        except OSError:
            local = False
        if len(self._local) >= _MAX_MEMO:
            self._local.clear()
        self._local[addr] = (now + self._addr_ttl, local)
        return local
