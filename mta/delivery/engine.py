"""The outbound engine: scheduled queue -> per-domain jobs -> site pools -> outcomes.

A small facade over three parts, cut as python-slimta (a queue that owns retry, expiry and
bounces; a relay that only attempts) and KumoMTA (the scheduled queue apart from per-site
ready queues) cut theirs:

- :class:`~mta.delivery.queue_manager.QueueManager`: which message is tried when, what an
  attempt's outcomes mean for it (retry, expiry, bounce and DSN), making them durable;
- :class:`~mta.delivery.dispatch.Dispatcher`: route -> site -> throttle, config reload,
  reaping of idle sites;
- :class:`~mta.delivery.outcomes.OutcomeRecorder`: accounting lines, metrics, probe watchers.

The node, the admin API and the tests use this class only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from mta.accounting import AccountingLog
from mta.config import Config
from mta.coordinator import Coordinator, RuntimeSettings
from mta.delivery.dispatch import Dispatcher
from mta.delivery.outcomes import OutcomeRecorder
from mta.delivery.pipelining import install as install_pipelining
from mta.delivery.queue_manager import QueueManager
from mta.delivery.routes import Router
from mta.delivery.site import Site
from mta.delivery.smtpdata import install as install_data_fast_paths
from mta.metrics import NodeMetrics
from mta.queue import Scheduler
from mta.spool import Spool
from mta.spool.index import MessageRef

__all__ = ["DeliveryEngine"]

log = structlog.get_logger("mta.delivery")


class DeliveryEngine:
    """Delivers the live messages of the shards this node owns."""

    def __init__(self, cfg: Config, spool: Spool, coordinator: Coordinator,
                 metrics: NodeMetrics, accounting: AccountingLog) -> None:
        install_data_fast_paths()
        install_pipelining()
        self.node_id = cfg.node.id
        self.coordinator = coordinator
        self.recorder = OutcomeRecorder(accounting, metrics, self.node_id)
        self.dispatcher = Dispatcher(cfg, coordinator, metrics, permit=self._may_send)
        self.queue = QueueManager(cfg, spool, coordinator, self.dispatcher, self.recorder)

    # --- what the node's gauges, the admin API and tests read -------------------------------

    @property
    def sites(self) -> dict[str, Site]:
        """Site key -> Site (its ``ready`` queue, ``connections``, ``breaker``)."""
        return self.dispatcher.sites

    @property
    def scheduler(self) -> Scheduler:
        """The scheduled queue (``len()``: messages waiting for their next attempt)."""
        return self.queue.scheduler

    @property
    def router(self) -> Router:
        """The route cache (MX lookups)."""
        return self.dispatcher.router

    @property
    def watch_senders(self) -> set[str]:
        """Senders (the probe's) whose first outcomes are kept for late watchers."""
        return self.recorder.watch_senders

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow the cluster's runtime settings, start scheduling and reaping."""
        await self.dispatcher.open()
        self.dispatcher.apply_runtime(self.coordinator.runtime())
        self.coordinator.watch_runtime(self._on_runtime)
        self.queue.start()
        self.dispatcher.start()

    async def stop(self, grace: float) -> None:
        """Stop scheduling; let in-flight attempts finish for up to ``grace`` seconds."""
        await self.dispatcher.stop_reaping()
        await self.queue.stop(grace)
        await self.dispatcher.close_sites()

    def fence(self, reason: str) -> None:
        """Stop delivering at once: schedule nothing, fail every queued job unsent, and let
        attempts in flight stop before their next SMTP command (a transaction already in
        DATA runs to its reply, which is recorded if the spool still takes it). Another node
        may own these shards any moment now; their messages stay in the spool."""
        self.queue.fence()
        dropped = self.dispatcher.drop(lambda _job: True)
        log.warning("delivery.fenced", node_id=self.node_id, reason=reason,
                    queued_dropped=dropped, attempts_in_flight=self.attempts_in_flight())

    def unfence(self) -> None:
        """The lease is provably held again: schedule what fencing dropped (every live
        message of a shard still ours that is neither scheduled nor in flight)."""
        found = self.queue.unfence()
        log.info("delivery.unfenced", node_id=self.node_id, rescheduled=found)

    @property
    def fenced(self) -> bool:
        """Is delivery fenced (nothing scheduled, queued or sent until unfence)?"""
        return self.queue.fenced

    def attempts_in_flight(self) -> int:
        """Attempts running now (loading, routing, queued at a site, or sending)."""
        return self.queue.attempts_in_flight()

    def _may_send(self, message_id: str) -> bool:
        return self.queue.may_send(message_id)

    def _on_runtime(self, settings: RuntimeSettings) -> None:
        resumed = self.dispatcher.apply_runtime(settings)
        self.queue.scheduler.wake()  # a tenant's new rate applies to its waiting mail now
        if resumed is not None:
            # Mail a resume released goes now, not at its next periodic look.
            flushed = self.queue.flush_matching(resumed)
            log.info("delivery.resumed", node_id=self.node_id, rescheduled=flushed)
        if released := self.dispatcher.labels_released:
            flushed = self.queue.flush_labels(released)
            log.info("delivery.resumed", node_id=self.node_id, keys=sorted(released),
                     rescheduled=flushed)

    # --- shards and messages ---------------------------------------------------------------

    def add_shard(self, shard: int) -> int:
        """Schedule every live message of a newly owned shard; returns how many."""
        return self.queue.add_shard(shard)

    async def remove_shard(self, shard: int, grace: float = 10.0) -> None:
        """Stop new work on a shard and wait (bounded) for its attempts in flight."""
        await self.queue.remove_shard(shard, grace)

    def sweep(self) -> int:
        """Schedule every live message nothing has scheduled; returns how many."""
        return self.queue.sweep()

    def enqueue(self, message_id: str) -> None:
        """A message just accepted: try it now."""
        self.queue.enqueue(message_id)

    def flush(self, domain: str | None = None, labels: set[str] | None = None) -> int:
        """Retry now every waiting message (for ``domain`` only, or of the ``tenant:`` /
        ``campaign:`` keys in ``labels``, if given)."""
        if labels:
            return self.queue.flush_labels(labels)
        return self.queue.flush(domain)

    def live_refs(self) -> list[MessageRef]:
        """Index entries of every live message in the shards this engine delivers."""
        return self.queue.live_refs()

    def next_attempt(self, message_id: str) -> float | None:
        """When the message will be tried next (epoch); None while in flight."""
        return self.queue.next_attempt(message_id)

    def in_flight(self, message_id: str) -> bool:
        """Is an attempt at ``message_id`` running now?"""
        return self.queue.in_flight(message_id)

    def site_of(self, domain: str) -> str | None:
        """Key of the site ``domain`` was last routed to, if it has been tried."""
        return self.dispatcher.site_of(domain)

    def domain_rate(self, domain: str) -> float | None:
        """The configured or runtime rate of ``domain`` (msgs/s, cluster-wide), or None."""
        return self.dispatcher.domain_rate(domain)

    def held_by(self, domain: str) -> str | None:
        """The runtime key (domain, ``*.suffix`` or ``site:...``) holding ``domain``'s mail."""
        return self.dispatcher.held_by(domain)

    # --- operator actions ------------------------------------------------------------------

    async def bounce(self, message_id: str, domain: str | None = None,
                     timeout: float = 30.0) -> int:
        """Bounce (with a DSN) the pending recipients of a live message, at ``domain`` only if
        given; returns how many, once durable. Raises MessageNotFound, TimeoutError."""
        return await self.queue.bounce(message_id, domain, timeout)

    async def bounce_domain(self, domain: str, timeout: float = 60.0) -> tuple[int, int]:
        """Bounce every pending recipient at ``domain``; returns (messages, recipients)."""
        return await self.queue.bounce_domain(domain, timeout)

    async def set_held(self, message_id: str, held: bool, timeout: float = 30.0) -> bool:
        """Hold a live message (not attempted, so not expired, until released; durable) or
        release it; False when it already was so. Raises MessageNotFound, TimeoutError."""
        return await self.queue.set_held(message_id, held, timeout)

    def is_held(self, message_id: str) -> bool:
        """Does an operator hold this live message?"""
        return self.queue.is_held(message_id)

    async def delete(self, message_id: str, timeout: float = 30.0) -> int:
        """End a live message without a DSN (AdminDelete lines, then DONE); returns the
        pending recipients dropped. Raises MessageNotFound, TimeoutError."""
        return await self.queue.delete(message_id, timeout)

    def retry(self, message_id: str) -> str:
        """Try a live message now: ``scheduled``, ``in_flight`` or ``held`` (not done).
        Raises MessageNotFound."""
        return self.queue.retry(message_id)

    def watch(self, message_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future that gets the first recipient outcome (any kind) of ``message_id``."""
        return self.recorder.watch(message_id)

    def unwatch(self, message_id: str) -> None:
        """Forget the watcher of ``message_id``."""
        self.recorder.unwatch(message_id)

    def reload(self, cfg: Config) -> None:
        """Apply a re-read config's delivery policies (SIGHUP): rates, site limits, TLS modes,
        smarthosts, retry and expiry; sites keep their open connections."""
        self.queue.reload(cfg)
        self.dispatcher.reload(cfg)

    def reap(self) -> int:
        """Forget idle sites, their domains, spent throttles and expired routes; returns
        sites dropped."""
        return self.dispatcher.reap()
