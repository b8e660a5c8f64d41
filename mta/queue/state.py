"""A live message's delivery state, as the delivery engine keeps it in the spool's STATE records.

The spool stores the wire form as an opaque value; only this module knows its keys::

    {"att": attempts made, "next": epoch of the next attempt,
     "r": {"<recipient index>": [status, reply, bounce class, remote]},  # final ones only
     "last": last transient reply,
     "lr": {"<recipient index>": [reply, remote, epoch, count]},  # pending recipients'
           # transient failures: the last one's reply, host and time, and how many so far
     "held": true}  # only while an operator holds the message

status is "d" (delivered) or "b" (bounced or expired). A recipient with no entry is pending.
Every key may be missing (a state written in the middle of a first attempt holds only "r";
"lr" and "held" are absent from every spool written before they existed, and "held" is
absent while the message is not held); a message without a STATE record has none at all.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeliveryState", "FinalResult", "RecipientStatus", "Transient", "final_indexes",
           "is_held"]


class RecipientStatus(enum.StrEnum):
    """The final status of one recipient, as its letter on the wire."""

    DELIVERED = "d"
    BOUNCED = "b"  # refused, expired, or bounced by an operator


@dataclass(frozen=True, slots=True)
class FinalResult:
    """One recipient's final outcome: never tried again once recorded."""

    status: RecipientStatus
    reply: str
    bounce_class: str = ""  # "" when delivered; "admin" for an operator's bounce
    remote: str = ""  # the host that answered; "" when none did

    def to_wire(self) -> list[str]:
        """``[status, reply, class, remote]``, as stored."""
        return [self.status.value, self.reply, self.bounce_class, self.remote]

    @classmethod
    def from_wire(cls, item: Any) -> FinalResult:
        """Read ``[status, reply, class, remote]``; raises ValueError on anything else."""
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise ValueError(f"bad recipient result {item!r}")
        status, reply, bounce_class, remote = item
        return cls(RecipientStatus(status), str(reply), str(bounce_class), str(remote))


@dataclass(frozen=True, slots=True)
class Transient:
    """A pending recipient's transient failures: the last one's reply, the host that gave
    it and when, and how many there were."""

    reply: str
    remote: str = ""
    at: float = 0.0
    count: int = 1

    def to_wire(self) -> list[Any]:
        """``[reply, remote, at, count]``, as stored."""
        return [self.reply, self.remote, self.at, self.count]

    @classmethod
    def from_wire(cls, item: Any) -> Transient:
        """Read ``[reply, remote, at, count]``; raises ValueError on anything else."""
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise ValueError(f"bad transient result {item!r}")
        reply, remote, at, count = item
        return cls(str(reply), str(remote), float(at), int(count))

    def again(self, reply: str, remote: str, at: float) -> Transient:
        """This recipient failed for now once more."""
        return Transient(reply, remote, at, self.count + 1)


@dataclass(slots=True)
class DeliveryState:
    """Attempts made, the next one's time, each settled recipient's result, the last
    transient reply (of the message, and of each pending recipient), and the operator's hold."""

    attempts: int = 0
    next_attempt: float = 0.0  # epoch; 0 = none recorded
    results: dict[int, FinalResult] = field(default_factory=dict)  # recipient index ->
    last_reply: str = ""
    transients: dict[int, Transient] = field(default_factory=dict)  # pending recipients
    held: bool = False  # not attempted (and so never expired) until released

    def to_wire(self) -> dict[str, Any]:
        """The dict the spool stores (see the module docstring)."""
        wire: dict[str, Any] = {"att": self.attempts, "next": self.next_attempt,
                                "r": {str(i): r.to_wire() for i, r in self.results.items()},
                                "last": self.last_reply}
        # Only when set: most states never carry them, and every record stays small.
        transients = {str(i): t.to_wire() for i, t in self.transients.items()
                      if i not in self.results}
        if transients:
            wire["lr"] = transients
        if self.held:
            wire["held"] = True
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any] | None) -> DeliveryState:
        """Read a state as stored (None: a message never attempted)."""
        if not wire:
            return cls()
        results = {int(i): FinalResult.from_wire(r) for i, r in (wire.get("r") or {}).items()}
        transients = {int(i): Transient.from_wire(t) for i, t in (wire.get("lr") or {}).items()}
        return cls(int(wire.get("att", 0)), float(wire.get("next", 0.0) or 0.0), results,
                   str(wire.get("last", "") or ""), transients, bool(wire.get("held", False)))

    def pending(self, recipients: int) -> list[int]:
        """Indexes of the recipients (of ``recipients``) with no final result."""
        return [i for i in range(recipients) if i not in self.results]


def final_indexes(wire: Mapping[str, Any] | None) -> frozenset[int]:
    """The recipients a stored state has settled, without decoding the rest of it."""
    done = wire.get("r") if wire else None
    return frozenset(map(int, done)) if done else frozenset()


def is_held(wire: Mapping[str, Any] | None) -> bool:
    """Does a stored state say an operator holds the message (without decoding the rest)?"""
    return bool(wire and wire.get("held"))
