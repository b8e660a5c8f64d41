"""In-memory index of one shard: live messages and which segments still hold needed records.

Kept small on purpose (no envelope, no body) so a large backlog costs little memory; the
envelope and body are read back from the segment when needed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mta.envelope import domain_key
from mta.queue.state import final_indexes

__all__ = ["Destinations", "MessageRef", "SegmentUsage", "ShardIndex", "labels_of",
           "recipient_domains"]


Destinations = tuple[tuple[str, ...], bytes | None]


def recipient_domains(recipients: Sequence[str]) -> Destinations:
    """The distinct recipient domains of a message (interned: a backlog of a million messages
    to a few providers shares a few strings) and, when there are several, each recipient's
    domain as one byte indexing them."""
    if len(recipients) == 1:  # the common case, and recovery runs this per message
        return (sys.intern(domain_key(recipients[0].rpartition("@")[2])),), None
    per_rcpt = [sys.intern(domain_key(r.rpartition("@")[2])) for r in recipients]
    domains = tuple(sorted(set(per_rcpt)))
    if len(domains) <= 1 or len(domains) > 255:
        return domains, None
    where = {d: i for i, d in enumerate(domains)}
    return domains, bytes(where[d] for d in per_rcpt)


def labels_of(envelope: dict[str, Any]) -> tuple[str, str] | None:
    """A stored envelope's (tenant, campaign), interned; None when it has neither."""
    tenant, campaign = envelope.get("tenant", ""), envelope.get("campaign", "")
    if not tenant and not campaign:
        return None
    return sys.intern(str(tenant)), sys.intern(str(campaign))


@dataclass(slots=True)
class MessageRef:
    """Where a live message's records are, and its latest delivery state (opaque here: the
    value the delivery engine last stored, see :mod:`mta.queue.state`)."""

    id: str
    seq: int  # segment of the MSG record
    offset: int
    size: int
    state: dict[str, Any] | None = None
    state_seq: int = -1  # segment of the latest STATE record; -1 if none or embedded in MSG
    state_size: int = 0
    domains: tuple[str, ...] = ()  # distinct recipient domains (queue summaries, flush)
    rcpt_map: bytes | None = None  # recipient index -> index in domains (several domains)
    labels: tuple[str, str] | None = None  # (tenant, campaign), if either was given

    @property
    def tenant(self) -> str:
        return self.labels[0] if self.labels else ""

    @property
    def campaign(self) -> str:
        return self.labels[1] if self.labels else ""

    def pending_domains(self) -> tuple[str, ...]:
        """Domains that still have a recipient without a final outcome."""
        # One domain (or too many to map): a live message has a pending recipient there.
        if self.rcpt_map is None or not self.state:
            return self.domains
        done = final_indexes(self.state)
        return tuple(sorted({self.domains[d] for i, d in enumerate(self.rcpt_map)
                             if i not in done}))


@dataclass(slots=True)
class SegmentUsage:
    """How much of a segment is still needed."""

    refs: int = 0
    live_bytes: int = 0
    end: int = 0  # highest byte known to be used


class ShardIndex:
    """Live messages of a shard plus per-segment reference counts.

    Applying records in log order gives the same index whether they come from a recovery
    scan or from appends made durable at run time.
    """

    def __init__(self) -> None:
        self.messages: dict[str, MessageRef] = {}
        self.segments: dict[int, SegmentUsage] = {}
        # Every segment below this is sealed and all its records are applied here. Records
        # are applied in log order, so seeing a record in segment N proves N-1 is complete.
        self.sealed_below = 0

    def _usage(self, seq: int) -> SegmentUsage:
        usage = self.segments.get(seq)
        if usage is None:
            usage = self.segments[seq] = SegmentUsage()
        return usage

    def note(self, seq: int, offset: int, size: int) -> None:
        """Account for a record's bytes whatever its kind."""
        usage = self._usage(seq)
        usage.end = max(usage.end, offset + size)
        self.sealed_below = max(self.sealed_below, seq)

    def _ref(self, seq: int, size: int) -> None:
        usage = self._usage(seq)
        usage.refs += 1
        usage.live_bytes += size

    def _unref(self, seq: int, size: int) -> None:
        usage = self.segments.get(seq)
        if usage is not None:
            usage.refs -= 1
            usage.live_bytes -= size

    def _drop_state(self, ref: MessageRef) -> None:
        if ref.state_seq >= 0:
            self._unref(ref.state_seq, ref.state_size)
            ref.state_seq, ref.state_size = -1, 0

    def on_msg(self, message_id: str, seq: int, offset: int, size: int,
               state: dict[str, Any] | None, dests: Destinations = ((), None),
               labels: tuple[str, str] | None = None) -> None:
        """A MSG record; a later copy (from compaction) replaces the earlier one."""
        self.note(seq, offset, size)
        old = self.messages.get(message_id)
        if old is not None:
            self._unref(old.seq, old.size)
            self._drop_state(old)
            dests = dests if dests[0] else (old.domains, old.rcpt_map)
            labels = labels or old.labels
        self.messages[message_id] = MessageRef(message_id, seq, offset, size, state,
                                               domains=dests[0], rcpt_map=dests[1],
                                               labels=labels)
        self._ref(seq, size)

    def on_state(self, message_id: str, seq: int, offset: int, size: int,
                 state: dict[str, Any]) -> bool:
        """A STATE record; ignored (False) when the message is not live."""
        self.note(seq, offset, size)
        ref = self.messages.get(message_id)
        if ref is None:
            return False
        self._drop_state(ref)
        ref.state, ref.state_seq, ref.state_size = state, seq, size
        self._ref(seq, size)
        return True

    def on_done(self, message_id: str, seq: int, offset: int, size: int) -> bool:
        """A DONE record; the message stops being live."""
        self.note(seq, offset, size)
        ref = self.messages.pop(message_id, None)
        if ref is None:
            return False
        self._unref(ref.seq, ref.size)
        self._drop_state(ref)
        return True

    def dead_head(self) -> list[int]:
        """Oldest sealed segments with nothing live, in order, stopping at the first live one.

        Deleting only from the head keeps every DONE record until the MSG it cancels is gone,
        so a deleted message can never come back on recovery.
        """
        dead = []
        for seq in sorted(self.segments):
            if seq >= self.sealed_below or self.segments[seq].refs > 0:
                break
            dead.append(seq)
        return dead

    def forget_segment(self, seq: int) -> None:
        self.segments.pop(seq, None)

    def referencing(self, seq: int) -> tuple[list[MessageRef], list[MessageRef]]:
        """Live messages whose MSG record, or latest STATE record, is in segment ``seq``."""
        msgs, states = [], []
        for ref in self.messages.values():
            if ref.seq == seq:
                msgs.append(ref)
            elif ref.state_seq == seq:
                states.append(ref)
        return msgs, states
