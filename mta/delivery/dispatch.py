"""The dispatcher: one message's recipients at one domain go route -> site -> throttle, and
come back as per-recipient outcomes (like a relay in python-slimta: it only attempts, the
queue manager decides what an outcome means for the message).

It owns the per-site ready queues (KumoMTA's ready queues, apart from the scheduled queue),
the route cache, the domain throttles and the runtime settings, applies a reloaded config to
them, and forgets what nothing uses any more (reaping), since the domains a sender reaches
over a day are unbounded.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mta.config import Config, DeliveryConfig, DomainPolicy
from mta.coordinator import Coordinator, RuntimeSettings
from mta.delivery.breaker import Breaker
from mta.delivery.egress import Egress, Pick
from mta.delivery.errors import (
    DeliveryError,
    NotOwnerError,
    PermanentError,
    SuspendedError,
    TemporaryError,
)
from mta.delivery.limits import route_match, site_limits, site_rate
from mta.delivery.loops import LoopGuard
from mta.delivery.mtasts import StsPolicy
from mta.delivery.outcomes import Outcome, Verdict
from mta.delivery.routes import Route, Router, policy_for
from mta.delivery.runtime import RuntimeIndex
from mta.delivery.site import (
    Job,
    RecipientResult,
    Site,
    SiteLimits,
    SourceBlockedError,
    tls_policy,
)
from mta.delivery.stspolicies import StsPolicies, StsSettings, StsStore
from mta.delivery.throttle import Throttle
from mta.envelope import domain_key
from mta.logs import describe
from mta.metrics import NodeMetrics
from mta.spool import StoredMessage
from mta.tasks import cancel_and_wait

__all__ = ["Dispatcher"]

log = structlog.get_logger("mta.delivery")

# A breaker's cooldown doubles up to this many times its base (Breaker.on_failure): a site
# whose breaker is not closed is remembered at least that long, so forgetting it never lets
# connections through that its breaker would still have held back.
_BREAKER_MAX_COOLDOWNS = 16


@dataclass
class _DomainThrottle:
    throttle: Throttle
    # Monotonic time its last booked slot ends: from then on it behaves exactly as a fresh
    # throttle would, so it may be forgotten.
    until: float = 0.0


def _every(idx: list[int], verdict: Verdict, result: RecipientResult) -> dict[int, Outcome]:
    outcome = Outcome(verdict, result)
    return dict.fromkeys(idx, outcome)


class Dispatcher:
    """Routes, sites and throttles: hands jobs to sites and returns their outcomes."""

    def __init__(self, cfg: Config, coordinator: Coordinator, metrics: NodeMetrics,
                 permit: Callable[[str], bool]) -> None:
        self.dcfg = cfg.delivery
        self.tenants = cfg.tenants
        self.node_id = cfg.node.id
        self.coordinator = coordinator
        self.metrics = metrics
        self.router = Router(cfg.delivery)
        self.loops = LoopGuard(cfg.smtp.listen, self.node_id, coordinator.members)
        self.helo = cfg.delivery.helo or cfg.smtp.hostname
        # May this node send for a message's shard right now? (Asked by every site.)
        self._permit = permit
        # Per-site and per-domain tables: every one is bounded (LRU) or reaped (see reap).
        self.sites: dict[str, Site] = {}
        self._domain_throttles: dict[str, _DomainThrottle] = {}
        # domain -> key of the site it was last routed to; LRU, at most route_cache_size.
        self._site_of: OrderedDict[str, str] = OrderedDict()
        self._runtime = RuntimeIndex(RuntimeSettings())
        # domain -> the route its mail was held on by a site suspension (LRU, at most
        # route_cache_size): what to retry at once when that site is resumed.
        self._held_by_site: OrderedDict[str, Route] = OrderedDict()
        self.labels_released: set[str] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._egress_writer: asyncio.Task[None] | None = None
        self.egress = Egress(cfg.egress, metrics)
        # [delivery.sites] and sources' sites keys, each naming one provider (see _provider).
        self._provider_keys: dict[str, str] | None = None
        self.sts = StsPolicies(StsStore(cfg.delivery.mta_sts_cache), _sts_settings(self.dcfg),
                               lambda: self.router.resolver,
                               self._addresses,
                               metrics, size=10 * cfg.delivery.route_cache_size,
                               node_id=self.node_id)

    # --- lifecycle -------------------------------------------------------------------------

    async def _addresses(self, name: str) -> list[str]:
        return await self.router.addresses(name)  # the router of the day (reload replaces it)

    async def open(self) -> None:
        """Load what must be known before the first delivery (cached MTA-STS policies,
        today's warm-up counts)."""
        await self.sts.open()
        await self.egress.open()

    def start(self) -> None:
        """Start reaping idle sites, and writing the warm-up counts."""
        self._reaper = asyncio.create_task(self._reap_loop(), name="delivery:reaper")
        self._egress_writer = asyncio.create_task(self.egress.run(), name="delivery:egress")

    async def stop_reaping(self) -> None:
        """Stop the reaper (before the sites close)."""
        await cancel_and_wait(self._reaper)
        self._reaper = None

    async def close_sites(self) -> None:
        """Close every site: queued jobs fail, connections are closed."""
        for site in self.sites.values():
            await site.close()
        await self.sts.close()
        await cancel_and_wait(self._egress_writer)
        self._egress_writer = None
        await self.egress.close()

    def drop(self, match: Callable[[Job], bool]) -> int:
        """Fail at once, unsent, the queued jobs ``match`` selects; returns how many."""
        return sum(site.drop(match) for site in self.sites.values())

    # --- settings --------------------------------------------------------------------------

    def apply_runtime(self, settings: RuntimeSettings) -> Callable[[str], bool] | None:
        """Apply the cluster's runtime settings. Returns which domains were held (by a
        domain or a site suspension) and no longer are, to retry now; None if none can be."""
        before, now = self._runtime, RuntimeIndex(settings)
        self._runtime = now
        # tenant:/campaign: keys resumed now: the engine retries their mail at once.
        self.labels_released = before.labels_held - now.labels_held
        for site in self.sites.values():
            # A source's site: the runtime rate is the site's as a whole (the dispatcher's).
            site.rate_override = None if site.source else now.site_rate(site.route)
            held = now.site_hold(site.route)
            if held != site.held_by:
                log.info("delivery.site_suspended" if held else "delivery.site_resumed",
                         site=site.key, key=held or site.held_by, node_id=self.node_id)
            site.held_by = held
            # Jobs already queued there go back unsent: a suspension takes effect for them
            # too, not only for the attempts that start after it.
            site.give_back(functools.partial(self._hold_of, site))
        freed = {d for d, route in self._held_by_site.items() if now.site_hold(route) is None}
        for domain in freed:
            del self._held_by_site[domain]
        if not freed and before.settings.suspended <= settings.suspended:
            return None

        def resumed(domain: str) -> bool:
            was = domain in freed or before.domain_hold(domain) is not None
            return was and now.domain_hold(domain) is None
        return resumed

    def _hold_of(self, site: Site, job: Job) -> str | None:
        """The runtime key holding a job queued at ``site`` (the site's, its domain's, its
        tenant's or its campaign's)."""
        return (site.held_by or self._runtime.domain_hold(job.domain)
                or self._runtime.label_hold(job.tenant, job.campaign))

    def label_hold(self, tenant: str, campaign: str) -> str | None:
        """The ``tenant:``/``campaign:`` key an operator holds this mail with, or None."""
        return self._runtime.label_hold(tenant, campaign)

    def suspended(self, domain: str) -> bool:
        """Is delivery to ``domain`` suspended by an operator (exactly or by a wildcard)?"""
        return self._runtime.domain_hold(domain) is not None

    def held_by(self, domain: str) -> str | None:
        """The runtime key holding ``domain``'s mail: a domain key (exact or wildcard), or
        the ``site:`` key of the site it was last routed to; None if it is not held."""
        hold = self._runtime.domain_hold(domain)
        if hold is None:
            site = self.sites.get(self._site_of.get(domain, ""))
            route = site.route if site is not None else self._held_by_site.get(domain)
            hold = self._runtime.site_hold(route) if route is not None else None
        return hold

    def reload(self, cfg: Config) -> None:
        """Apply a re-read config's delivery policies (SIGHUP): rates, site limits, TLS modes
        and smarthosts; sites keep their open connections."""
        self.dcfg = cfg.delivery
        self.router = Router(cfg.delivery)
        self.tenants = cfg.tenants
        self.sts.reconfigure(_sts_settings(cfg.delivery))
        self.egress.reconfigure(cfg.egress)
        self._provider_keys = None
        for site in self.sites.values():
            self._configure(site)

    def domain_rate(self, domain: str) -> float | None:
        """The rate of ``domain`` (msgs/s, cluster-wide), or None: the most specific runtime
        throttle (exact, else the longest ``*.suffix``, each matching domain limited on its
        own), else the configured policy's."""
        rate = self._runtime.domain_rate(domain)
        if rate is None:
            policy = policy_for(domain, self.dcfg.domains)
            rate = policy.rate if policy else None
        return rate

    def site_of(self, domain: str) -> str | None:
        """Key of the site ``domain`` was last routed to, if it has been tried."""
        return self._site_of.get(domain)

    def tenant_rate(self, tenant: str) -> float | None:
        """The rate of ``tenant``'s messages (cluster-wide): its runtime throttle, else its
        ``[tenants."x"] rate``, else None."""
        rate = self._runtime.tenant_rates.get(tenant)
        if rate is None and (policy := self.tenants.names.get(tenant)) is not None:
            rate = policy.rate
        return rate

    def sizes(self) -> dict[str, int]:
        """How big each table is (sites, routes, domains routed, domain throttles)."""
        return {"sites": len(self.sites), "routes": len(self.router),
                "domains": len(self._site_of), "domain_throttles": len(self._domain_throttles)}

    # --- delivery --------------------------------------------------------------------------

    async def deliver(self, stored: StoredMessage, domain: str, idx: list[int]
                      ) -> dict[int, Outcome]:
        """Try recipients ``idx`` (all at ``domain``) of ``stored``; an outcome for each."""
        try:
            return await self._deliver(stored, domain, idx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("delivery.group_crashed", message_id=stored.id, domain=domain,
                          node_id=self.node_id, error=describe(exc))
            return _every(idx, Verdict.DEFERRED, RecipientResult(
                451, f"4.3.0 Internal error ({type(exc).__name__}), will retry"))

    async def _deliver(self, stored: StoredMessage, domain: str, idx: list[int]
                       ) -> dict[int, Outcome]:
        env = stored.envelope
        if (hold := self._runtime.label_hold(env.tenant, env.campaign)) is not None:
            return self._held(domain, None, hold, idx)
        try:
            route = await self.router.route(domain)
        except DeliveryError as exc:
            verdict = Verdict.BOUNCED if exc.permanent else Verdict.DEFERRED
            return _every(idx, verdict, RecipientResult(exc.code, exc.text))
        outside = await self.loops.outside(route)
        if outside is None:
            # Handing it to ourselves would accept it again as a new message, for ever.
            log.warning("delivery.loops_back", message_id=stored.id, node_id=self.node_id,
                        domain=domain, site=route.site)
            return _every(idx, Verdict.BOUNCED, RecipientResult(
                554, f"5.4.6 mail for {domain} loops back to myself"))
        route = outside
        sts = None
        if route.mx and self.dcfg.mta_sts:
            sts = await self.sts.policy(domain_key(domain))
            if sts is not None and sts.mode == "none":
                sts = None
            if sts is not None and sts.mode == "enforce":
                # RFC 8461 4.1: only MX hosts the policy names; none left is a temporary
                # failure, never a delivery elsewhere.
                kept = route.only(sts.matches)
                if kept is None:
                    self.metrics.outbound_mta_sts.labels("enforce", "failed").inc()
                    return _every(idx, Verdict.DEFERRED, RecipientResult(
                        451, f"4.7.5 No MX host of {domain} matches its MTA-STS policy "
                             f"(mx: {', '.join(sts.mx)[:200]})"))
                route = kept
        return await self._through_sources(stored, domain, idx, route, sts)

    async def _through_sources(self, stored: StoredMessage, domain: str, idx: list[int],
                               route: Route, sts: StsPolicy | None) -> dict[int, Outcome]:
        """The job through the sources of its pool in turn: one the site refuses before the
        job is tried (blocked, gone from the config, unable to reach it) hands it to the
        next one."""
        policy = policy_for(domain, self.dcfg.domains)
        pool = self.egress.pool_for(self._tenant_pool(stored.envelope.tenant),
                                    policy.pool if policy else "")
        tried: set[str] = set()
        # Warm-up caps count per provider; only a pool's sources have caps.
        provider = self._provider(route) if pool else ""

        def blocked(source: str) -> float:
            return math.inf if source and source in tried else self._blocked_until(route,
                                                                                   source)
        for _ in range(len(self.egress.cfg.pools[pool].sources) + 1 if pool else 2):
            pick = self.egress.choose(pool, route.site, blocked, provider)
            if pick.refused is not None:
                return _every(idx, Verdict.DEFERRED, pick.refused)
            try:
                out = await self._deliver_via(stored, domain, idx, route, pick, pool, policy,
                                              sts)
            except BaseException:
                # Cancelled (shutdown, a shard handed over) or crashed: nothing went out
                # through it, so its warm-up booking comes back.
                self.egress.give_back(pick)
                raise
            if out is not None:
                return out
            tried.add(pick.source)
            self.egress.give_back(pick)
        return _every(idx, Verdict.DEFERRED, RecipientResult(
            451, f"4.7.0 Every source is blocked at {route.site}"))

    async def _deliver_via(self, stored: StoredMessage, domain: str, idx: list[int],
                           route: Route, pick: Pick, pool: str, policy: DomainPolicy | None,
                           sts: StsPolicy | None) -> dict[int, Outcome] | None:
        """The job through ``pick``'s source; None if the site refused the source first."""
        env = stored.envelope
        site = self._site_for(route, pick.source)
        self._note_site_of(domain, site.key)
        if site.held_by is not None:
            self.egress.give_back(pick)
            return self._held(domain, route, site.held_by, idx)
        # Held from here (no await before) until its job is done: the reaper must not forget
        # a site an attempt is about to queue on.
        with site.held():
            # Wait for the domain's own throttle here, not on a pooled connection: a slow
            # domain behind a shared site (a smarthost, a big provider's MX set) must not
            # hold a connection that other domains' mail could use.
            await self._throttle_wait(domain, self.domain_rate(domain))
            if pool or self.egress.cfg.pools:
                # The site's rate is for all its sources together, the default address
                # (mail of no pool) among them.
                await self._throttle_wait(f"site:{route.site}", self._site_rate(route))
            if (hold := self._runtime.domain_hold(domain)) is not None:
                self.egress.give_back(pick)
                return self._held(domain, None, hold, idx)  # suspended while it waited
            tls = policy.tls if policy and policy.tls else self.dcfg.tls
            if sts is not None and sts.mode == "enforce":
                tls = tls_policy(tls, "verify")
            job = Job(stored.id, domain, env.sender, [env.recipients[i] for i in idx],
                      stored.body, env.smtputf8, env.body_8bit, tls=tls, sts=sts,
                      tenant=env.tenant, campaign=env.campaign, dane=route.dane)
            out = await self._deliver_job(site, job, idx)
        if out is not None and pick.source and not any(o.result.source for o in out.values()):
            self.egress.give_back(pick)  # nothing went out through it
        return out

    def _tenant_pool(self, tenant: str) -> str:
        policy = self.tenants.names.get(tenant) if tenant else None
        return policy.pool if policy is not None else ""

    def _provider(self, route: Route) -> str:
        """What a warm-up cap at ``route``'s site counts against: the ``[delivery.sites]``
        or ``[egress.sources."x".sites]`` key it falls under (``*.mail.protection.outlook.
        com``: one provider, an MX set per customer domain), else the site itself."""
        if self._provider_keys is None:
            keys = set(self.dcfg.sites)
            for source in self.egress.cfg.sources.values():
                keys.update(source.sites)
            keys.discard("*")
            self._provider_keys = {k: k for k in keys}
        if not self._provider_keys:
            return route.site
        return route_match(route, self._provider_keys) or route.site

    def _blocked_until(self, route: Route, source: str) -> float:
        site = self.sites.get(_site_key(route.site, source))
        return site.blocked_until if site is not None else 0.0

    def _site_rate(self, route: Route) -> float | None:
        rate = self._runtime.site_rate(route)
        return rate if rate is not None else site_rate(self.dcfg, route)

    def _held(self, domain: str, route: Route | None, key: str, idx: list[int]
              ) -> dict[int, Outcome]:
        """Outcomes of recipients an operator's suspension (``key``) kept from being tried;
        a site suspension notes the domain, to retry it as soon as the site is resumed."""
        if route is not None:
            self._held_by_site[domain] = route
            self._held_by_site.move_to_end(domain)
            while len(self._held_by_site) > self.dcfg.route_cache_size:
                self._held_by_site.popitem(last=False)
        log.debug("delivery.held", domain=domain, key=key, node_id=self.node_id)
        return _every(idx, Verdict.HELD, RecipientResult(
            451, f"4.3.2 Delivery suspended by the operator ({key})"))

    async def _deliver_job(self, site: Site, job: Job, idx: list[int]
                           ) -> dict[int, Outcome] | None:
        try:
            results = await site.deliver(job)
        except SourceBlockedError:
            return None
        except SuspendedError as exc:
            site_hold = exc.key == site.held_by
            return self._held(job.domain, site.route if site_hold else None, exc.key, idx)
        except NotOwnerError as exc:
            return _every(idx, Verdict.NOT_SENT, RecipientResult(exc.code, exc.text))
        except PermanentError as exc:
            return _every(idx, Verdict.BOUNCED, RecipientResult(exc.code, exc.text, exc.remote))
        except TemporaryError as exc:
            return _every(idx, Verdict.DEFERRED,
                          RecipientResult(exc.code, exc.text, exc.remote))
        out: dict[int, Outcome] = {}
        for i, result in zip(idx, results, strict=True):
            verdict = (Verdict.DELIVERED if 200 <= result.code < 300
                       else Verdict.BOUNCED if result.code >= 500 else Verdict.DEFERRED)
            out[i] = Outcome(verdict, result)
        return out

    def _site_for(self, route: Route, source: str = "") -> Site:
        key = _site_key(route.site, source)
        site = self.sites.get(key)
        if site is not None:
            site.route = route
            return site
        d = self.dcfg
        site = Site(key, route, self._limits(route, source),
                    Breaker(d.breaker_failures, d.breaker_cooldown),
                    self.coordinator.rate_share, self.node_id,
                    permit=self._permit, metrics=self.metrics, weight_of=self._weight)
        site.source = source
        self._configure(site, site.limits)
        site.rate_override = None if source else self._runtime.site_rate(route)
        site.held_by = self._runtime.site_hold(route)
        self.sites[key] = site
        return site

    def _limits(self, route: Route, source: str) -> SiteLimits:
        """The limits of ``route``'s site through ``source`` ("": the default address)."""
        spec = self.egress.source(source) if source else None
        return site_limits(self.dcfg, route, self.helo, spec)

    def _configure(self, site: Site, limits: SiteLimits | None = None) -> None:
        """A site's limits (``limits``, if just computed) and block handling from the config
        of the day."""
        if site.source and site.source not in self.egress.cfg.sources:
            site.retire()  # gone from the config: never from another address than its own
            return
        site.retired = False
        site.limits = limits or self._limits(site.route, site.source)
        site.is_block = self.egress.is_block
        site.block_backoff = (self.egress.cfg.block_backoff, self.egress.cfg.block_backoff_max)

    def _weight(self, tenant: str) -> int:
        policy = self.tenants.names.get(tenant)
        return policy.weight if policy is not None else 1

    def _note_site_of(self, domain: str, key: str) -> None:
        self._site_of[domain] = key
        self._site_of.move_to_end(domain)
        while len(self._site_of) > self.dcfg.route_cache_size:
            self._site_of.popitem(last=False)

    async def _throttle_wait(self, key: str, rate: float | None) -> None:
        """Wait for a slot of the cluster-wide ``rate`` of ``key`` (a domain, or ``site:``
        and a site's key: a site reached through several sources)."""
        if rate is None:
            return
        rate *= self.coordinator.rate_share()
        entry = self._domain_throttles.get(key)
        if entry is None or entry.throttle.rate != rate:
            # A new rate applies at once (its slots start now); any other change (a runtime
            # setting of someone else, a reload) keeps the slots already booked.
            entry = self._domain_throttles[key] = _DomainThrottle(Throttle(rate))
        wait = entry.throttle.reserve()
        entry.until = time.monotonic() + wait + 1.0 / rate
        if wait > 0:
            await asyncio.sleep(wait)

    # --- reaping ---------------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            # A quarter of site_idle between looks (a site goes at most that late), read
            # each time so a reload applies.
            await asyncio.sleep(min(30.0, max(0.05, self.dcfg.site_idle / 4)))
            try:
                self.reap()
            except Exception as exc:
                # One bad pass must not end reaping for the life of the node.
                log.exception("delivery.reap_failed", node_id=self.node_id,
                              error=describe(exc))

    def reap(self) -> int:
        """Forget what nothing uses any more: sites idle for ``site_idle`` (longer for one
        whose breaker or back-off is still in force), the domains routed to them, domain
        throttles whose last slot has passed, and expired routes. Returns sites dropped."""
        now = time.monotonic()
        gone = self._idle_sites(now)
        for key in gone:
            # Idle: no job, worker or connection to close; nobody holds a reference to it.
            del self.sites[key]
        if gone:
            for domain in [dom for dom, key in self._site_of.items() if key in gone]:
                del self._site_of[domain]
        spent = [dom for dom, entry in self._domain_throttles.items() if entry.until <= now]
        for domain in spent:
            del self._domain_throttles[domain]
        routes = self.router.prune()
        if gone or spent or routes:
            log.debug("delivery.reaped", node_id=self.node_id, sites=len(gone),
                      domain_throttles=len(spent), routes=routes, sites_left=len(self.sites),
                      routes_left=len(self.router))
        return len(gone)

    def _idle_sites(self, now: float) -> set[str]:
        d = self.dcfg
        unsettled = max(d.site_idle, _BREAKER_MAX_COOLDOWNS * d.breaker_cooldown)
        gone: set[str] = set()
        for key, site in self.sites.items():
            idle = site.idle_for(now)
            if idle <= 0.0:
                continue
            if site.blocked(now):
                continue  # forgetting it would end its block early
            limit = d.site_idle if site.settled() else unsettled
            if site.block_level:
                # Blocked before and not yet cleared by a delivery: the next block there must
                # last longer, so its level outlives the longest back-off.
                limit = max(limit, 2 * self.egress.cfg.block_backoff_max)
            if site.throttle.rate:
                # Its throttle's last slot must have passed too, or a new site for the same
                # hosts would send sooner than the rate allows.
                limit = max(limit, 1.0 / site.throttle.rate)
            if idle >= limit:
                gone.add(key)
        return gone


def _site_key(site: str, source: str) -> str:
    """A site's key in the table: one per source it is reached through."""
    return f"{site}@{source}" if source else site


def _sts_settings(dcfg: DeliveryConfig) -> StsSettings:
    return StsSettings(dcfg.mta_sts_port, dcfg.mta_sts_timeout, dcfg.tls_ca_file)
