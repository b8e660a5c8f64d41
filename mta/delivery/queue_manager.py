"""The queue manager: which live messages are tried when, what an attempt's outcomes mean for
the message (retry, expiry, bounce and DSN), and making them durable (like python-slimta's
Queue, with the dispatcher as its relay).

Message state lives in the spool's STATE records (see :mod:`mta.queue.state`). Every new
final outcome is made durable before the next attempt, so a restart (or a new owner of the
shard) never sends again to a recipient the remote side already accepted. An outcome's
accounting line is written by the same spool write, so the log says exactly what the spool
says.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog

from mta.bounce.dsn import FailedRecipient, build_dsn
from mta.config import Config
from mta.coordinator import Coordinator
from mta.delivery.dispatch import Dispatcher
from mta.delivery.loops import received_count
from mta.delivery.outcomes import BOUNCES, FINAL, Outcome, OutcomeRecorder, Verdict
from mta.delivery.site import RecipientResult
from mta.delivery.throttle import Throttle
from mta.envelope import Envelope, domain_key, shard_of
from mta.logs import describe
from mta.queue import Scheduler
from mta.queue.state import DeliveryState, FinalResult, Transient, is_held
from mta.spool import FencedError, MessageNotFound, Spool, SpoolError, StoredMessage
from mta.spool.index import MessageRef
from mta.tasks import finish_or_cancel

__all__ = ["QueueManager"]

log = structlog.get_logger("mta.delivery")

ADMIN_BOUNCE = RecipientResult(550, "5.0.0 Message bounced by the administrator")
# Seconds between looks at a message whose shard is owned but not provably held right now.
_NOT_OWNER_RECHECK = 1.0


@dataclass
class _BounceRequest:
    """An operator's ``message bounce``: applied by the message's next attempt."""

    domain: str | None  # only recipients at this domain; None = every pending recipient
    future: asyncio.Future[int]  # recipients bounced, once durable
    count: int = 0


@dataclass
class _Unsaved:
    """What attempts settled that the spool has not confirmed yet: final results (merged
    with the stored ones), the accounting lines that go with them, and the bounces whose
    DSN is still to be queued. Kept across a failed write, so the next attempt neither sends
    to a settled recipient again nor loses a line or a DSN."""

    results: dict[int, FinalResult] = field(default_factory=dict)
    lines: list[bytes] = field(default_factory=list)
    dsn: list[tuple[int, RecipientResult]] = field(default_factory=list)
    expired: bool = False


@dataclass
class _Attempt:
    """One attempt at one message."""

    stored: StoredMessage
    state: DeliveryState  # as stored when the attempt began
    unsaved: _Unsaved
    number: int
    groups: dict[str, list[int]]  # pending recipients by domain, still to decide
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    transients: dict[int, Transient] = field(default_factory=dict)  # deferred by this one

    @property
    def id(self) -> str:
        return self.stored.id

    @property
    def envelope(self) -> Envelope:
        return self.stored.envelope

    def progress(self) -> DeliveryState:
        """The stored state with this attempt's (and earlier unsaved) results, and each
        still pending recipient's transient failures."""
        results = dict(self.unsaved.results)
        transients = {i: t for i, t in {**self.state.transients, **self.transients}.items()
                      if i not in results}
        return replace(self.state, results=results, transients=transients)

    def pending(self) -> bool:
        """Is any recipient still without a final result?"""
        results = self.unsaved.results
        return any(i not in results for i in range(len(self.envelope.recipients)))


def _domain(address: str) -> str:
    return domain_key(address.rpartition("@")[2])


def _headers_of(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[:end + 2]


class QueueManager:
    """Schedules the live messages of the shards this node owns and runs their attempts."""

    def __init__(self, cfg: Config, spool: Spool, coordinator: Coordinator,
                 dispatcher: Dispatcher, recorder: OutcomeRecorder) -> None:
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.node_id = cfg.node.id
        self.spool = spool
        self.coordinator = coordinator
        self.dispatcher = dispatcher
        self.recorder = recorder
        self.scheduler = Scheduler(
            self._on_due, can_dispatch=lambda: len(self._inflight) < self.dcfg.max_inflight,
            tenant_of=self._tenant_of, weight_of=self._tenant_weight, gate=self._tenant_gate)
        # tenant -> its throttle ([tenants."name"] rate x this node's share), made on use.
        self._tenant_throttles: dict[str, Throttle] = {}
        self._shards: set[int] = set()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._bounces: dict[str, _BounceRequest] = {}
        # Messages an operator's hold, release or delete is acting on: no attempt starts.
        self._busy: set[str] = set()
        # Settled but not yet durable, by message id (see _Unsaved).
        self._unsaved: dict[str, _Unsaved] = {}
        self._closing = False
        # Fenced (lease lost or unknown): nothing is scheduled, queued or sent until unfence.
        self.fenced = False
        self.postmaster = cfg.delivery.bounce_sender or f"MAILER-DAEMON@{cfg.smtp.hostname}"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start handing due messages to attempts."""
        self.scheduler.start()

    async def stop(self, grace: float) -> None:
        """Stop scheduling; let in-flight attempts finish for up to ``grace`` seconds."""
        self._closing = True
        await self.scheduler.stop()
        await finish_or_cancel(list(self._inflight.values()), grace)

    def reload(self, cfg: Config) -> None:
        """Retry, expiry and hop limits, tenants' weights and rates from a re-read config."""
        self.cfg = cfg
        self.dcfg = cfg.delivery
        self.scheduler.wake()

    # --- tenants: turns and throttles in the scheduler ------------------------------------

    def _tenant_of(self, message_id: str) -> str:
        ref = self.spool.live_ref(message_id)
        return ref.tenant if ref is not None else ""

    def _tenant_weight(self, tenant: str) -> int:
        policy = self.cfg.tenants.names.get(tenant)
        return policy.weight if policy is not None else 1

    def _tenant_gate(self, tenant: str) -> float:
        """0 (and the slot taken) if ``tenant``'s next message may start now; else how long
        until it may. A tenant's rate is cluster-wide: this node sends its share of it."""
        rate = self.dispatcher.tenant_rate(tenant) if tenant else None
        if rate is None:
            # Only tenants with a rate keep a throttle (configured or runtime: bounded).
            self._tenant_throttles.pop(tenant, None)
            return 0.0
        rate *= self.coordinator.rate_share()
        throttle = self._tenant_throttles.get(tenant)
        if throttle is None or throttle.rate != rate:
            # A new rate applies at once (a raised one does not leave the tenant's mail
            # waiting for slots the old one booked); its slots start now.
            throttle = self._tenant_throttles[tenant] = Throttle(rate)
        return throttle.take()

    def fence(self) -> None:
        """Schedule nothing until unfence (attempts in flight stop at their next command)."""
        self.fenced = True
        self.scheduler.paused = True
        self.scheduler.wake()

    def unfence(self) -> int:
        """Schedule what fencing dropped; returns how many messages."""
        self.fenced = False
        self.scheduler.paused = False
        self.scheduler.wake()
        return self._rescan()

    def attempts_in_flight(self) -> int:
        """Attempts running now (loading, routing, queued at a site, or sending)."""
        return len(self._inflight)

    def may_send(self, message_id: str) -> bool:
        """Does this node provably hold the message's shard right now? (Checked before an
        attempt starts, before its job is queued, and before MAIL, each RCPT and DATA.)"""
        if self.fenced:
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
            if not is_held(ref.state):  # held: not scheduled until released
                self.scheduler.add(ref.id, self._due(ref, now))
        return len(refs)

    def _due(self, ref: MessageRef, now: float) -> float:
        """When a live message found in the spool should be tried: its recorded next
        attempt, now if that has passed, and never later than one maximal retry interval."""
        due = DeliveryState.from_wire(ref.state).next_attempt
        return min(due, now + self.dcfg.retry_max) if due > now else 0.0

    async def remove_shard(self, shard: int, grace: float) -> None:
        """Stop new work on a shard and wait (bounded) for its attempts in flight."""
        self._shards.discard(shard)
        for mid in self.scheduler.ids():
            if shard_of(mid) == shard:
                self.scheduler.remove(mid)
        # Its queued jobs go at once and its attempts stop before their next command (they
        # ask may_send), so the wait below is for a transaction in DATA at most.
        self.dispatcher.drop(lambda job: shard_of(job.message_id) == shard)
        tasks = [t for mid, t in self._inflight.items() if shard_of(mid) == shard]
        await finish_or_cancel(tasks, grace)
        for mid in [m for m in self._unsaved if shard_of(m) == shard]:
            # The next owner starts from the spool's state (and writes its own lines).
            del self._unsaved[mid]

    def sweep(self) -> int:
        """Schedule every live message of an owned shard that is neither waiting in the
        scheduler nor in flight; returns how many. A safety net (like a queue manager's
        periodic scan): whatever path missed a message, it cannot sit idle for ever."""
        if self._closing or self.fenced:
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
                if mid in self.scheduler or mid in self._inflight or is_held(ref.state):
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
        return self.flush_matching(lambda d: d == domain)

    def flush_matching(self, match: Callable[[str], bool]) -> int:
        """Retry now every waiting message with a pending recipient at a domain ``match``
        selects (the domains a resume released)."""
        return self._flush_refs(lambda ref: any(map(match, ref.pending_domains())))

    def flush_labels(self, keys: set[str]) -> int:
        """Retry now every waiting message sent for a ``tenant:`` or of a ``campaign:`` key
        in ``keys``."""
        return self._flush_refs(lambda ref: ref.labels is not None and (
            f"tenant:{ref.tenant}" in keys or f"campaign:{ref.campaign}" in keys))

    def _flush_refs(self, match: Callable[[MessageRef], bool]) -> int:
        ids = {ref.id for ref in self.live_refs() if match(ref)}
        return self.scheduler.reschedule_all(0.0, ids.__contains__) if ids else 0

    def live_refs(self) -> list[MessageRef]:
        """Index entries of every live message in the shards this engine delivers."""
        return [ref for shard in sorted(self._shards) for ref in self.spool.live_messages(shard)]

    def next_attempt(self, message_id: str) -> float | None:
        """When the message will be tried next (epoch); None while in flight."""
        return None if message_id in self._inflight else self.scheduler.due_of(message_id)

    def in_flight(self, message_id: str) -> bool:
        """Is an attempt at ``message_id`` running now?"""
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

    # --- hold, release, delete, retry one message ---------------------------------------------

    def _owned_ref(self, message_id: str) -> MessageRef:
        ref = self.spool.live_ref(message_id) if shard_of(message_id) in self._shards else None
        if ref is None:
            raise MessageNotFound(message_id)
        return ref

    def _held(self, message_id: str) -> bool:
        ref = self.spool.live_ref(message_id)
        return ref is not None and is_held(ref.state)

    def is_held(self, message_id: str) -> bool:
        """Does an operator hold this live message?"""
        return self._held(message_id)

    async def _quiesce(self, message_id: str, timeout: float) -> None:
        """Off the schedule, and its attempt in flight (if any) ended; the caller has put it
        in ``_busy`` so that nothing starts another meanwhile. Raises TimeoutError."""
        self.scheduler.remove(message_id)
        task = self._inflight.get(message_id)
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                raise TimeoutError(f"the attempt at {message_id} did not end in {timeout}s")
        self.scheduler.remove(message_id)  # the ended attempt may have rescheduled it

    def _resume(self, message_id: str) -> None:
        """Schedule a live, not held, owned message nothing is trying (after an operator's
        action ended, or failed)."""
        ref = self.spool.live_ref(message_id)
        if (ref is None or is_held(ref.state) or self._closing or message_id in self._inflight
                or shard_of(message_id) not in self._shards):
            return
        self.scheduler.add(message_id, self._due(ref, time.time()))

    async def _write_held(self, message_id: str, held: bool) -> None:
        ref = self._owned_ref(message_id)
        state = DeliveryState.from_wire(ref.state)
        state.held = held
        await self.spool.update_state(message_id, state.to_wire())

    async def set_held(self, message_id: str, held: bool, timeout: float = 30.0) -> bool:
        """Hold (no attempt, so no expiry, until released) or release a live message,
        durably (the STATE record says so, across restarts and failovers). Returns False when
        it already was so. Raises MessageNotFound, TimeoutError."""
        if is_held(self._owned_ref(message_id).state) == held:
            return False
        self._busy.add(message_id)
        try:
            await self._quiesce(message_id, timeout)
            await self._write_held(message_id, held)
        finally:
            self._busy.discard(message_id)
            self._resume(message_id)
        log.info("delivery.admin_hold" if held else "delivery.admin_release",
                 message_id=message_id, node_id=self.node_id)
        return True

    async def delete(self, message_id: str, timeout: float = 30.0) -> int:
        """End a live message without a DSN: an AdminDelete accounting line per pending
        recipient, written with its DONE. Returns how many recipients were dropped.
        Raises MessageNotFound, TimeoutError."""
        self._owned_ref(message_id)
        self._busy.add(message_id)
        try:
            await self._quiesce(message_id, timeout)
            dropped = await self._delete_now(await self.spool.load(message_id))
        finally:
            self._busy.discard(message_id)
            self._resume(message_id)  # nothing, unless the DONE was not written
        log.info("delivery.admin_delete", message_id=message_id, node_id=self.node_id,
                 recipients=dropped)
        return dropped

    async def _delete_now(self, stored: StoredMessage) -> int:
        state = DeliveryState.from_wire(stored.state)
        unsaved = self._unsaved.get(stored.id) or _Unsaved()
        env = stored.envelope
        if unsaved.dsn and env.sender:
            # Bounces settled before the delete still owe their sender a DSN.
            await self._send_dsn(stored, unsaved.dsn, unsaved.expired)
            unsaved.dsn = []
        settled = {**state.results, **unsaved.results}
        pending = [i for i in range(len(env.recipients)) if i not in settled]
        lines = list(unsaved.lines) + [
            self.recorder.accounting.line("AdminDelete", stored.id, recipient=env.recipients[i],
                                          sender=env.sender, attempt=state.attempts,
                                          **env.labels())
            for i in pending]
        await self.spool.mark_done(stored.id, b"".join(lines))
        self._unsaved.pop(stored.id, None)
        if (req := self._bounces.pop(stored.id, None)) is not None and not req.future.done():
            req.future.set_exception(MessageNotFound(stored.id))  # a bounce waiting for it
        return len(pending)

    def retry(self, message_id: str) -> str:
        """Try a live message now: ``scheduled``, ``in_flight`` (an attempt runs already) or
        ``held`` (nothing done: release it first). Raises MessageNotFound."""
        self._owned_ref(message_id)
        if self._held(message_id):
            return "held"
        if message_id in self._inflight or message_id in self._busy:
            return "in_flight"
        self.scheduler.remove(message_id)
        self.scheduler.add(message_id, 0.0)
        return "scheduled"

    # --- scheduling ------------------------------------------------------------------------

    def _on_due(self, message_id: str) -> None:
        if self._closing or shard_of(message_id) not in self._shards:
            return
        if message_id in self._busy or (self._held(message_id)
                                        and message_id not in self._bounces):
            return  # an operator's hold (released: rescheduled then); a bounce still applies
        if not self.may_send(message_id):
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

    def _retry_later(self, message_id: str, delay: float = 60.0) -> None:
        if self._closing:
            return
        if self.may_send(message_id):
            self.scheduler.add(message_id, time.time() + delay)
        else:  # fenced, most likely (a state write refused for that reason)
            self._park(message_id)

    def _park(self, message_id: str) -> None:
        """A message this node may not send for now. Fenced, released or closing: dropped,
        not retried (it stays in the spool; unfence or the shard's next owner schedules it).
        Otherwise the shard is between states (being acquired, or its lease deadline just
        passed and the fence is coming): look again shortly, without an attempt."""
        if self._closing or self.fenced or shard_of(message_id) not in self._shards:
            return
        self.scheduler.add(message_id, time.time() + _NOT_OWNER_RECHECK)

    # --- attempts --------------------------------------------------------------------------

    async def _attempt(self, message_id: str) -> None:
        req = self._bounces.get(message_id)
        try:
            await self._attempt_contained(message_id)
        except BaseException as exc:
            self._end_bounce(message_id, req, exc)
            raise
        self._end_bounce(message_id, req, None)
        if message_id in self._bounces and not self._closing:
            # Asked for while this attempt was already running: apply it now.
            self.scheduler.add(message_id, 0.0)

    def _end_bounce(self, message_id: str, req: _BounceRequest | None,
                    exc: BaseException | None) -> None:
        """Answer the operator bounce this attempt applied (its count, or why not)."""
        if req is None or self._bounces.get(message_id) is not req:
            return
        del self._bounces[message_id]
        if req.future.done():
            return
        if exc is None:
            req.future.set_result(req.count)
        else:
            req.future.set_exception(
                exc if isinstance(exc, Exception) else SpoolError("attempt cancelled"))

    async def _attempt_contained(self, message_id: str) -> None:
        """One attempt; whatever goes wrong, the message is tried again (or parked)."""
        try:
            stored = await self.spool.load(message_id)
        except MessageNotFound:
            self._unsaved.pop(message_id, None)
            return
        except Exception as exc:  # I/O error, a record failing verification...
            log.error("delivery.load_failed", message_id=message_id, node_id=self.node_id,
                      error=describe(exc))
            self._retry_later(message_id)
            return
        try:
            await self._run_attempt(stored)
        except asyncio.CancelledError:
            raise
        except SpoolError as exc:
            # An outcome could not be made durable; what is final stays in _unsaved (with
            # its lines) and is merged into the next attempt, so nobody is sent the message
            # again meanwhile. Fenced, it is expected (the reply of a transaction already in
            # DATA): a warning, and the at-least-once window if another node takes the shard.
            report = log.warning if isinstance(exc, FencedError) else log.error
            report("delivery.state_write_failed", message_id=message_id,
                   node_id=self.node_id, error=describe(exc), fenced=isinstance(exc, FencedError))
            self._retry_later(message_id)
        except Exception as exc:
            # A bug must not make a message silently stop being delivered.
            log.exception("delivery.attempt_crashed", message_id=message_id,
                          node_id=self.node_id, error=describe(exc))
            self._retry_later(message_id)

    async def _run_attempt(self, stored: StoredMessage) -> None:
        run = self._begin(stored)
        req = self._bounces.get(run.id)
        if req is not None:
            self._apply_bounce(run, req)
        self._check_hops(run)
        active = {d: idx for d, idx in run.groups.items() if not self.dispatcher.suspended(d)}
        await self._deliver(run, active)
        if any(o.verdict is Verdict.NOT_SENT for o in run.outcomes.values()):
            await self._end_not_owner(run)
            return
        deferred = self._defer_or_expire(run)
        await self._conclude(run, req is not None, deferred)

    def _begin(self, stored: StoredMessage) -> _Attempt:
        """The attempt's starting point: the stored state, what earlier attempts settled
        without making it durable, and the pending recipients by domain."""
        state = DeliveryState.from_wire(stored.state)
        unsaved = self._unsaved.get(stored.id) or _Unsaved()
        unsaved.results = {**state.results, **unsaved.results}
        # From here on, what this attempt settles lives in _unsaved until it is on disk.
        self._unsaved[stored.id] = unsaved
        groups: dict[str, list[int]] = defaultdict(list)
        recipients = stored.envelope.recipients
        for i in range(len(recipients)):
            if i not in unsaved.results:
                groups[_domain(recipients[i])].append(i)
        return _Attempt(stored, state, unsaved, state.attempts + 1, groups)

    def _settle(self, run: _Attempt, i: int, outcome: Outcome) -> bool:
        """Note recipient ``i``'s outcome; True if it is final (recorded, and kept unsaved
        with its line and, for a bounce, its DSN entry)."""
        run.outcomes[i] = outcome
        if outcome.verdict not in FINAL:
            return False
        result, line = self.recorder.final(run.id, run.envelope, i, outcome, run.number)
        run.unsaved.results[i] = result
        run.unsaved.lines.append(line)
        if outcome.verdict in BOUNCES:
            run.unsaved.dsn.append((i, outcome.result))
        return True

    def _apply_bounce(self, run: _Attempt, req: _BounceRequest) -> None:
        """An operator bounce only settles what it names; the other recipients keep their
        schedule (it is not a retry)."""
        for domain in [d for d in run.groups if req.domain in (None, d)]:
            for i in run.groups.pop(domain):
                self._settle(run, i, Outcome(Verdict.ADMIN, ADMIN_BOUNCE))
                req.count += 1
        run.groups.clear()

    def _check_hops(self, run: _Attempt) -> None:
        """Our own trace header is not a hop the message arrived with (ingress admits exactly
        max_hops); a limit lowered since acceptance bounces what now exceeds it."""
        if not run.groups:
            return
        max_hops = self.cfg.smtp.max_hops
        hops = received_count(run.stored.body) - 1
        if hops <= max_hops:
            return
        too_many = Outcome(Verdict.BOUNCED, RecipientResult(
            554, f"5.4.6 Too many hops ({hops} Received: headers, at most {max_hops})"))
        for i in [i for idx in run.groups.values() for i in idx]:
            self._settle(run, i, too_many)
        run.groups.clear()

    async def _deliver(self, run: _Attempt, active: dict[str, list[int]]) -> None:
        """Hand each active domain's recipients to the dispatcher and settle the outcomes."""
        if len(active) == 1:
            # The common case (one destination domain): no task or wait() needed.
            [(domain, idx)] = active.items()
            for i, outcome in (await self.dispatcher.deliver(run.stored, domain, idx)).items():
                self._settle(run, i, outcome)
            return
        tasks = [asyncio.create_task(self.dispatcher.deliver(run.stored, domain, idx))
                 for domain, idx in active.items()]
        remaining = set(tasks)
        try:
            while remaining:
                finished, remaining = await asyncio.wait(remaining,
                                                         return_when=asyncio.FIRST_COMPLETED)
                settled = [self._settle(run, i, outcome)
                           for task in finished for i, outcome in task.result().items()]
                if any(settled) and remaining:
                    # Other domains are still in flight: make these outcomes durable now,
                    # so a crash cannot send them again.
                    await self._save(run, run.progress())
        finally:
            for task in tasks:
                task.cancel()  # only matters if we were cancelled mid-way

    async def _save(self, run: _Attempt, state: DeliveryState, *, done: bool = False) -> None:
        """Write ``state`` (or DONE) with the lines waiting for it, in one group commit."""
        lines = run.unsaved.lines
        taken = len(lines)
        if done:
            await self.spool.mark_done(run.id, b"".join(lines))
        else:
            await self.spool.update_state(run.id, state.to_wire(), b"".join(lines))
        del lines[:taken]

    def _defer_or_expire(self, run: _Attempt) -> list[int]:
        """Recipients deferred by this attempt: expired (bounced) once the message is
        ``max_age`` old, else recorded as transient failures. Returns them."""
        deferred = [i for i, o in run.outcomes.items() if o.verdict is Verdict.DEFERRED]
        env = run.envelope
        expired = bool(deferred) and time.time() - env.received_at >= self.dcfg.max_age
        for i in deferred:
            result = run.outcomes[i].result
            if expired:
                self._settle(run, i, Outcome(Verdict.EXPIRED, RecipientResult(
                    result.code if 400 <= result.code < 500 else 451,
                    f"4.4.7 Message expired after {run.number} attempts; last error: "
                    f"{result.reply}", result.remote)))
            else:
                before = run.state.transients.get(i)
                run.transients[i] = (Transient(result.reply, result.remote, time.time())
                                     if before is None else
                                     before.again(result.reply, result.remote, time.time()))
                run.unsaved.lines.append(
                    self.recorder.deferred(run.id, env, i, result, run.number))
        run.unsaved.expired = run.unsaved.expired or expired
        return deferred

    async def _conclude(self, run: _Attempt, bounced: bool, deferred: list[int]) -> None:
        """Queue the DSN, then finish the message or record when it is tried next."""
        await self._queue_dsn(run)
        if not run.pending():
            await self._save(run, run.progress(), done=True)
            self._unsaved.pop(run.id, None)
            return
        state = self._next_state(run, bounced, deferred)
        await self._save(run, state)
        self._unsaved.pop(run.id, None)
        if not self._closing and shard_of(run.id) in self._shards:
            due = state.next_attempt
            if not bounced and not deferred and not self._still_held(run):
                # Held when it was tried, resumed while its state was being written: the
                # resume's flush could not see it (neither scheduled nor done).
                due = 0.0
            self.scheduler.add(run.id, due)

    def _next_state(self, run: _Attempt, bounced: bool, deferred: list[int]) -> DeliveryState:
        """Retry back-off: retry_initial x 2^(attempt-1), capped at retry_max, +-10%."""
        now = time.time()
        state = run.progress()
        if bounced:
            # An operator bounce is no attempt: the rest keep their schedule.
            state.next_attempt = state.next_attempt or now
        elif deferred:
            state.attempts = run.number
            delay = min(self.dcfg.retry_max, self.dcfg.retry_initial * 2 ** (run.number - 1))
            state.next_attempt = now + delay * random.uniform(0.9, 1.1)
            state.last_reply = run.outcomes[deferred[0]].result.reply
        else:
            # Only suspended domains are left: look again soon, without counting an attempt.
            state.next_attempt = now + min(60.0, self.dcfg.retry_initial)
        return state

    def _still_held(self, run: _Attempt) -> bool:
        """Is the message's tenant or campaign, or a pending recipient's domain (or its
        site), still suspended?"""
        rcpts, done = run.envelope.recipients, run.unsaved.results
        env = run.envelope
        if self.dispatcher.label_hold(env.tenant, env.campaign) is not None:
            return True
        return any(self.dispatcher.held_by(_domain(rcpts[i])) is not None
                   for i in range(len(rcpts)) if i not in done)

    async def _end_not_owner(self, run: _Attempt) -> None:
        """End an attempt some of whose recipients were not tried because this node may not
        send for the shard now. Those stay pending: no attempt counted, no TransientFailure
        (not the remote's fault). What did become final is recorded if the spool still takes
        it, else kept in _unsaved, so this node never sends it again. Then parked (see
        _park) unless the shard is provably ours again already."""
        mid, unsaved = run.id, run.unsaved
        log.debug("delivery.not_owner_stopped", message_id=mid, node_id=self.node_id,
                  pending=sum(1 for i in range(len(run.envelope.recipients))
                              if i not in unsaved.results))
        if unsaved.dsn or unsaved.lines or unsaved.results != run.state.results:
            await self._queue_dsn(run)
            await self._save(run, run.progress())
        self._unsaved.pop(mid, None)
        if self._closing:
            return
        if self.may_send(mid):  # a short fence that ended meanwhile
            self.scheduler.add(mid, run.state.next_attempt)
        else:
            self._park(mid)

    # --- bounces ---------------------------------------------------------------------------

    async def _queue_dsn(self, run: _Attempt) -> None:
        """Queue one DSN for every bounce not yet reported (none to a null sender)."""
        unsaved = run.unsaved
        if unsaved.dsn and run.envelope.sender:
            await self._send_dsn(run.stored, unsaved.dsn, unsaved.expired)
        unsaved.dsn = []

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
