"""Runtime suspensions and throttles (``mtactl suspend`` / ``throttle set``), matched against
recipient domains and delivery sites.

A key of :class:`~mta.coordinator.RuntimeSettings` (and of etcd's ``config/suspend/<key>``
and ``config/throttle/<key>``) is one of:

- a domain: ``example.com`` (that domain exactly) or ``*.example.com`` (every subdomain, at
  any depth, but not ``example.com`` itself: the ``[delivery.domains]`` semantics of
  :func:`~mta.delivery.routes.wildcard_match`);
- a site: ``site:`` and a ``[delivery.sites]`` key, matched as that table is against the
  host names of a domain's route: ``site:mx1.example.net``,
  ``site:*.mail.protection.outlook.com``, ``site:relay.example:2525`` (a smarthost),
  ``site:[192.0.2.1]``. No domain has a colon, so the prefix cannot be mistaken for one,
  and every key stored before sites existed reads as the domain it always was;
- (suspensions only) a tenant or a campaign: ``tenant:acme``, ``campaign:spring`` holds
  every message sent for that tenant or of that campaign, whatever its domains;
- (throttles) a tenant: ``tenant:acme`` limits that tenant's messages (its runtime rate, over
  ``[tenants."acme"] rate``), in the scheduler;
- (throttles only, as before) a bare key equal to a site's key as ``mtactl queue`` shows
  it (``mx1.example.net,mx2.example.net``, ``smarthost:host:port``) sets that site's rate.

What an operator may send is checked at the API edge (:mod:`mta.admin.keys`). The most
specific key wins: an exact domain over a wildcard, a longer ``*.suffix`` over a
shorter one; any runtime throttle over a configured rate.
"""

from __future__ import annotations

from mta.coordinator import RuntimeSettings
from mta.delivery.limits import route_match
from mta.delivery.routes import Route, wildcard_match

__all__ = ["LABEL_PREFIXES", "SITE_PREFIX", "TENANT_PREFIX", "RuntimeIndex"]

SITE_PREFIX = "site:"
TENANT_PREFIX = "tenant:"
LABEL_PREFIXES = (TENANT_PREFIX, "campaign:")

class RuntimeIndex:
    """One :class:`RuntimeSettings`, split by kind of key for matching."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.domains_held: dict[str, str] = {}
        self.sites_held: dict[str, str] = {}  # [delivery.sites]-style pattern -> stored key
        self.labels_held: set[str] = set()  # tenant:NAME, campaign:NAME
        for key in settings.suspended:
            if key.startswith(LABEL_PREFIXES):
                self.labels_held.add(key)
            elif key.startswith(SITE_PREFIX):
                self.sites_held[key[len(SITE_PREFIX):]] = key
            else:
                self.domains_held[key] = key
        self.domain_rates: dict[str, float] = {}  # bare keys: domains, and legacy site keys
        self.site_rates: dict[str, float] = {}
        self.tenant_rates: dict[str, float] = {}  # tenant name -> rate
        for key, rate in settings.throttles.items():
            if key.startswith(SITE_PREFIX):
                self.site_rates[key[len(SITE_PREFIX):]] = rate
            elif key.startswith(TENANT_PREFIX):
                self.tenant_rates[key[len(TENANT_PREFIX):]] = rate
            else:
                self.domain_rates[key] = rate

    def domain_hold(self, domain: str) -> str | None:
        """The domain key (exact, else the longest wildcard) holding ``domain``, or None."""
        if domain in self.domains_held:
            return domain
        found = wildcard_match(domain, self.domains_held)
        return found[1] if found is not None else None

    def label_hold(self, tenant: str, campaign: str) -> str | None:
        """The ``tenant:`` or ``campaign:`` key holding mail of ``tenant`` / ``campaign``."""
        if not self.labels_held:
            return None
        for key in (f"tenant:{tenant}" if tenant else "", f"campaign:{campaign}" if campaign
                    else ""):
            if key in self.labels_held:
                return key
        return None

    def site_hold(self, route: Route) -> str | None:
        """The site key holding the site ``route`` leads to, or None."""
        return route_match(route, self.sites_held) if self.sites_held else None

    def domain_rate(self, domain: str) -> float | None:
        """The runtime rate of ``domain``: exact key, else the longest wildcard."""
        rate = self.domain_rates.get(domain)
        if rate is None:
            found = wildcard_match(domain, self.domain_rates)
            rate = found[1] if found is not None else None
        return rate

    def site_rate(self, route: Route) -> float | None:
        """The runtime rate of the site ``route`` leads to: a bare key equal to its site key
        (it names exactly this site), else the most specific ``site:`` key."""
        rate = self.domain_rates.get(route.site.removesuffix("+dane"))
        if rate is None and self.site_rates:
            rate = route_match(route, self.site_rates)
        return rate
