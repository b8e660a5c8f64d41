"""How a site (the receiving hosts a route leads to) is treated: its connection settings come
from ``[delivery.sites]`` matched against the route's host names, never from the domain that
happened to reach the site first. A key may carry the port (``"relay.example:2525"``,
``"[2001:db8::1]:25"``, a smarthost as configured): it matches that host on that port only,
and beats the bare host name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from mta.config import DeliveryConfig, SitePolicy
from mta.delivery.routes import Route, wildcard_match
from mta.delivery.site import SiteLimits
from mta.envelope import domain_key

__all__ = ["route_match", "site_limits", "site_policy"]

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


def site_policy(route: Route, sites: dict[str, SitePolicy]) -> SitePolicy | None:
    """The ``[delivery.sites]`` entry for ``route`` (see :func:`route_match`); ``*`` when
    none matches."""
    if not sites:
        return None
    found = route_match(route, sites)
    return found if found is not None else sites.get("*")


def site_limits(dcfg: DeliveryConfig, route: Route, helo: str) -> SiteLimits:
    """The limits of the site ``route`` leads to: its ``[delivery.sites]`` entry over the
    ``[delivery]`` defaults."""
    policy = site_policy(route, dcfg.sites)
    tls = policy.tls if policy is not None and policy.tls else dcfg.tls
    return SiteLimits(
        max_connections=(policy and policy.max_connections) or dcfg.max_connections,
        max_messages_per_connection=((policy and policy.max_messages_per_connection)
                                     or dcfg.max_messages_per_connection),
        rate=policy.rate if policy is not None and policy.rate is not None else dcfg.rate,
        # Connections STARTTLS whenever offered; "required" and "verify" are enforced per
        # transaction, the stronger of the site's and the message's domain's.
        tls="disabled" if tls == "disabled" else "opportunistic",
        tls_policy=tls if tls in ("required", "verify") else "",
        tls_ca_file=dcfg.tls_ca_file,
        connect_timeout=dcfg.connect_timeout,
        command_timeout=dcfg.command_timeout,
        data_timeout=dcfg.data_timeout,
        idle_timeout=dcfg.idle_timeout,
        helo=helo,
        reuse_timeout=dcfg.reuse_timeout,
        stall_timeout=dcfg.stall_timeout,
        keepalive=dcfg.keepalive,
    )
