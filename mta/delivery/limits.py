"""How a site (the receiving hosts a route leads to) is treated: its connection settings come
from ``[delivery.sites]`` matched against the route's host names, never from the domain that
happened to reach the site first. A key may carry the port (``"relay.example:2525"``,
``"[2001:db8::1]:25"``, a smarthost as configured): it matches that host on that port only,
and beats the bare host name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from mta.config import DeliveryConfig, EgressSource, SitePolicy
from mta.delivery.routes import Route, wildcard_match
from mta.delivery.site import SiteLimits
from mta.envelope import domain_key

__all__ = ["route_match", "site_limits", "site_policy", "site_rate"]

T = TypeVar("T")


def _match(name: str, port: int, sites: Mapping[str, T]) -> tuple[int, T] | None:
    """The entry for one host name (on ``port``) and how specific it is: ``host:port`` (a
    smarthost as configured, ``[addr]:port`` for IPv6) beats the bare name, which beats any
    wildcard; a longer ``*.suffix`` beats a shorter one; ``*`` is left to the caller."""
    name = domain_key(name)
    for key in (f"{name}:{port}", f"[{name}]:{port}"):
        if key in sites:
            return 1 << 17, sites[key]
    for key in (name, f"[{name}]"):
        if key in sites:
            return 1 << 16, sites[key]
    return wildcard_match(name, sites)


def route_match(route: Route, table: Mapping[str, T]) -> T | None:
    """The entry of ``table`` (keyed as ``[delivery.sites]``, ``*`` aside) for ``route``:
    the most specific match among its host names (MX hosts, the smarthost, the literal
    address; each alone or with the port the route connects to), the more preferred host
    on a tie; None when none matches."""
    best: tuple[int, T] | None = None
    for name, port in dict.fromkeys((host, port) for _, port, host in route.hosts):
        found = _match(name, port, table)
        if found is not None and (best is None or found[0] > best[0]):
            best = found
    return best[1] if best is not None else None


def site_policy(route: Route, sites: Mapping[str, T]) -> T | None:
    """The entry of ``sites`` (``[delivery.sites]``, or a source's) for ``route`` (see
    :func:`route_match`); ``*`` when none matches."""
    if not sites:
        return None
    found = route_match(route, sites)
    return found if found is not None else sites.get("*")


def site_rate(dcfg: DeliveryConfig, route: Route) -> float | None:
    """The configured rate of the site ``route`` leads to (cluster-wide), or None."""
    policy = site_policy(route, dcfg.sites)
    return policy.rate if policy is not None and policy.rate is not None else dcfg.rate


def site_limits(dcfg: DeliveryConfig, route: Route, helo: str,
                source: EgressSource | None = None) -> SiteLimits:
    """The limits of the site ``route`` leads to: its ``[delivery.sites]`` entry over the
    ``[delivery]`` defaults. Through an egress ``source``: the source's own entry for the
    site first; connection limits apply per source (providers count per address), the
    site's rate to all its sources together (the dispatcher's), the source's rate to it
    alone, on this node."""
    policy: SitePolicy | None = site_policy(route, dcfg.sites)
    own = site_policy(route, source.sites) if source is not None else None
    tls = policy.tls if policy is not None and policy.tls else dcfg.tls
    own_rate = own.rate if own is not None else None
    rate = site_rate(dcfg, route) if source is None else own_rate
    return SiteLimits(
        max_connections=((own and own.max_connections) or (policy and policy.max_connections)
                         or dcfg.max_connections),
        max_messages_per_connection=((own and own.max_messages_per_connection)
                                     or (policy and policy.max_messages_per_connection)
                                     or dcfg.max_messages_per_connection),
        rate=rate,
        rate_shared=source is None,
        source_address=source.address if source is not None else "",
        # Connections STARTTLS whenever offered; "required" and "verify" are enforced per
        # transaction, the stronger of the site's and the message's domain's.
        tls="disabled" if tls == "disabled" else "opportunistic",
        tls_policy=tls if tls in ("required", "verify") else "",
        tls_ca_file=dcfg.tls_ca_file,
        connect_timeout=dcfg.connect_timeout,
        command_timeout=dcfg.command_timeout,
        data_timeout=dcfg.data_timeout,
        idle_timeout=dcfg.idle_timeout,
        helo=(source.ehlo if source is not None and source.ehlo else helo),
        reuse_timeout=dcfg.reuse_timeout,
        stall_timeout=dcfg.stall_timeout,
        keepalive=dcfg.keepalive,
    )
