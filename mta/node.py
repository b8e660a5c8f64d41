"""A node: startup, main loop and shutdown of spool, coordinator, SMTP and admin listeners."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog
from prometheus_client import Counter

from mta.accounting import AccountingLog
from mta.config import Config, ConfigError, Secret, load_config
from mta.coordinator import Coordinator, LocalCoordinator, Replication
from mta.delivery.engine import DeliveryEngine
from mta.dkim.errors import SigningStartError
from mta.dkim.keys import DkimKeyError
from mta.dkim.signer import Signer, build_signer
from mta.envelope import Envelope
from mta.events import EventShipper, shippers
from mta.gauges import NodeGauges, ReplicationGauges
from mta.ingress import IngressServer, load_tls_context
from mta.ingress.auth import UsersFile, UsersFileError
from mta.logs import describe
from mta.metrics import NodeMetrics
from mta.probe import Prober
from mta.replication.service import ReplicationService
from mta.sdnotify import notify, watchdog_interval
from mta.slo import SloTracker
from mta.spool import RecoveryReport, Spool
from mta.supervise import supervise
from mta.tasks import cancel_and_wait, keep

__all__ = ["Node", "StartupError", "needs_restart"]

log = structlog.get_logger("mta.node")


class StartupError(Exception):
    """The node cannot start; the message says what to fix. ``exit_code`` 2 = configuration."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _load_users(cfg: Config) -> UsersFile | None:
    if not cfg.smtp.users_file:
        return None
    try:
        return UsersFile.load(cfg.smtp.users_file)
    except UsersFileError as exc:
        raise StartupError(f"{cfg.source}: [smtp] users_file: {exc}", 2) from None


def _load_tls(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.smtp.tls_cert:
        return None
    try:
        return load_tls_context(cfg.smtp.tls_cert, cfg.smtp.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"{cfg.source}: [smtp] tls_cert/tls_key: cannot load the pair: "
                           f"{exc}", 2) from None


def _load_signer(cfg: Config) -> Signer | None:
    try:
        return build_signer(cfg.dkim)
    except DkimKeyError as exc:  # the file changed between the config check and now
        raise StartupError(f"{cfg.source}: [dkim] key: {exc}", 2) from None


def _tenant_hooks(cfg: Config) -> dict[str, tuple[str, Secret | None]]:
    """Each tenant's webhook (url and secret): what its event shipper was built from."""
    return {name: (t.events_url, t.events_secret) for name, t in cfg.tenants.names.items()
            if t.events_url or t.events_secret is not None}


def needs_restart(old: Config, new: Config) -> list[str]:
    """What a reload from ``old`` to ``new`` changes that only a restart applies (logged by
    SIGHUP as ``needs_restart``): section names, or ``section.key``."""
    out = [name for name in ("node", "spool", "cluster", "admin", "probe", "events")
           if getattr(new, name) != getattr(old, name)]
    if new.slo.sample_interval != old.slo.sample_interval:
        out.append("slo.sample_interval")  # objectives apply at once
    if new.delivery.enabled != old.delivery.enabled:
        out.append("delivery.enabled")
    if _tenant_hooks(new) != _tenant_hooks(old):
        out.append("tenants.events")  # a tenant's events_url or events_secret: its shipper
    files = {"tls_cert": "", "tls_key": "", "users_file": ""}
    if replace(new.smtp, **files) != replace(old.smtp, **files):
        out.append("smtp")
    return out


def _events_loop(shipper: EventShipper) -> str:
    """The loop's name: "events" (every record), "events:tenant:acme" (one tenant's)."""
    return "events" if shipper.target == "all" else f"events:{shipper.target}"


class Node:
    """One mta node. ``start`` brings it up; ``stop`` takes it down without losing mail."""

    def __init__(self, cfg: Config, coordinator: Coordinator | None = None) -> None:
        self.cfg = cfg
        self.node_id = cfg.node.id
        self.metrics = NodeMetrics()
        self.accounting = AccountingLog(cfg.delivery.accounting_log, self.node_id)
        self.spool = Spool(
            cfg.spool.path, self.node_id,
            shards=cfg.spool.shards,
            segment_size=cfg.spool.segment_size,
            max_batch_bytes=cfg.spool.max_batch_bytes,
            exclusive=cfg.standalone,
            observe_batch=self.metrics.observe_batch,
            on_recovered=self._on_recovered,
            on_new_message=self._on_new_message,
            side_log=self.accounting,
        )
        self.coordinator: Coordinator = coordinator or LocalCoordinator(
            self.node_id, cfg.spool.shards)
        self.engine: DeliveryEngine | None = (
            DeliveryEngine(cfg, self.spool, self.coordinator, self.metrics, self.accounting)
            if cfg.delivery.enabled else None)
        self.ingress: IngressServer | None = None
        self._signer: Signer | None = None  # DKIM: the ingress's, closed at the stop
        self._retiring: set[asyncio.Task[None]] = set()  # signers replaced by a reload
        self.admin = None
        self.fenced = False
        # [spool] replicas > 1: this node's copies of other nodes' shards and the owner side
        # of its own (each node its own local spool directory).
        self.replication: ReplicationService | None = (
            ReplicationService(cfg, self.spool, self.coordinator,
                               events=self.metrics.replication())
            if cfg.spool.replicas > 1 else None)
        self.slo = SloTracker(os.path.join(cfg.spool.path, f"slo-{self.node_id}.json"),
                              self.metrics.registry, self.ready,
                              cfg.delivery.accounting_log, tick=cfg.slo.sample_interval)
        self.prober = Prober(self)
        # Every accounting record to the sending application's webhook, if one is set, and
        # each tenant's to its own events_url: one shipper (and cursor) per destination.
        self.events: list[EventShipper] = shippers(cfg, self.node_id, self.metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        # What start() opened, closed by stop(); None until a start has succeeded.
        self._exit: contextlib.AsyncExitStack | None = None
        # Here rather than in NodeMetrics: the loops are the node's. Every loop's series
        # exists from the start at 0, so an alert can use increase() on it.
        self._loop_errors = Counter(
            "mta_background_errors_total",
            "Passes of a background loop (sweep, compaction, slo, probe) that raised; "
            "the loop runs again after a pause.",
            ["loop"], registry=self.metrics.registry)
        for name in ("sweep", "compaction", "slo", "probe",
                     *(_events_loop(s) for s in self.events)):
            self._loop_errors.labels(name)
        # Read at scrape time, so they are never stale and need no loop of their own.
        self.metrics.registry.register(NodeGauges(self))
        if self.replication is not None:
            self.metrics.registry.register(ReplicationGauges(
                self.node_id, self.replication.owner, cfg.spool.replicas))

    # --- startup ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open everything in order; if any step fails, close what was opened (in reverse)
        and raise :class:`StartupError`, so the same spool can be started again at once."""
        async with contextlib.AsyncExitStack() as stack:
            await self._open(stack)
            # Started: stop() unwinds the same stack after draining the listeners.
            self._exit = stack.pop_all()

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        # Callbacks run last-pushed first. They are pushed so that the unwinding order is the
        # one a graceful stop always had: background tasks, SMTP listener, delivery then
        # shards, spool then accounting, admin API last (it answers /readyz while draining).
        cfg = self.cfg
        users = _load_users(cfg)
        tls = _load_tls(cfg)
        signer = _load_signer(cfg)
        stack.push_async_callback(self._close_admin)
        await self._start_signer(stack, signer)
        try:
            await self.spool.start()
        except OSError as exc:
            raise StartupError(f"{cfg.source}: [spool] path: cannot use {cfg.spool.path!r}: "
                               f"{exc.strerror}") from None
        stack.push_async_callback(self._close_storage)
        try:
            await self.accounting.start()
        except OSError as exc:
            raise StartupError(f"{cfg.source}: [delivery] accounting_log: cannot open "
                               f"{cfg.delivery.accounting_log!r}: {exc.strerror}") from None
        # Stopped after the shards are handed back (a DONE of a delivery that settles
        # during the stop still needs its copies).
        await self._start_replication(stack)
        # Before the engine starts: a coordinator that fails half-way may already have
        # handed shards to the host, and stop() hands back whatever it holds.
        stack.push_async_callback(self._stop_delivery)
        if self.engine is not None:
            await self.engine.start()
        if cfg.admin.enabled:
            # Before joining: peers learn its (bound) address from the membership record.
            from mta.admin.facade import NodeFacade
            from mta.admin.server import AdminServer

            # The API sees the node through this facade only; what start or a reload
            # replaces (config, SMTP listener, fencing) it reads live.
            self.admin = AdminServer(NodeFacade(
                node_id=self.node_id, spool=self.spool, engine=self.engine,
                coordinator=self.coordinator, metrics=self.metrics, slo=self.slo,
                prober=self.prober, config=lambda: self.cfg, readiness=self.readiness,
                ingress=lambda: self.ingress, fenced=lambda: self.fenced,
                replication=(self.replication.status if self.replication is not None
                             else None)))
            try:
                await self.admin.start()
            except OSError as exc:
                host, port = cfg.admin.listen
                raise StartupError(f"{cfg.source}: [admin] listen: cannot listen on "
                                   f"{host}:{port}: {exc.strerror}") from None
        try:
            await self.coordinator.start(self)
        except RuntimeError as exc:
            raise StartupError(f"{cfg.source}: [cluster] etcd: {exc}") from None
        ingress = self.ingress = IngressServer(cfg.smtp, self.spool, self.metrics, users, tls)
        ingress.signer = signer
        ingress.tenants = cfg.tenants
        try:
            await ingress.start()
        except OSError as exc:
            host, port = cfg.smtp.listen
            raise StartupError(f"{cfg.source}: [smtp] listen: cannot listen on {host}:{port}: "
                               f"{exc.strerror}") from None
        stack.push_async_callback(ingress.close)
        stack.push_async_callback(self._cancel_tasks)
        self.slo.load()
        self._start_loops()
        admin_url = self.endpoints()["admin"]
        if not cfg.standalone and ("//127." in admin_url or "//[::1]" in admin_url):
            log.warning("node.admin_loopback", node_id=self.node_id, admin=admin_url,
                        hint="peers on other machines cannot reach this admin API for "
                             "cluster-wide answers; set [admin] listen or advertise")
        notify(f"READY=1\nSTATUS=accepting mail on port {ingress.port}")
        log.info("node.started", node_id=self.node_id, shards=len(self.spool.owned),
                 live=self.spool.live_count(), smtp_port=ingress.port,
                 admin_port=self.admin.port if self.admin else None)

    async def _start_replication(self, stack: contextlib.AsyncExitStack) -> None:
        # Before joining: the node key publishes the listener and the copy ids, and the first
        # claim needs both.
        if self.replication is None:
            return
        cfg = self.cfg
        try:
            await self.replication.start()
        except OSError as exc:
            listen = cfg.cluster.replication_listen or ("", 0)
            raise StartupError(f"{cfg.source}: [cluster] replication_listen: cannot listen "
                               f"on {listen[0]}:{listen[1]}: {exc.strerror}") from None
        stack.push_async_callback(self.replication.stop)

    def _start_loops(self) -> None:
        cfg = self.cfg
        # Sweeps and compaction run as separate loops: one that keeps failing must not stop
        # the other.
        tick = min(cfg.spool.compact_interval, 5.0)
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "sweep": lambda: self._every(tick, self._sweep),
            "compaction": lambda: self._every(tick, self._compact),
            "slo": self.slo.run,
        }
        if cfg.probe.interval > 0:
            loops["probe"] = lambda: self.prober.run_forever(cfg.probe.interval)
        for shipper in self.events:
            loops[_events_loop(shipper)] = shipper.run
        for name, run in loops.items():
            self._tasks.append(asyncio.create_task(
                supervise(name, run, node_id=self.node_id, errors=self._loop_errors,
                          pause=min(1.0, tick)),
                name=name))
        if (interval := watchdog_interval()) is not None:
            # Not supervised: notify() cannot raise, and a dead loop must stop the pings.
            self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))

    async def _cancel_tasks(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()

    async def _stop_delivery(self) -> None:
        # Attempts in flight settle before the shards are handed back (the coordinator
        # releases them on the spool); a coordinator that never started has nothing to hand.
        if self.engine is not None:
            await self.engine.stop(self.cfg.smtp.shutdown_grace)
        await self.coordinator.stop()

    async def _close_storage(self) -> None:
        # The spool's writer thread writes accounting lines alongside its records until it
        # stops, so the accounting log closes after it.
        await self.spool.close()
        await self.accounting.close()
        # The slo loop was cancelled first; its final count comes now that every line
        # (those of attempts that settled during the stop too) is in the accounting log.
        await self.slo.stop()

    async def _start_signer(self, stack: contextlib.AsyncExitStack,
                            signer: Signer | None) -> None:
        # Whichever signer is current at the stop (a reload replaces it) is closed, after
        # the sessions have drained.
        stack.push_async_callback(self._close_signer)
        self._signer = signer
        if signer is not None:
            try:
                await signer.start()
            except SigningStartError as exc:
                raise StartupError(f"{self.cfg.source}: [dkim] processes: {exc}") from None

    async def _close_signer(self) -> None:
        await asyncio.gather(*self._retiring)
        if self._signer is not None:
            await self._signer.aclose()

    async def _close_admin(self) -> None:
        if self.admin is not None:
            await self.admin.close()
            self.admin = None

    def endpoints(self) -> dict[str, Any]:
        """How peers and operators reach this node (published in the cluster store); with a
        replicated spool also its replication listener, zone and copy ids."""
        host, port = self.cfg.smtp.listen
        if self.ingress is not None:
            port = self.ingress.port
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        admin = self.cfg.admin.advertise
        if not admin and self.admin is not None:
            ahost, _ = self.cfg.admin.listen
            if ahost in ("0.0.0.0", "::", ""):
                ahost = socket.getfqdn()
            ahost = f"[{ahost}]" if ":" in ahost else ahost
            admin = f"http://{ahost}:{self.admin.port}"
        out: dict[str, Any] = {"smtp": f"{host}:{port}", "admin": admin}
        if self.replication is not None:
            out.update(self.replication.endpoints())
        return out

    def readiness(self) -> dict[str, bool]:
        """The checks behind /readyz: each must hold for the node to take traffic."""
        return {
            "spool_writable": os.access(self.spool.root, os.W_OK),
            "spool_space": self._spool_space(),
            "lease_held": self.coordinator.healthy and not self.fenced,
            "shards_owned": len(self.spool.owned) > 0,
            "accepting": (self.ingress is not None and self.ingress.listening
                          and not self.ingress.draining),
        }

    def _spool_space(self) -> bool:
        # Full disk: appends fail with 452 anyway; tell the load balancer first.
        try:
            free = shutil.disk_usage(self.spool.root).free
        except OSError:
            return False
        return free >= min(self.cfg.smtp.max_message_size, 64 * 1024 * 1024)

    def ready(self) -> bool:
        """Every readiness check holds (what /readyz and ``mta_node_ready`` say)."""
        return all(self.readiness().values())

    def _on_new_message(self, message_id: str, env: Envelope, size: int) -> None:
        """Every new durable message (SMTP, HTTP, DSN): schedule it (its Reception line was
        written with it)."""
        if self.engine is not None:
            self.engine.enqueue(message_id)

    def _on_recovered(self, report: RecoveryReport) -> None:
        self.metrics.corrupt_records.inc(len(report.corrupt))
        self.metrics.torn_tails.inc(len(report.truncated))

    # --- ShardHost (driven by the coordinator) ---------------------------------------------

    async def acquire_shard(self, shard: int, token: int,
                            replication: Replication | None = None) -> None:
        """Take ``shard`` with fencing ``token``: recover it (and replicate it, when the
        coordinator says how), then deliver its mail."""
        if replication is not None and self.replication is not None:
            await self.replication.acquire(shard, token, replication)
        else:
            await self.spool.acquire_shard(shard, token)
        if self.engine is not None:
            self.engine.add_shard(shard)

    async def release_shard(self, shard: int) -> None:
        """Hand ``shard`` back: delivery stops on it first, then the spool lets it go."""
        if self.engine is not None:
            await self.engine.remove_shard(shard)
        log.debug("node.shard_engine_released", shard=shard)
        await self.spool.release_shard(shard)
        if self.replication is not None:
            self.replication.release(shard)

    def copy_ids(self) -> dict[int, str]:
        """The id of this node's copy of each shard (replicated spool only; else empty)."""
        return dict(self.replication.copy_ids) if self.replication is not None else {}

    async def recorded_token(self, shard: int) -> int:
        """The fencing token written in the shard's ``shard.owner`` (0 if none)."""
        return await self.spool.recorded_token(shard)

    def fence(self, reason: str) -> None:
        """Stop writing and delivering now: another node may own these shards any moment.
        The spool first (no outcome or message is written any more), then delivery: queued
        jobs are dropped unsent and attempts stop before their next SMTP command."""
        if self.fenced:
            return
        self.fenced = True
        self.spool.fence(True)
        if self.replication is not None:
            self.replication.fence(reason)
        if self.engine is not None:
            self.engine.fence(reason)
        if self.ingress is not None:
            self.ingress.accepting_writes = False
        notify("STATUS=fenced: " + reason)
        log.warning("node.fenced", node_id=self.node_id, reason=reason)

    def unfence(self) -> None:
        """The lease is provably held again: write, deliver and accept mail again."""
        if not self.fenced:
            return
        self.fenced = False
        self.spool.fence(False)
        if self.engine is not None:
            # Reschedules what fencing dropped, for the shards this node still holds.
            self.engine.unfence()
        if self.ingress is not None:
            self.ingress.accepting_writes = True
        notify("STATUS=accepting mail")
        log.info("node.unfenced", node_id=self.node_id)

    # --- main loop -------------------------------------------------------------------------

    @staticmethod
    async def _every(interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            await step()

    async def _sweep(self) -> None:
        if self.engine is not None and not self.fenced:
            self.engine.sweep()

    async def _compact(self) -> None:
        if not self.fenced:
            await self.spool.maintain(self.cfg.spool.compact_live_ratio)

    async def _watchdog(self, interval: float) -> None:
        # Pings only while the event loop runs: a wedged loop gets the node restarted.
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def reload(self) -> bool:
        """SIGHUP: re-read the config file and apply throttles and domain policies, users
        and TLS certificates without dropping a session; on any error keep everything."""
        if self.ingress is None:
            return False
        cfg = self.cfg
        try:
            if cfg.source and os.path.isfile(cfg.source):
                cfg = load_config(cfg.source)
            users = _load_users(cfg)
            tls = _load_tls(cfg)
            signer = _load_signer(cfg)
        except (ConfigError, StartupError) as exc:
            log.error("node.reload_failed", node_id=self.node_id, error=describe(exc))
            notify("STATUS=reload failed, kept the previous configuration")
            return False
        restart_needed = needs_restart(self.cfg, cfg)
        self.ingress.users = users
        self.ingress.tls = tls
        old_signer, self._signer = self._signer, signer
        self.ingress.signer = signer
        if old_signer is not None:
            # Its processes end once the signatures already asked of them are made; the
            # new signer starts its own on first use.
            keep(self._retiring, old_signer.aclose())
        self.ingress.tenants = cfg.tenants
        if self.engine is not None:
            self.engine.reload(cfg)
        self.cfg = cfg
        log.info("node.reloaded", node_id=self.node_id, users=len(users) if users else 0,
                 tls=tls is not None, domain_policies=len(cfg.delivery.domains),
                 dkim_domains=len(cfg.dkim.domains),
                 needs_restart=restart_needed)
        notify("STATUS=configuration reloaded")
        return True

    # --- shutdown --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Graceful: refuse new sessions, let DATA finish, hand shards back, flush the spool."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        notify("STOPPING=1")
        log.info("node.stopping", node_id=self.node_id)
        self.coordinator.stop_claiming()
        if self.ingress is not None:
            await self.ingress.drain(self.cfg.smtp.shutdown_grace)
        exit_stack, self._exit = self._exit, None
        if exit_stack is not None:  # None: never started, or a failed start closed it all
            await exit_stack.aclose()
        log.info("node.stopped", node_id=self.node_id)
