"""Where mail for a domain goes: MX lookup (dnspython), A/AAAA fallback, null MX, smarthost,
address literals (``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``).

Domains whose MX sets are the same share a *site* (one pool, one throttle), as the big
providers host many domains on one set of MX hosts.

Routes are cached per domain for as long as the DNS answers they were built from live (their
TTLs, held between ``route_ttl_min`` and ``route_ttl_max``), in an LRU of at most
``route_cache_size`` entries: a sender reaching hundreds of thousands of domains a day keeps
a bounded table, and an MX that moves is followed once its TTL has run out.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.config import DeliveryConfig, DomainPolicy
from mta.delivery.dane import Tlsa, usable
from mta.delivery.errors import DeliveryError, PermanentError, TemporaryError
from mta.envelope import domain_key

__all__ = ["Route", "Router", "literal_address", "policy_for", "wildcard_match"]

T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """Ordered (address, port, mx name) candidates for one site; ``mx``: found through DNS
    (MX records, or the domain as its implicit MX), which is when MTA-STS and DANE apply
    (not to a smarthost or an address literal)."""

    site: str
    hosts: tuple[tuple[str, int, str], ...]
    mx: bool = False
    # DANE (RFC 7672): MX host -> its usable TLSA records, for hosts with a DNSSEC-validated
    # TLSA RRset; an empty tuple: TLSA present but none usable (TLS mandatory, not
    # authenticated).
    dane: tuple[tuple[str, tuple[Tlsa, ...]], ...] = ()

    def tlsa(self, host: str) -> tuple[Tlsa, ...] | None:
        """``host``'s usable TLSA records, () if it must use TLS unauthenticated, None if
        DANE does not apply to it."""
        for name, records in self.dane:
            if name == host:
                return records
        return None

    def only(self, keep: Callable[[str], bool]) -> Route | None:
        """This route with only the hosts whose name ``keep`` accepts (its own site key if
        some went), or None if none is left."""
        hosts = tuple(h for h in self.hosts if keep(h[2]))
        if len(hosts) == len(self.hosts):
            return self
        if not hosts:
            return None
        return Route(",".join(sorted({h[2] for h in hosts})) + ("+dane" if self.dane else ""),
                     hosts, self.mx, self.dane)


def wildcard_match(name: str, table: Mapping[str, T]) -> tuple[int, T] | None:
    """The longest ``*.suffix`` entry of ``table`` that ``name`` (a domain key) falls under,
    with the number of labels in that suffix (more is more specific); None if none."""
    labels = name.split(".")
    for i in range(1, len(labels)):
        entry = table.get("*." + ".".join(labels[i:]))
        if entry is not None:
            return len(labels) - i, entry
    return None


def policy_for(domain: str, policies: dict[str, DomainPolicy]) -> DomainPolicy | None:
    """The most specific policy: exact domain, then ``*.parent`` wildcards, then ``*``."""
    domain = domain_key(domain)
    if domain in policies:
        return policies[domain]
    found = wildcard_match(domain, policies)
    return found[1] if found is not None else policies.get("*")


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def literal_address(domain: str) -> str | None:
    """The IP address an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) names;
    None for a domain name. Raises PermanentError for a literal that names no host."""
    if not domain.startswith("["):
        return None
    text = domain[1:-1] if domain.endswith("]") else ""
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    try:
        addr = (ipaddress.IPv6Address(text[5:]) if text.lower().startswith("ipv6:")
                else ipaddress.IPv4Address(text))
    except ValueError:
        addr = None
    if addr is None or "%" in text or addr.is_unspecified or addr.is_multicast \
            or addr == _BROADCAST:
        raise PermanentError(550, f"5.1.2 Bad destination address literal {domain!r}")
    return str(addr)


# How long a negative answer without an SOA (RFC 2308 gives no TTL then) is trusted.
_NEGATIVE_TTL_DEFAULT = 60.0


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 section 5: a negative answer (NXDOMAIN, or no record of the type) lives
    min(SOA TTL, SOA MINIMUM) of the SOA in its authority section; without one, a short
    default."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return _NEGATIVE_TTL_DEFAULT


def _nxdomain_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    return min((_negative_ttl(r) for r in exc.responses().values()),
               default=_NEGATIVE_TTL_DEFAULT)


def _secure(response: dns.message.Message | None) -> bool:
    """Did the (validating) resolver set AD: is this answer DNSSEC-validated?"""
    return response is not None and bool(response.flags & dns.flags.AD)


def _remaining(answer: dns.resolver.Answer) -> float:
    """Seconds ``answer`` is still valid (dnspython's expiration is wall-clock)."""
    return answer.expiration - time.time()


class _ClampedCache(dns.resolver.LRUCache):
    """dnspython's LRU answer cache, with every answer's lifetime held between a floor and a
    ceiling: a TTL of 0 must not mean a query per message, nor a week-long TTL a week before
    a moved MX is seen."""

    def __init__(self, max_size: int, ttl_min: float, ttl_max: float) -> None:
        super().__init__(max_size)
        self.ttl_min = ttl_min
        self.ttl_max = ttl_max

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        now = time.time()
        value.expiration = min(max(value.expiration, now + self.ttl_min), now + self.ttl_max)
        super().put(key, value)

    def prune(self) -> int:
        """Drop the expired answers (dnspython drops them only when asked for them again);
        returns how many."""
        now = time.time()
        with self.lock:
            expired = [key for key, node in self.data.items() if node.value.expiration <= now]
        for key in expired:
            self.flush(key)
        return len(expired)


class Router:
    """Resolves domains to routes, cached for their DNS TTLs in a bounded LRU."""

    def __init__(self, cfg: DeliveryConfig, timeout: float = 10.0) -> None:
        self.cfg = cfg
        res = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            res.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                               for host, port in cfg.nameservers]
        res.lifetime = timeout
        res.timeout = min(timeout, 3.0)
        if cfg.dane:
            # DNSSEC OK: a validating resolver sets AD on the answers it validated, which is
            # all DANE trusts (the resolver must be one this node trusts, e.g. on loopback).
            res.use_edns(0, dns.flags.DO, 1232)
        # The answers beneath the routes: the MX hosts of a big provider serve many domains,
        # and their addresses are looked up once per TTL, not once per domain.
        self._answers = _ClampedCache(cfg.route_cache_size, cfg.route_ttl_min, cfg.route_ttl_max)
        res.cache = self._answers
        self._resolver = res
        # domain -> (monotonic expiry, the route or why there is none), least recently used
        # first.
        self._cache: OrderedDict[str, tuple[float, Route | DeliveryError]] = OrderedDict()
        self.size = cfg.route_cache_size
        self.peak = 0  # the most routes ever held at once (never above size)

    def __len__(self) -> int:
        """Routes cached now (expired ones included until pruned)."""
        return len(self._cache)

    def __contains__(self, domain: object) -> bool:
        """Whether a route (or a failure) for ``domain`` is cached and still valid."""
        cached = self._cache.get(domain_key(domain)) if isinstance(domain, str) else None
        return cached is not None and cached[0] > time.monotonic()

    async def route(self, domain: str) -> Route:
        """Route for ``domain``; raises PermanentError / TemporaryError."""
        domain = domain_key(domain)
        policy = policy_for(domain, self.cfg.domains)
        smarthost = (policy.smarthost if policy and policy.smarthost else self.cfg.smarthost)
        if smarthost is not None:
            host, port = smarthost
            return Route(f"smarthost:{host}:{port}", ((host, port, host),))
        # RFC 5321 5.1: an address literal is the destination itself, no DNS; it goes to the
        # MX port like any other destination (a smarthost, above, takes it like any other).
        if (addr := literal_address(domain)) is not None:
            return Route(f"[{addr}]", ((addr, self.cfg.mx_port, addr),))
        cached = self._cache.get(domain)
        if cached is not None:
            if cached[0] > time.monotonic():
                self._cache.move_to_end(domain)
                if isinstance(cached[1], DeliveryError):
                    # A fresh traceback each time: re-raising the one instance would chain
                    # every raise's frames onto it for as long as it is cached.
                    raise cached[1].with_traceback(None)
                return cached[1]
            del self._cache[domain]
        found, ttl = await self._lookup(domain)
        ttl = min(max(ttl, self.cfg.route_ttl_min), self.cfg.route_ttl_max)
        self._cache[domain] = (time.monotonic() + ttl, found)
        self._cache.move_to_end(domain)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        self.peak = max(self.peak, len(self._cache))
        if isinstance(found, DeliveryError):
            raise found.with_traceback(None)
        return found

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """The resolver routes are looked up with (the configured nameservers, the cache)."""
        return self._resolver

    async def addresses(self, name: str) -> list[str]:
        """The A and AAAA addresses of ``name`` (empty if none or the lookup failed)."""
        return (await self._lookup_addresses(name))[0]

    def prune(self) -> int:
        """Drop expired routes and DNS answers (a domain mailed once must not stay for ever
        in a table sized for the busy ones); returns how many routes went."""
        now = time.monotonic()
        expired = [domain for domain, (until, _) in self._cache.items() if until <= now]
        for domain in expired:
            del self._cache[domain]
        self._answers.prune()
        return len(expired)

    async def _lookup(self, domain: str) -> tuple[Route | DeliveryError, float]:
        """The route for ``domain`` or why there is none, and for how many seconds that
        holds: the shortest remaining TTL of the answers it was built from."""
        ttl = float("inf")
        try:
            answer = await self._resolver.resolve(domain, "MX")
            ttl = _remaining(answer)
            secure = _secure(answer.response)
            mxs = sorted(((r.preference, r.exchange.to_text(omit_final_dot=True).lower())
                          for r in answer), key=lambda m: (m[0], random.random()))
        except dns.resolver.NXDOMAIN as exc:
            return (PermanentError(550, f"5.1.2 Domain {domain} does not exist (NXDOMAIN)"),
                    _nxdomain_ttl(exc))
        except dns.resolver.NoAnswer as exc:
            ttl = _negative_ttl(exc.response())
            secure = _secure(exc.response())
            mxs = []  # RFC 5321 5.1: no MX, the domain itself is the implicit MX
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            # SERVFAIL or silence: retried, so trusted only for the shortest time.
            return TemporaryError(451, f"4.4.3 DNS lookup of MX for {domain} failed: "
                                       f"{type(exc).__name__}"), 0.0
        except dns.exception.DNSException as exc:
            # A name DNS itself refuses (IDNA2008 rules, label too long...): no retry helps.
            return PermanentError(550, f"5.1.2 Bad destination domain {domain}: {exc}"
                                  ), _NEGATIVE_TTL_DEFAULT
        if len(mxs) == 1 and mxs[0][1] in ("", "."):
            return PermanentError(556, f"5.1.10 Domain {domain} accepts no mail (null MX)"), ttl
        names = [name for _, name in mxs] or [domain]
        hosts, host_ttl = await self._hosts(names, secure)
        ttl = min(ttl, host_ttl)
        if isinstance(hosts, str):
            return TemporaryError(451, f"4.7.5 DANE: TLSA lookup failed for every MX host of "
                                       f"{domain} ({hosts[:300]})"), 0.0
        if not hosts.hosts:
            if not mxs:
                return PermanentError(550, f"5.1.2 Domain {domain} has no MX and no address"
                                      ), ttl
            return TemporaryError(451, f"4.4.3 No address found for the MX hosts of {domain}"
                                  ), ttl
        return hosts, ttl

    async def _hosts(self, names: list[str], secure: bool) -> tuple[Route | str, float]:
        """The route through MX hosts ``names`` (their addresses, and their TLSA records
        when DANE is on and the MX answer was ``secure``), and how long it holds; why, if
        every host was left out for a failed TLSA lookup."""
        hosts: list[tuple[str, int, str]] = []
        dane: list[tuple[str, tuple[Tlsa, ...]]] = []
        failed: dict[str, str] = {}  # hosts left out: their TLSA lookup failed (and why)
        ttl = float("inf")
        for name in names:
            addrs, addr_ttl, addr_secure = await self._lookup_addresses(name)
            ttl = min(ttl, addr_ttl)
            if addrs and self.cfg.dane and secure and addr_secure:
                records, tlsa_ttl = await self._tlsa(name, self.cfg.mx_port)
                ttl = min(ttl, tlsa_ttl)
                if isinstance(records, str):
                    # RFC 7672 2.2: a host whose TLSA lookup failed is not used.
                    failed[name] = records
                    continue
                if records is not None:
                    dane.append((name, records))
            hosts.extend((addr, self.cfg.mx_port, name) for addr in addrs)
        if not hosts and failed:
            return "; ".join(f"{n}: {why}" for n, why in failed.items()), 0.0
        site = ",".join(sorted(set(names) - set(failed)))
        if dane:
            # Its own connections: never a pooled one opened for a route without DANE (an
            # unsigned domain pointing at the same hosts), nor the other way round.
            site += "+dane"
        return Route(site, tuple(hosts), mx=True, dane=tuple(dane)), ttl

    async def _lookup_addresses(self, name: str) -> tuple[list[str], float, bool]:
        """The addresses of ``name``, the shortest TTL among the answers (negative ones
        too: an address added later is seen once the "none" has expired), and whether every
        answer was DNSSEC-validated."""
        out: list[str] = []
        ttl = float("inf")
        secure = True
        for rtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rtype)
            except dns.resolver.NXDOMAIN as exc:
                ttl = min(ttl, _nxdomain_ttl(exc))
                continue
            except dns.resolver.NoAnswer as exc:
                ttl = min(ttl, _negative_ttl(exc.response()))
                secure = secure and _secure(exc.response())
                continue
            except dns.exception.DNSException:
                ttl = 0.0  # SERVFAIL, timeout, bad name: no address of this type for now
                secure = False
                continue
            ttl = min(ttl, _remaining(answer))
            secure = secure and _secure(answer.response)
            out.extend(r.to_text() for r in answer)
        return out, ttl, secure

    async def _tlsa(self, name: str, port: int
                    ) -> tuple[tuple[Tlsa, ...] | str | None, float]:
        """``name``'s usable TLSA records (() if some exist but none is usable), None if it
        has no validated TLSA RRset, or why the lookup failed; and how long that holds."""
        try:
            answer = await self._resolver.resolve(f"_{port}._tcp.{name}", "TLSA")
        except dns.resolver.NXDOMAIN as exc:
            return None, _nxdomain_ttl(exc)
        except dns.resolver.NoAnswer as exc:
            return None, _negative_ttl(exc.response())
        except dns.exception.DNSException as exc:
            return f"{type(exc).__name__}", 0.0
        if not _secure(answer.response):
            return None, _remaining(answer)  # not validated: as if there were none
        records = usable(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer)
        return records, _remaining(answer)
