"""Outcome recording: what one attempt made of each recipient becomes an accounting line, a
metric, a log event and, for the probe, a watcher's answer.

The lines are returned, not written: the queue manager hands them to the spool write that
makes the outcome durable, so a line exists exactly when its record does.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import Any

import structlog

from mta.accounting import AccountingLog
from mta.bounce.classify import classify
from mta.delivery.site import RecipientResult
from mta.envelope import Envelope
from mta.metrics import NodeMetrics
from mta.queue.state import FinalResult, RecipientStatus

__all__ = ["BOUNCES", "FINAL", "Outcome", "OutcomeRecorder", "Verdict"]

log = structlog.get_logger("mta.delivery")

# First outcomes kept for watchers that arrive after a fast delivery (the probe's).
_OUTCOMES_KEPT = 256


class Verdict(enum.Enum):
    """What one attempt made of one recipient."""

    DELIVERED = "d"
    BOUNCED = "b"  # refused for good
    DEFERRED = "t"  # a transient failure: tried again later
    EXPIRED = "x"  # deferred past max_age: bounced
    ADMIN = "a"  # bounced by an operator
    NOT_SENT = "f"  # not tried: this node may not send for the shard now
    HELD = "h"  # not tried: an operator suspended its domain or site (no attempt counted)


FINAL = frozenset({Verdict.DELIVERED, Verdict.BOUNCED, Verdict.EXPIRED, Verdict.ADMIN})
BOUNCES = frozenset({Verdict.BOUNCED, Verdict.EXPIRED, Verdict.ADMIN})  # each gets a DSN


@dataclass(frozen=True, slots=True)
class Outcome:
    """A recipient's verdict in one attempt, with the reply it rests on."""

    verdict: Verdict
    result: RecipientResult


class OutcomeRecorder:
    """Turns outcomes into accounting lines, metrics and log events; answers probe watchers."""

    def __init__(self, accounting: AccountingLog, metrics: NodeMetrics, node_id: str) -> None:
        self.accounting = accounting
        self.metrics = metrics
        self.node_id = node_id
        self._watchers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # First outcomes of messages from these senders (the probe's) are kept a while, so a
        # watcher that arrives after a fast delivery still gets it.
        self.watch_senders: set[str] = set()
        self._outcomes: dict[str, dict[str, Any]] = {}

    # --- probe watchers --------------------------------------------------------------------

    def watch(self, message_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future that gets the first recipient outcome (any kind) of ``message_id``."""
        fut = self._watchers.get(message_id)
        if fut is None:
            fut = self._watchers[message_id] = asyncio.get_running_loop().create_future()
            if (seen := self._outcomes.get(message_id)) is not None:
                fut.set_result(seen)
        return fut

    def unwatch(self, message_id: str) -> None:
        """Forget the watcher of ``message_id`` and its kept outcome."""
        self._watchers.pop(message_id, None)
        self._outcomes.pop(message_id, None)

    def _note_outcome(self, message_id: str, outcome: dict[str, Any]) -> None:
        if message_id in self._outcomes:
            return
        self._outcomes[message_id] = outcome
        while len(self._outcomes) > _OUTCOMES_KEPT:
            del self._outcomes[next(iter(self._outcomes))]
        fut = self._watchers.get(message_id)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    # --- outcomes --------------------------------------------------------------------------

    def final(self, mid: str, env: Envelope, i: int, outcome: Outcome, attempt: int
              ) -> tuple[FinalResult, bytes]:
        """Record recipient ``i``'s final outcome: its result for the delivery state, and
        the accounting line to write with it."""
        verdict, result = outcome.verdict, outcome.result
        if verdict is Verdict.DELIVERED:
            line = self._record(mid, env, i, "Delivery", result, attempt)
            self.metrics.delivered.inc()
            self.metrics.delivery_latency.observe(max(0.0, time.time() - env.received_at))
            return FinalResult(RecipientStatus.DELIVERED, result.reply, "", result.remote), line
        if verdict is Verdict.ADMIN:
            line = self._record(mid, env, i, "AdminBounce", result, attempt)
            self.metrics.admin_bounced.inc()
            return FinalResult(RecipientStatus.BOUNCED, result.reply, "admin", ""), line
        cls = classify(result.code, result.text)
        expired = verdict is Verdict.EXPIRED
        line = self._record(mid, env, i, "Expiration" if expired else "Bounce", result, attempt,
                            bounce_class=cls)
        if expired:
            self.metrics.expired.inc()
        else:
            self.metrics.bounced.labels(cls).inc()
        return FinalResult(RecipientStatus.BOUNCED, result.reply, cls, result.remote), line

    def deferred(self, mid: str, env: Envelope, i: int, result: RecipientResult,
                 attempt: int) -> bytes:
        """Record a transient failure of recipient ``i``; returns its accounting line."""
        line = self._record(mid, env, i, "TransientFailure", result, attempt)
        self.metrics.deferred.inc()
        return line

    def _record(self, mid: str, env: Envelope, i: int, kind: str, result: RecipientResult,
                attempt: int, **extra: Any) -> bytes:
        rcpt = env.recipients[i]
        if mid in self._watchers or env.sender in self.watch_senders:
            self._note_outcome(mid, {"kind": kind, "recipient": rcpt, "reply": result.reply,
                                     "remote": result.remote, "at": time.time()})
        log.info(f"delivery.{kind.lower()}", message_id=mid, node_id=self.node_id,
                 recipient=rcpt, response=result.reply, remote=result.remote, attempt=attempt,
                 **extra)
        if result.tls:
            extra["tls"] = result.tls  # "TLSv1.3 TLS_AES_256_GCM_SHA384 verified"
        if result.source:
            extra["source"] = result.source  # the egress source it left from
        return self.accounting.line(kind, mid, recipient=rcpt, sender=env.sender,
                                    site=result.remote, response=result.reply,
                                    attempt=attempt, **env.labels(), **extra)
