"""Envelope and message ids: what the spool stores besides the message body."""

from __future__ import annotations

import functools
import ipaddress
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Envelope", "InvalidMessageId", "domain_key", "new_message_id", "received_at_of",
           "shard_of"]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Crockford's digits, either case, to int()'s base-32 digits; any other ASCII character to
# one int() refuses (else it would take blanks, signs and underscores, or I, L, O and U).
_TO_INT_DIGITS = str.maketrans(
    {chr(c): "!" for c in range(128)}
    | {c: d for c, d in zip(_CROCKFORD + _CROCKFORD.lower(),
                            "0123456789abcdefghijklmnopqrstuv" * 2, strict=True)})
_ID_LEN = 26
_DIGIT_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits -> 2 digits
_PAIR_SHIFTS = tuple(range(5 * (_ID_LEN - 2), -1, -10))


class InvalidMessageId(ValueError):
    """A string that is not a message id produced by :func:`new_message_id`."""


class _IdState:
    """Monotonic within a millisecond so ids from one process sort by submission order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = 0
        self.seq = 0


_state = _IdState()


def new_message_id(shard: int) -> str:
    """A cluster-unique, time-ordered id (ULID layout: 48-bit ms, 16-bit shard, 64-bit random)."""
    with _state.lock:
        now = time.time_ns() // 1_000_000
        if now <= _state.last_ms:
            now = _state.last_ms
            _state.seq += 1
        else:
            _state.last_ms = now
            # Random start per ms keeps ids unique across processes; the low 24 bits count up.
            _state.seq = int.from_bytes(os.urandom(8)) & ~0xFFFFFF
        low = _state.seq & 0xFFFFFFFFFFFFFFFF
    value = (now << 80) | ((shard & 0xFFFF) << 64) | low
    # 26 base-32 digits are 130 bits: the value's 128 and two zeros on top, taken 10 bits
    # (two digits) at a time from a table (half the cost of base64.b32encode, which is
    # Python code in 3.11).
    return "".join([_DIGIT_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


def _decode(message_id: str) -> int:
    if len(message_id) != _ID_LEN:
        raise InvalidMessageId(f"message id must be {_ID_LEN} characters, got {message_id!r}")
    try:
        if not message_id.isascii():
            raise ValueError
        # int() reads the digits in C (a Python loop over 26 showed in the ingress profile).
        value = int(message_id.translate(_TO_INT_DIGITS), 32)
    except ValueError:
        raise InvalidMessageId(f"not a message id: {message_id!r}") from None
    if value >> 128:
        raise InvalidMessageId(f"not a message id: {message_id!r}")
    return value


@functools.lru_cache(maxsize=65536)
def domain_key(domain: str) -> str:
    """The form domains are compared in (suspension, policies, throttles, queues, routes):
    lower case, no trailing dot, IDNA A-labels for a non-ASCII name, so ``bücher.example``
    and ``xn--bcher-kva.example`` are one domain; an IPv6 address literal compressed."""
    key = domain.lower().rstrip(".")
    if key.startswith("[ipv6:"):
        # An address literal has many spellings ([IPv6:2001:DB8:0::1], ...::0.0.0.1): one.
        try:
            return f"[ipv6:{ipaddress.IPv6Address(key[6:-1]).compressed}]"
        except ValueError:
            return key
    if not key.isascii():
        try:
            key = key.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # not a name the doors accept; compared as it is
    return key


# Asked several times per attempt (ownership checks before connect, MAIL, RCPT, DATA) for
# the same few thousand ids in flight: decoding 26 characters each time showed in profiles.
@functools.lru_cache(maxsize=1 << 16)
def shard_of(message_id: str) -> int:
    """The shard number encoded in a message id."""
    return (_decode(message_id) >> 64) & 0xFFFF


@dataclass(slots=True)
class Envelope:
    """The SMTP envelope of one accepted message plus where it came from."""

    sender: str
    recipients: list[str]
    smtputf8: bool = False
    body_8bit: bool = False
    client_ip: str = ""
    helo: str = ""
    auth_user: str = ""
    received_at: float = field(default_factory=time.time)
    tenant: str = ""  # who the message is sent for (see [tenants]); "" if nobody said
    campaign: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {
            "from": self.sender,
            "to": self.recipients,
            "utf8": self.smtputf8,
            "8bit": self.body_8bit,
            "ip": self.client_ip,
            "helo": self.helo,
            "user": self.auth_user,
            "at": self.received_at,
        }
        if self.tenant:
            d["tenant"] = self.tenant
        if self.campaign:
            d["campaign"] = self.campaign
        return d

    def labels(self) -> dict[str, str]:
        """``tenant`` and ``campaign`` where set: what every accounting record carries."""
        if not self.tenant and not self.campaign:
            return {}
        return {k: v for k, v in (("tenant", self.tenant), ("campaign", self.campaign)) if v}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        return cls(
            sender=d["from"],
            recipients=list(d["to"]),
            smtputf8=bool(d.get("utf8", False)),
            body_8bit=bool(d.get("8bit", False)),
            client_ip=d.get("ip", ""),
            helo=d.get("helo", ""),
            auth_user=d.get("user", ""),
            received_at=float(d.get("at", 0.0)),
            tenant=str(d.get("tenant", "")),
            campaign=str(d.get("campaign", "")),
        )


def received_at_of(message_id: str) -> float:
    """When the message was accepted (epoch seconds), from the time part of its id."""
    return (_decode(message_id) >> 80) / 1000.0
