"""Egress: which of this node's addresses (sources) a message leaves from.

A tenant's pool (``[tenants."x"] pool``), else the domain's (``[delivery.domains."x"]
pool``), else ``[egress] default_pool`` names the sources that may carry a message; they
take turns by weight (smooth weighted round robin, per pool and site, as nginx balances
upstreams: exact shares, no bursts). A source is passed over at a site while it is blocked
there (see :class:`mta.delivery.site.Site`) or has reached its warm-up cap there today; with
``over_cap = "wait"`` a capped source's turn is a deferral instead. Without a pool, mail
leaves from the system's choice of address (the source named ``""``).

Each source and site is a site of its own for the dispatcher (its own connections, limits,
back-off, breaker and block), as large mailbox providers judge each sending address apart.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mta.config import EgressConfig, EgressSource
from mta.delivery.site import RecipientResult
from mta.durable import replace_file
from mta.logs import describe
from mta.metrics import NodeMetrics

__all__ = ["DEFAULT_SOURCE", "Egress", "WarmupLedger", "provider"]

log = structlog.get_logger("mta.delivery")

DEFAULT_SOURCE = EgressSource()  # the system's choice of address, [delivery] helo
_TURN_STATES = 10_000  # (pool, site) round-robin states kept, least recently used out first
_BLOCK_TEXT = 1000  # characters of a reply the block patterns are matched against
_SAVE_EVERY = 1.0  # seconds between writes of the warm-up counts (a crash loses at most this)


def provider(site: str) -> str:
    """The receiving side a warm-up cap counts against: the site without its DANE mark."""
    return site.removesuffix("+dane")


class WarmupLedger:
    """Messages each source has handed to each provider today (UTC), kept in a small file
    across restarts. Only sources with a warm-up ramp are counted."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._day = self.today().isoformat()
        self._counts: dict[str, dict[str, int]] = {}  # source -> provider -> count
        self._dirty = False

    def today(self) -> datetime.date:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).date()

    @property
    def day(self) -> str:
        """The day the counts are of (ISO)."""
        return self._day

    def _roll(self) -> None:
        day = self.today().isoformat()
        if day != self._day:
            self._day, self._counts, self._dirty = day, {}, True

    def count(self, source: str, site: str) -> int:
        """Today's count of ``source`` at ``site``'s provider."""
        self._roll()
        return self._counts.get(source, {}).get(provider(site), 0)

    def add(self, source: str, site: str, n: int) -> None:
        self._roll()
        per = self._counts.setdefault(source, {})
        key = provider(site)
        per[key] = max(0, per.get(key, 0) + n)
        self._dirty = True

    def load(self) -> None:
        """Read today's counts (a file from another day is no count). Blocking."""
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read())  # our own file: a day of counts, however many
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Unreadable: start from zero (logged). Counts err towards sending more, as
            # they would after a crash, never towards losing mail.
            log.warning("egress.state_unreadable", path=self.path, error=describe(exc))
            return
        if not isinstance(data, dict) or data.get("day") != self.today().isoformat():
            return
        counts = data.get("counts")
        if isinstance(counts, dict):
            self._counts = {str(s): {str(p): int(n) for p, n in per.items()
                                     if isinstance(n, int) and n > 0}
                            for s, per in counts.items() if isinstance(per, dict)}
            self._day = data["day"]

    async def save(self) -> None:
        """Write the counts if they changed since the last write."""
        self._roll()
        if not self._dirty:
            return
        self._dirty = False
        data = json.dumps({"day": self._day, "counts": self._counts}).encode()
        try:
            await asyncio.to_thread(replace_file, self.path, data)
        except OSError as exc:
            self._dirty = True
            log.warning("egress.state_write_failed", path=self.path, error=describe(exc))


@dataclass(frozen=True, slots=True)
class Pick:
    """A source for one delivery, or why there is none (a deferral for every recipient)."""

    source: str = ""
    refused: RecipientResult | None = None
    provider: str = ""  # what its warm-up booking counts against
    day: str = ""  # the (UTC) day it was booked on; "" if it was not (no cap)


class Egress:
    """Pools, sources, warm-up caps: picks the source each delivery leaves from."""

    def __init__(self, cfg: EgressConfig, metrics: NodeMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._metrics = metrics
        self.ledger = WarmupLedger(cfg.state, clock)
        # (pool, site) -> source -> current weight (smooth weighted round robin).
        self._turns: OrderedDict[tuple[str, str], dict[str, int]] = OrderedDict()

    def reconfigure(self, cfg: EgressConfig) -> None:
        """A reloaded config: new pools and sources (the counts of the day stay)."""
        self.cfg = cfg
        self._turns.clear()

    async def open(self) -> None:
        await asyncio.to_thread(self.ledger.load)

    async def run(self) -> None:
        """Write the warm-up counts once a second while they change."""
        while True:
            await asyncio.sleep(_SAVE_EVERY)
            await self.ledger.save()

    async def close(self) -> None:
        await self.ledger.save()

    # --- which source ------------------------------------------------------------------------

    def pool_for(self, tenant_pool: str, domain_pool: str) -> str:
        """The pool a message goes out through ("": none, the default address)."""
        return tenant_pool or domain_pool or self.cfg.default_pool

    def source(self, name: str) -> EgressSource:
        """A source's settings (``""``: the default address)."""
        return self.cfg.sources.get(name, DEFAULT_SOURCE) if name else DEFAULT_SOURCE

    def cap(self, name: str) -> int | None:
        """``name``'s warm-up cap per provider today, or None (no ramp, or past its end)."""
        source = self.source(name)
        if not source.warmup or source.warmup_start is None:
            return None
        day = (self.ledger.today() - source.warmup_start).days
        if day >= len(source.warmup):
            return None
        return source.warmup[max(0, day)]

    def _capped(self, name: str, site: str) -> bool:
        cap = self.cap(name)
        return cap is not None and self.ledger.count(name, site) >= cap

    def choose(self, pool: str, site: str, blocked: Callable[[str], float],
               counted_at: str = "") -> Pick:
        """The next source of ``pool`` at ``site``: sources ``blocked`` there (a monotonic
        time it is blocked until, 0 if not) are passed over; a capped one is too, or its
        turn is a deferral (``over_cap = "wait"``). ``counted_at``: the provider the
        warm-up caps count against (a ``[delivery.sites]`` key the site falls under, many
        MX sets of one provider); default, the site."""
        key = counted_at or site
        if not pool:
            if (until := blocked("")) > time.monotonic():
                return self._refused("blocked", f"Sending to {site} is blocked (retry in "
                                                f"{until - time.monotonic():.0f}s)")
            return Pick("")
        spec = self.cfg.pools.get(pool)
        if spec is None:  # a reload took it away while the attempt was under way
            return self._refused("reload", f"Pool {pool} is no longer configured")
        now = time.monotonic()
        open_ = {s: w for s, w in spec.sources.items() if blocked(s) <= now}
        if not open_:
            return self._refused("blocked", f"Every source of pool {pool} is blocked at "
                                            f"{site}")
        name = self._turn(pool, site, open_)
        if not self._capped(name, key):
            return self._charged(name, key)
        if spec.over_cap == "spill":
            room = {s: w for s, w in open_.items() if not self._capped(s, key)}
            if room:
                return self._charged(self._turn(pool, site, room), key)
            return self._refused("warmup", f"Every source of pool {pool} has reached its "
                                           f"warm-up cap at {provider(key)} today")
        return self._refused("warmup", f"Source {name} has reached its warm-up cap "
                                       f"({self.cap(name)} today) at {provider(key)}")

    def _turn(self, pool: str, site: str, weights: dict[str, int]) -> str:
        key = (pool, site)
        current = self._turns.get(key)
        if current is None:
            current = self._turns[key] = {}
            while len(self._turns) > _TURN_STATES:
                self._turns.popitem(last=False)
        self._turns.move_to_end(key)
        for name, weight in weights.items():
            current[name] = current.get(name, 0) + weight
        best = max(weights, key=lambda n: current[n])
        current[best] -= sum(weights.values())
        return best

    def _charged(self, name: str, site: str) -> Pick:
        if self.cap(name) is None:
            return Pick(name, provider=site)
        # Booked now, given back if nothing went out: concurrent picks see it.
        self.ledger.add(name, site, 1)
        return Pick(name, provider=site, day=self.ledger.day)

    def give_back(self, pick: Pick) -> None:
        """Nothing went out through ``pick``'s source: its booking is given back, if it was
        booked today (yesterday's count is gone; today's is not its to lower)."""
        if pick.day and pick.day == self.ledger.today().isoformat():
            self.ledger.add(pick.source, pick.provider, -1)

    def _refused(self, reason: str, text: str) -> Pick:
        if self._metrics is not None:
            self._metrics.egress_deferrals.labels(reason).inc()
        return Pick(refused=RecipientResult(451, f"4.7.0 {text}"))

    def is_block(self, text: str) -> bool:
        """Does a reply say the sending address is refused (a blocklist), not the message?
        Only its first 1,000 characters are looked at: the patterns are the operator's
        regular expressions, the reply is the remote's, up to 32 KiB, matched on the event
        loop (a blocklist names itself early)."""
        head = text[:_BLOCK_TEXT]
        return any(p.search(head) for p in self.cfg.block_patterns)

