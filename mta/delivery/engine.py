"""The outbound engine: scheduled queue -> per-domain jobs -> site pools -> outcomes.

Message state kept in the spool's STATE records::

    {"att": attempts made, "next": epoch of the next attempt,
     "r": {"<recipient index>": [status, reply, bounce class, remote]},  # final ones only
     "last": last transient reply}

status is "d" (delivered) or "b" (bounced or expired). A recipient with no entry is pending.
Every new final outcome is made durable before the next attempt, so a restart (or a new
owner of the shard) never sends again to a recipient the remote side already accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

import structlog

from mta.accounting import AccountingLog
from mta.bounce.classify import classify
from mta.bounce.dsn import FailedRecipient, build_dsn
from mta.config import Config
from mta.coordinator import Coordinator, RuntimeSettings
from mta.delivery.breaker import Breaker
from mta.delivery.errors import DeliveryError, NotOwnerError, PermanentError, TemporaryError
from mta.delivery.loops import LoopGuard, received_count
from mta.delivery.routes import Route, Router, policy_for
from mta.delivery.site import Job, RecipientResult, Site, SiteLimits
from mta.delivery.throttle import Throttle
from mta.envelope import Envelope, domain_key, shard_of
from mta.metrics import NodeMetrics
from mta.queue import Scheduler
from mta.spool import FencedError, MessageNotFound, Spool, SpoolError, StoredMessage
from mta.spool.index import MessageRef

__all__ = ["DeliveryEngine"]

log = structlog.get_logger("mta.delivery")

# ("d" | "b" | "t" | "x" | "a" (admin) | "f" (not sent: this node may not send for the
# shard now), result)
_Outcome = tuple[str, RecipientResult]


@dataclass
class _BounceRequest:
    """An operator's ``message bounce``: applied by the message's next attempt."""

    domain: str | None  # only recipients at this domain; None = every pending recipient
    future: asyncio.Future[int]  # recipients bounced, once durable
    count: int = 0


ADMIN_BOUNCE = RecipientResult(550, "5.0.0 Message bounced by the administrator")
# Seconds between looks at a message whose shard is owned but not provably held right now.
_NOT_OWNER_RECHECK = 1.0
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


@dataclass
class _Unsaved:
    """What an attempt settled that the spool has not confirmed yet."""

    done: dict[str, list[Any]]
    dsn: list[tuple[int, RecipientResult]]
    expired: bool


def _domain(address: str) -> str:
    return domain_key(address.rpartition("@")[2])


def _headers_of(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[:end + 2]


class DeliveryEngine:
    """Delivers the live messages of the shards this node owns."""

    def __init__(self, cfg: Config, spool: Spool, coordinator: Coordinator,
                 metrics: NodeMetrics, accounting: AccountingLog) -> None:
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.node_id = cfg.node.id
        self.spool = spool
        self.coordinator = coordinator
        self.metrics = metrics
        self.accounting = accounting
        self.router = Router(cfg.delivery)
        self.loops = LoopGuard(cfg.smtp.listen, self.node_id, coordinator.members)
        self.scheduler = Scheduler(
            self._on_due, can_dispatch=lambda: len(self._inflight) < self.dcfg.max_inflight)
        # Per-site and per-domain tables: every one is bounded (LRU) or reaped (see reap),
        # since the domains a sender reaches over a day are unbounded.
        self.sites: dict[str, Site] = {}
        self._site_domain: dict[str, str] = {}  # site key -> the domain whose policy it follows
        self._domain_throttles: dict[str, _DomainThrottle] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._shards: set[int] = set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # domain -> key of the site it was last routed to; LRU, at most route_cache_size.
        self._site_of: OrderedDict[str, str] = OrderedDict()
        self._bounces: dict[str, _BounceRequest] = {}
        self._watchers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # First outcomes of messages from these senders (the probe's) are kept a while, so a
        # watcher that arrives after a fast delivery still gets it.
        self.watch_senders: set[str] = set()
        self._outcomes: dict[str, dict[str, Any]] = {}
        # Final outcomes (and DSNs still to queue) not yet durable, by message id.
        self._unsaved: dict[str, _Unsaved] = {}
        self._runtime = RuntimeSettings()
        self._closing = False
        # Fenced (lease lost or unknown): nothing is scheduled, queued or sent until unfence.
        self._fenced = False
        self.postmaster = cfg.delivery.bounce_sender or f"MAILER-DAEMON@{cfg.smtp.hostname}"
        self.helo = cfg.delivery.helo or cfg.smtp.hostname

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._runtime = self.coordinator.runtime()
        self.coordinator.watch_runtime(self._on_runtime)
        self.scheduler.start()
        self._reaper = asyncio.create_task(self._reap_loop(), name="delivery:reaper")

    async def stop(self, grace: float) -> None:
        """Stop scheduling; let in-flight attempts finish for up to ``grace`` seconds."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        await self.scheduler.stop()
        await self._settle(list(self._inflight.values()), grace)
        for site in self.sites.values():
            await site.close()

    async def _settle(self, tasks: list[asyncio.Task[None]], grace: float) -> None:
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def fence(self, reason: str) -> None:
        """Stop delivering at once: schedule nothing, fail every queued job unsent, and let
        attempts in flight stop before their next SMTP command (a transaction already in
        DATA runs to its reply, which is recorded if the spool still takes it). Another node
        may own these shards any moment now; their messages stay in the spool."""
        self._fenced = True
        self.scheduler.paused = True
        self.scheduler.wake()
        dropped = sum(site.drop(lambda _job: True) for site in self.sites.values())
        log.warning("delivery.fenced", node_id=self.node_id, reason=reason,
                    queued_dropped=dropped, attempts_in_flight=len(self._inflight))

    def unfence(self) -> None:
        """The lease is provably held again: schedule what fencing dropped (every live
        message of a shard still ours that is neither scheduled nor in flight)."""
        self._fenced = False
        self.scheduler.paused = False
        self.scheduler.wake()
        found = self._rescan()
        log.info("delivery.unfenced", node_id=self.node_id, rescheduled=found)

    @property
    def fenced(self) -> bool:
        return self._fenced

    def attempts_in_flight(self) -> int:
        """Attempts running now (loading, routing, queued at a site, or sending)."""
        return len(self._inflight)

    def _may_send(self, message_id: str) -> bool:
        """Does this node provably hold the message's shard right now? (Checked before an
        attempt starts, before its job is queued, and before MAIL, each RCPT and DATA.)"""
        if self._fenced:
            return False
        shard = shard_of(message_id)
        return shard in self._shards and self.coordinator.may_send(shard)

    # --- shards ----------------------------------------------------------------------------

    def add_shard(self, shard: int) -> int:
        """Schedule every live message of a newly owned shard; returns how many."""
        self._shards.add(shard)
        now = time.time()
        refs = self.spool.live_messages(shard)
        for ref in refs:
            self.scheduler.add(ref.id, self._due(ref, now))
        return len(refs)

    def _due(self, ref: MessageRef, now: float) -> float:
        """When a live message found in the spool should be tried: its recorded next
        attempt, now if that has passed, and never later than one maximal retry interval."""
        due = float((ref.state or {}).get("next", 0.0))
        return min(due, now + self.dcfg.retry_max) if due > now else 0.0

    async def remove_shard(self, shard: int, grace: float = 10.0) -> None:
        """Stop new work on a shard and wait (bounded) for its attempts in flight."""
        self._shards.discard(shard)
        for mid in self.scheduler.ids():
            if shard_of(mid) == shard:
                self.scheduler.remove(mid)
        # Its queued jobs go at once and its attempts stop before their next command (they
        # ask _may_send), so the wait below is for a transaction in DATA at most.
        for site in self.sites.values():
            site.drop(lambda job: shard_of(job.message_id) == shard)
        tasks = [t for mid, t in self._inflight.items() if shard_of(mid) == shard]
        await self._settle(tasks, grace)
        for mid in [m for m in self._unsaved if shard_of(m) == shard]:
            del self._unsaved[mid]  # the next owner starts from the spool's state
        self.accounting.discard(lambda mid: shard_of(mid) != shard)

    def sweep(self) -> int:
        """Schedule every live message of an owned shard that is neither waiting in the
        scheduler nor in flight; returns how many. A safety net (like a queue manager's
        periodic scan): whatever path missed a message, it cannot sit idle for ever."""
        if self._closing or self._fenced:
            return 0
        found = self._rescan()
        if found:
            log.warning("delivery.sweep_rescheduled", node_id=self.node_id, messages=found)
        return found

    def _rescan(self) -> int:
        found = 0
        now = time.time()
        for shard in list(self._shards):
            if not self.coordinator.may_send(shard):
                continue  # not provably ours now: whoever holds it next schedules it
            for ref in self.spool.live_messages(shard):
                mid = ref.id
                if mid in self.scheduler or mid in self._inflight:
                    continue
                self.scheduler.add(mid, self._due(ref, now))
                found += 1
        return found

    def enqueue(self, message_id: str) -> None:
        """A message just accepted: try it now."""
        if shard_of(message_id) in self._shards and not self._closing:
            self.scheduler.add(message_id, 0.0)

    def flush(self, domain: str | None = None) -> int:
        """Retry now every waiting message (for ``domain`` only, if given)."""
        if domain is None:
            return self.scheduler.reschedule_all(0.0)
        domain = domain_key(domain)
        ids = {ref.id for ref in self.live_refs() if domain in ref.pending_domains()}
        return self.scheduler.reschedule_all(0.0, ids.__contains__)

    def live_refs(self) -> list[MessageRef]:
        """Index entries of every live message in the shards this engine delivers."""
        return [ref for shard in sorted(self._shards) for ref in self.spool.live_messages(shard)]

    def next_attempt(self, message_id: str) -> float | None:
        """When the message will be tried next (epoch); None while in flight."""
        return None if message_id in self._inflight else self.scheduler.due_of(message_id)

    def site_of(self, domain: str) -> str | None:
        """Key of the site ``domain`` was last routed to, if it has been tried."""
        return self._site_of.get(domain)

    def domain_rate(self, domain: str) -> float | None:
        """The configured or runtime rate of ``domain`` (msgs/s, cluster-wide), or None."""
        rate = self._runtime.throttles.get(domain)
        if rate is None:
            policy = policy_for(domain, self.dcfg.domains)
            rate = policy.rate if policy else None
        return rate

    def in_flight(self, message_id: str) -> bool:
        return message_id in self._inflight

    # --- operator actions ------------------------------------------------------------------

    async def bounce(self, message_id: str, domain: str | None = None,
                     timeout: float = 30.0) -> int:
        """Bounce (with a DSN) the pending recipients of a live message, at ``domain`` only if
        given; returns how many, once durable. Raises MessageNotFound, TimeoutError."""
        ref = self.spool.live_ref(message_id) if shard_of(message_id) in self._shards else None
        if ref is None:
            raise MessageNotFound(message_id)
        req = self._bounces.get(message_id)
        if req is None or req.domain != domain:
            if req is not None:
                await asyncio.wait_for(asyncio.shield(req.future), timeout)
            req = self._bounces[message_id] = _BounceRequest(
                domain, asyncio.get_running_loop().create_future())
        if message_id not in self._inflight:
            self.scheduler.remove(message_id)
            self.scheduler.add(message_id, 0.0)
        # else: the attempt in flight re-queues it at once when it ends (see _attempt).
        return await asyncio.wait_for(asyncio.shield(req.future), timeout)

    async def bounce_domain(self, domain: str, timeout: float = 60.0) -> tuple[int, int]:
        """Bounce every pending recipient at ``domain``; returns (messages, recipients)."""
        domain = domain_key(domain)
        ids = [ref.id for ref in self.live_refs() if domain in ref.pending_domains()]
        results = await asyncio.gather(*(self.bounce(mid, domain, timeout) for mid in ids),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, TimeoutError):
                raise result
        counts = [r for r in results if isinstance(r, int)]
        return sum(1 for c in counts if c), sum(counts)

    def watch(self, message_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future that gets the first recipient outcome (any kind) of ``message_id``."""
        fut = self._watchers.get(message_id)
        if fut is None:
            fut = self._watchers[message_id] = asyncio.get_running_loop().create_future()
            if (seen := self._outcomes.get(message_id)) is not None:
                fut.set_result(seen)
        return fut

    def unwatch(self, message_id: str) -> None:
        self._watchers.pop(message_id, None)
        self._outcomes.pop(message_id, None)

    def _note_outcome(self, message_id: str, outcome: dict[str, Any]) -> None:
        if message_id in self._outcomes:
            return
        self._outcomes[message_id] = outcome
        while len(self._outcomes) > 256:
            del self._outcomes[next(iter(self._outcomes))]
        fut = self._watchers.get(message_id)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    def _on_runtime(self, settings: RuntimeSettings) -> None:
        resumed = self._runtime.suspended - settings.suspended
        self._runtime = settings
        for key, site in self.sites.items():
            site.rate_override = settings.throttles.get(key)
        self._domain_throttles.clear()
        for domain in resumed:
            self.flush(domain)

    # --- attempts --------------------------------------------------------------------------

    def _on_due(self, message_id: str) -> None:
        if self._closing or shard_of(message_id) not in self._shards:
            return
        if not self._may_send(message_id):
            log.debug("delivery.not_owner_hold", message_id=message_id, node_id=self.node_id)
            self._park(message_id)
            return
        if message_id in self._inflight:
            # Re-added while its attempt is still finishing: look again shortly, never drop.
            self.scheduler.add(message_id, time.time() + 0.5)
            return
        task = asyncio.create_task(self._attempt(message_id), name=f"attempt:{message_id}")
        self._inflight[message_id] = task
        task.add_done_callback(lambda _t: self._attempt_done(message_id))

    def _attempt_done(self, message_id: str) -> None:
        self._inflight.pop(message_id, None)
        if len(self._inflight) == self.dcfg.max_inflight - 1:
            self.scheduler.wake()  # room again for due messages held back

    async def _attempt(self, message_id: str) -> None:
        req = self._bounces.get(message_id)
        try:
            await self._attempt_inner(message_id)
        except BaseException as exc:
            if req is not None and self._bounces.get(message_id) is req:
                del self._bounces[message_id]
                if not req.future.done():
                    req.future.set_exception(
                        exc if isinstance(exc, Exception) else SpoolError("attempt cancelled"))
            raise
        if req is not None and self._bounces.get(message_id) is req:
            del self._bounces[message_id]
            if not req.future.done():
                req.future.set_result(req.count)
        if message_id in self._bounces and not self._closing:
            # Asked for while this attempt was already running: apply it now.
            self.scheduler.add(message_id, 0.0)

    async def _attempt_inner(self, message_id: str) -> None:
        try:
            stored = await self.spool.load(message_id)
        except MessageNotFound:
            self._unsaved.pop(message_id, None)
            self.accounting.discard(lambda mid: mid != message_id)
            return
        except Exception as exc:  # I/O error, a record failing verification...
            log.error("delivery.load_failed", message_id=message_id, node_id=self.node_id,
                      error=str(exc))
            self._retry_later(message_id)
            return
        try:
            await self._run_attempt(stored)
        except asyncio.CancelledError:
            raise
        except SpoolError as exc:
            # An outcome could not be made durable; what is final stays in _unsaved and is
            # merged into the next attempt, so nobody is sent the message again meanwhile.
            # Fenced, it is expected (the reply of a transaction already in DATA): a warning,
            # and the at-least-once window if another node takes the shard.
            report = log.warning if isinstance(exc, FencedError) else log.error
            report("delivery.state_write_failed", message_id=message_id,
                   node_id=self.node_id, error=str(exc), fenced=isinstance(exc, FencedError))
            self._retry_later(message_id)
        except Exception:
            # A bug must not make a message silently stop being delivered.
            log.exception("delivery.attempt_crashed", message_id=message_id,
                          node_id=self.node_id)
            self._retry_later(message_id)

    def _retry_later(self, message_id: str, delay: float = 60.0) -> None:
        if self._closing:
            return
        if self._may_send(message_id):
            self.scheduler.add(message_id, time.time() + delay)
        else:  # fenced, most likely (a state write refused for that reason)
            self._park(message_id)

    def _park(self, message_id: str) -> None:
        """A message this node may not send for now. Fenced, released or closing: dropped,
        not retried (it stays in the spool; unfence or the shard's next owner schedules it).
        Otherwise the shard is between states (being acquired, or its lease deadline just
        passed and the fence is coming): look again shortly, without an attempt."""
        if self._closing or self._fenced or shard_of(message_id) not in self._shards:
            return
        self.scheduler.add(message_id, time.time() + _NOT_OWNER_RECHECK)

    def _remember(self, mid: str, done: dict[str, list[Any]],
                  dsn: list[tuple[int, RecipientResult]], expired: bool) -> None:
        self._unsaved[mid] = _Unsaved(dict(done), list(dsn), expired)

    async def _run_attempt(self, stored: StoredMessage) -> None:
        mid, env = stored.id, stored.envelope
        state: dict[str, Any] = dict(stored.state or {})
        done: dict[str, list[Any]] = dict(state.get("r", {}))
        dsn_todo: list[tuple[int, RecipientResult]] = []
        expired_before = False
        if (unsaved := self._unsaved.get(mid)) is not None:
            done.update(unsaved.done)
            dsn_todo, expired_before = list(unsaved.dsn), unsaved.expired
        attempt = int(state.get("att", 0)) + 1
        pending = [i for i in range(len(env.recipients)) if str(i) not in done]
        groups: dict[str, list[int]] = defaultdict(list)
        for i in pending:
            groups[_domain(env.recipients[i])].append(i)
        outcomes: dict[int, _Outcome] = {}
        req = self._bounces.get(mid)
        if req is not None:
            # An operator bounce only settles what it names; the other recipients keep
            # their schedule (it is not a retry).
            for domain in [d for d in groups if req.domain in (None, d)]:
                for i in groups.pop(domain):
                    outcomes[i] = ("a", ADMIN_BOUNCE)
                    done[str(i)] = self._final_record(mid, env, i, outcomes[i], attempt)
                    req.count += 1
            groups.clear()
        # Our own trace header is not a hop the message arrived with (ingress admits exactly
        # max_hops); a limit lowered since acceptance bounces what now exceeds it.
        if groups and (hops := received_count(stored.body) - 1) > self.cfg.smtp.max_hops:
            too_many = RecipientResult(
                554, f"5.4.6 Too many hops ({hops} Received: headers, at most "
                     f"{self.cfg.smtp.max_hops})")
            for i in [i for idx in groups.values() for i in idx]:
                outcomes[i] = ("b", too_many)
                done[str(i)] = self._final_record(mid, env, i, outcomes[i], attempt)
            groups.clear()
        held = {d for d in groups if d in self._runtime.suspended}
        active = {d: idx for d, idx in groups.items() if d not in held}

        if len(active) == 1:
            # The common case (one destination domain): no task or wait() needed.
            [(domain, idx)] = active.items()
            for i, outcome in (await self._deliver_group(stored, domain, idx)).items():
                outcomes[i] = outcome
                if outcome[0] not in ("t", "f"):  # "f": not tried
                    done[str(i)] = self._final_record(mid, env, i, outcome, attempt)
            active = {}
        tasks = [asyncio.create_task(self._deliver_group(stored, domain, idx))
                 for domain, idx in active.items()]
        remaining = set(tasks)
        try:
            while remaining:
                finished, remaining = await asyncio.wait(remaining,
                                                         return_when=asyncio.FIRST_COMPLETED)
                newly_final = False
                for task in finished:
                    for i, outcome in task.result().items():
                        outcomes[i] = outcome
                        if outcome[0] not in ("t", "f"):  # "f": not tried
                            newly_final = True
                            done[str(i)] = self._final_record(mid, env, i, outcome, attempt)
                if newly_final and remaining:
                    # Other domains are still in flight: make these outcomes durable now, so
                    # a crash cannot send them again.
                    bounced = [(i, o[1]) for i, o in outcomes.items() if o[0] == "b"]
                    self._remember(mid, done, dsn_todo + bounced, expired_before)
                    await self.spool.update_state(mid, {**state, "r": dict(done)})
        finally:
            for task in tasks:
                task.cancel()  # only matters if we were cancelled mid-way

        if any(o[0] == "f" for o in outcomes.values()):
            await self._end_not_owner(stored, state, done, dsn_todo + [
                (i, o[1]) for i, o in outcomes.items() if o[0] in ("b", "a")], expired_before)
            return
        now = time.time()
        temp = [i for i, o in outcomes.items() if o[0] == "t"]
        expired = bool(temp) and now - env.received_at >= self.dcfg.max_age
        for i in temp:
            result = outcomes[i][1]
            if expired:
                expired_result = RecipientResult(
                    result.code if 400 <= result.code < 500 else 451,
                    f"4.4.7 Message expired after {attempt} attempts; last error: "
                    f"{result.reply}", result.remote)
                outcomes[i] = ("x", expired_result)
                done[str(i)] = self._final_record(mid, env, i, outcomes[i], attempt)
            else:
                self._record(mid, env, i, "TransientFailure", result, attempt)
                self.metrics.deferred.inc()
        dsn = dsn_todo + [(i, o[1]) for i, o in outcomes.items() if o[0] in ("b", "x", "a")]
        expired = expired or expired_before
        # From here on, what is final lives in _unsaved until it is on disk.
        self._remember(mid, done, dsn, expired)
        if dsn and env.sender:
            await self._send_dsn(stored, dsn, expired)
        self._unsaved[mid].dsn = []
        still = [i for i in range(len(env.recipients)) if str(i) not in done]
        if not still:
            await self.spool.mark_done(mid)
            self._unsaved.pop(mid, None)
            return
        if req is not None:
            attempt -= 1
            due = float(state.get("next", 0.0)) or now
            last = state.get("last", "")
        elif temp:
            delay = min(self.dcfg.retry_max, self.dcfg.retry_initial * 2 ** (attempt - 1))
            due = now + delay * random.uniform(0.9, 1.1)
            last = outcomes[temp[0]][1].reply
        else:
            # Only suspended domains are left: look again soon, without counting an attempt.
            attempt -= 1
            due = now + min(60.0, self.dcfg.retry_initial)
            last = state.get("last", "")
        await self.spool.update_state(mid, {"att": attempt, "next": due, "r": dict(done),
                                            "last": last})
        self._unsaved.pop(mid, None)
        if not self._closing and shard_of(mid) in self._shards:
            self.scheduler.add(mid, due)

    async def _end_not_owner(self, stored: StoredMessage, state: dict[str, Any],
                             done: dict[str, list[Any]], dsn: list[tuple[int, RecipientResult]],
                             expired: bool) -> None:
        """End an attempt some of whose recipients were not tried because this node may not
        send for the shard now. Those stay pending: no attempt counted, no TransientFailure
        (not the remote's fault). What did become final is recorded if the spool still takes
        it, else kept in _unsaved, so this node never sends it again. Then parked (see
        _park) unless the shard is provably ours again already."""
        mid, env = stored.id, stored.envelope
        log.debug("delivery.not_owner_stopped", message_id=mid, node_id=self.node_id,
                  pending=sum(1 for i in range(len(env.recipients)) if str(i) not in done))
        self._remember(mid, done, dsn, expired)
        if dsn or done != state.get("r", {}):
            if dsn and env.sender:
                await self._send_dsn(stored, dsn, expired)
            self._unsaved[mid].dsn = []
            await self.spool.update_state(mid, {**state, "r": dict(done)})
        self._unsaved.pop(mid, None)
        if self._closing:
            return
        if self._may_send(mid):  # a short fence that ended meanwhile
            self.scheduler.add(mid, float(state.get("next", 0.0)))
        else:
            self._park(mid)

    def _final_record(self, mid: str, env: Envelope, i: int, outcome: _Outcome,
                      attempt: int) -> list[Any]:
        status, result = outcome
        if status == "d":
            self._record(mid, env, i, "Delivery", result, attempt)
            self.metrics.delivered.inc()
            self.metrics.delivery_latency.observe(max(0.0, time.time() - env.received_at))
            return ["d", result.reply, "", result.remote]
        if status == "a":
            self._record(mid, env, i, "AdminBounce", result, attempt)
            self.metrics.admin_bounced.inc()
            return ["b", result.reply, "admin", ""]
        cls = classify(result.code, result.text)
        kind = "Expiration" if status == "x" else "Bounce"
        self._record(mid, env, i, kind, result, attempt, bounce_class=cls)
        if status == "x":
            self.metrics.expired.inc()
        else:
            self.metrics.bounced.labels(cls).inc()
        return ["b", result.reply, cls, result.remote]

    def _record(self, mid: str, env: Envelope, i: int, kind: str, result: RecipientResult,
                attempt: int, **extra: Any) -> None:
        rcpt = env.recipients[i]
        if mid in self._watchers or env.sender in self.watch_senders:
            self._note_outcome(mid, {"kind": kind, "recipient": rcpt, "reply": result.reply,
                                     "remote": result.remote, "at": time.time()})
        self.accounting.record(kind, mid, recipient=rcpt, sender=env.sender,
                               site=result.remote, response=result.reply, attempt=attempt,
                               **extra)
        log.info(f"delivery.{kind.lower()}", message_id=mid, node_id=self.node_id,
                 recipient=rcpt, response=result.reply, remote=result.remote, attempt=attempt,
                 **extra)

    async def _deliver_group(self, stored: StoredMessage, domain: str, idx: list[int]
                             ) -> dict[int, _Outcome]:
        try:
            return await self._deliver_group_inner(stored, domain, idx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("delivery.group_crashed", message_id=stored.id, domain=domain,
                          node_id=self.node_id)
            result = RecipientResult(451, f"4.3.0 Internal error ({type(exc).__name__}), "
                                          "will retry")
            return {i: ("t", result) for i in idx}

    async def _deliver_group_inner(self, stored: StoredMessage, domain: str, idx: list[int]
                                   ) -> dict[int, _Outcome]:
        env = stored.envelope

        def every(status: str, result: RecipientResult) -> dict[int, _Outcome]:
            return {i: (status, result) for i in idx}

        try:
            route = await self.router.route(domain)
        except DeliveryError as exc:
            return every("b" if exc.permanent else "t", RecipientResult(exc.code, exc.text))
        outside = await self.loops.outside(route)
        if outside is None:
            # Handing it to ourselves would accept it again as a new message, for ever.
            log.warning("delivery.loops_back", message_id=stored.id, node_id=self.node_id,
                        domain=domain, site=route.site)
            return every("b", RecipientResult(554, f"5.4.6 mail for {domain} loops back to "
                                                   "myself"))
        route = outside
        site = self._site_for(route, domain)
        self._note_site_of(domain, route.site)
        # Held from here (no await before) until its job is done: the reaper must not forget
        # a site an attempt is about to queue on.
        with site.held():
            # Wait for the domain's own throttle here, not on a pooled connection: a slow
            # domain behind a shared site (a smarthost, a big provider's MX set) must not
            # hold a connection that other domains' mail could use.
            await self._domain_throttle_wait(domain)
            policy = policy_for(domain, self.dcfg.domains)
            tls = policy.tls if policy and policy.tls else self.dcfg.tls
            job = Job(stored.id, domain, env.sender, [env.recipients[i] for i in idx],
                      stored.body, env.smtputf8, env.body_8bit, tls_required=tls == "required")
            return await self._deliver_job(site, job, idx)

    async def _deliver_job(self, site: Site, job: Job, idx: list[int]
                           ) -> dict[int, _Outcome]:
        def every(status: str, result: RecipientResult) -> dict[int, _Outcome]:
            return {i: (status, result) for i in idx}

        try:
            results = await site.deliver(job)
        except NotOwnerError as exc:
            return every("f", RecipientResult(exc.code, exc.text))
        except PermanentError as exc:
            return every("b", RecipientResult(exc.code, exc.text, exc.remote))
        except TemporaryError as exc:
            return every("t", RecipientResult(exc.code, exc.text, exc.remote))
        out: dict[int, _Outcome] = {}
        for i, result in zip(idx, results, strict=True):
            status = "d" if 200 <= result.code < 300 else "b" if result.code >= 500 else "t"
            out[i] = (status, result)
        return out

    # --- sites and throttles ---------------------------------------------------------------

    def reload(self, cfg: Config) -> None:
        """Apply a re-read config's delivery policies (SIGHUP): rates, connection limits,
        TLS modes and smarthosts; sites keep their open connections."""
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.router = Router(cfg.delivery)
        self._domain_throttles.clear()
        for key, site in self.sites.items():
            site.limits = self._limits(self._site_domain.get(key, ""))

    def _limits(self, domain: str) -> SiteLimits:
        policy = policy_for(domain, self.dcfg.domains) if domain else None
        d = self.dcfg
        return SiteLimits(
            max_connections=(policy.max_connections if policy and policy.max_connections
                             else d.max_connections),
            max_messages_per_connection=(
                policy.max_messages_per_connection
                if policy and policy.max_messages_per_connection
                else d.max_messages_per_connection),
            rate=d.rate,
            # Connections STARTTLS whenever offered; "required" is enforced per message (Job).
            tls=("disabled" if (policy.tls if policy and policy.tls else d.tls) == "disabled"
                 else "opportunistic"),
            connect_timeout=d.connect_timeout,
            command_timeout=d.command_timeout,
            data_timeout=d.data_timeout,
            idle_timeout=d.idle_timeout,
            helo=self.helo,
            reuse_timeout=d.reuse_timeout,
            stall_timeout=d.stall_timeout,
            keepalive=d.keepalive,
        )

    def _site_for(self, route: Route, domain: str) -> Site:
        site = self.sites.get(route.site)
        if site is not None:
            site.route = route
            return site
        d = self.dcfg
        site = Site(route.site, route, self._limits(domain),
                    Breaker(d.breaker_failures, d.breaker_cooldown),
                    self.coordinator.rate_share, self.node_id,
                    permit=self._may_send, metrics=self.metrics)
        site.rate_override = self._runtime.throttles.get(route.site)
        self.sites[route.site] = site
        self._site_domain[route.site] = domain
        return site

    def _note_site_of(self, domain: str, key: str) -> None:
        self._site_of[domain] = key
        self._site_of.move_to_end(domain)
        while len(self._site_of) > self.dcfg.route_cache_size:
            self._site_of.popitem(last=False)

    async def _domain_throttle_wait(self, domain: str) -> None:
        rate = self.domain_rate(domain)
        if rate is None:
            return
        rate *= self.coordinator.rate_share()
        entry = self._domain_throttles.get(domain)
        if entry is None:
            entry = self._domain_throttles[domain] = _DomainThrottle(Throttle(rate))
        entry.throttle.rate = rate
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
            except Exception:
                # One bad pass must not end reaping for the life of the node.
                log.exception("delivery.reap_failed", node_id=self.node_id)

    def reap(self) -> int:
        """Forget what nothing uses any more: sites idle for ``site_idle`` (longer for one
        whose breaker or back-off is still in force), the domains routed to them, domain
        throttles whose last slot has passed, and expired routes. Returns sites dropped."""
        now = time.monotonic()
        d = self.dcfg
        unsettled = max(d.site_idle, _BREAKER_MAX_COOLDOWNS * d.breaker_cooldown)
        gone: set[str] = set()
        for key, site in self.sites.items():
            idle = site.idle_for(now)
            if idle <= 0.0:
                continue
            limit = d.site_idle if site.settled() else unsettled
            if site.throttle.rate:
                # Its throttle's last slot must have passed too, or a new site for the same
                # hosts would send sooner than the rate allows.
                limit = max(limit, 1.0 / site.throttle.rate)
            if idle >= limit:
                gone.add(key)
        m = self.metrics
        for key in gone:
            # Idle: no job, worker or connection to close; nobody holds a reference to it.
            del self.sites[key]
            self._site_domain.pop(key, None)
            # Its labelled series would otherwise stay in the registry for ever.
            for gauge in (m.site_queue, m.site_connections, m.site_breaker_open):
                with contextlib.suppress(KeyError):
                    gauge.remove(key)
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

    # --- bounces ---------------------------------------------------------------------------

    async def _send_dsn(self, stored: StoredMessage, failed: list[tuple[int, RecipientResult]],
                        expired: bool) -> None:
        env = stored.envelope
        dsn = build_dsn(
            reporting_mta=self.cfg.smtp.hostname, postmaster=self.postmaster,
            original_sender=env.sender, original_headers=_headers_of(stored.body),
            arrival=env.received_at, expired=expired, message_id=stored.id,
            recipients=[FailedRecipient(env.recipients[i], r.reply, r.remote)
                        for i, r in failed],
        )
        # The DSN has the null sender, so its own failure can never cause another DSN.
        bounce_env = Envelope(sender="", recipients=[env.sender],
                              smtputf8=not env.sender.isascii(), helo=self.cfg.smtp.hostname)
        # The spool reports it (Reception record, scheduling) like any new message.
        dsn_id = await self.spool.submit(bounce_env, dsn)
        log.info("delivery.dsn_queued", message_id=stored.id, dsn_id=dsn_id,
                 node_id=self.node_id, recipients=len(failed), expired=expired)

