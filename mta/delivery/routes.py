"""Where mail for a domain goes: MX lookup (dnspython), A/AAAA fallback, null MX, smarthost,
address literals (``user@[192.0.2.1]``, ``user@[IPv6:2001:db8::1]``).

Domains whose MX sets are the same share a *site* (one pool, one throttle), as the big
providers host many domains on one set of MX hosts.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mta.config import DeliveryConfig, DomainPolicy
from mta.delivery.errors import PermanentError, TemporaryError
from mta.envelope import domain_key

__all__ = ["Route", "Router", "literal_address", "policy_for"]


@dataclass(frozen=True)
class Route:
    """Ordered (address, port, mx name) candidates for one site."""

    site: str
    hosts: tuple[tuple[str, int, str], ...]


def policy_for(domain: str, policies: dict[str, DomainPolicy]) -> DomainPolicy | None:
    """The most specific policy: exact domain, then ``*.parent`` wildcards, then ``*``."""
    domain = domain_key(domain)
    if domain in policies:
        return policies[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        wildcard = "*." + ".".join(labels[i:])
        if wildcard in policies:
            return policies[wildcard]
    return policies.get("*")


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


class Router:
    """Resolves domains to routes with a small TTL cache."""

    def __init__(self, cfg: DeliveryConfig, timeout: float = 10.0) -> None:
        self.cfg = cfg
        res = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            res.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                               for host, port in cfg.nameservers]
        res.lifetime = timeout
        res.timeout = min(timeout, 3.0)
        self._resolver = res
        self._cache: dict[str, tuple[float, Route | Exception]] = {}

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
        now = time.monotonic()
        cached = self._cache.get(domain)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], Exception):
                raise cached[1]
            return cached[1]
        try:
            route = await self._lookup(domain)
        except PermanentError as exc:
            self._cache[domain] = (now + 60, exc)
            raise
        self._cache[domain] = (now + 300, route)
        return route

    async def _lookup(self, domain: str) -> Route:
        try:
            answer = await self._resolver.resolve(domain, "MX")
            mxs = sorted(((r.preference, r.exchange.to_text(omit_final_dot=True).lower())
                          for r in answer), key=lambda m: (m[0], random.random()))
        except dns.resolver.NXDOMAIN:
            raise PermanentError(550, f"5.1.2 Domain {domain} does not exist (NXDOMAIN)"
                                 ) from None
        except dns.resolver.NoAnswer:
            mxs = []  # RFC 5321 5.1: no MX, the domain itself is the implicit MX
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise TemporaryError(451, f"4.4.3 DNS lookup of MX for {domain} failed: "
                                      f"{type(exc).__name__}") from None
        except dns.exception.DNSException as exc:
            # A name DNS itself refuses (IDNA2008 rules, label too long...): no retry helps.
            raise PermanentError(550, f"5.1.2 Bad destination domain {domain}: {exc}"
                                 ) from None
        if len(mxs) == 1 and mxs[0][1] in ("", "."):
            raise PermanentError(556, f"5.1.10 Domain {domain} accepts no mail (null MX)")
        names = [name for _, name in mxs] or [domain]
        hosts: list[tuple[str, int, str]] = []
        for name in names:
            for addr in await self._addresses(name):
                hosts.append((addr, self.cfg.mx_port, name))
        if not hosts:
            if not mxs:
                raise PermanentError(550, f"5.1.2 Domain {domain} has no MX and no address")
            raise TemporaryError(451, f"4.4.3 No address found for the MX hosts of {domain}")
        site = ",".join(sorted(set(names)))
        return Route(site, tuple(hosts))

    async def _addresses(self, name: str) -> list[str]:
        out: list[str] = []
        for rtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rtype)
                out.extend(r.to_text() for r in answer)
            except dns.exception.DNSException:
                continue  # none, SERVFAIL, timeout, bad name: no address of this type
        return out
