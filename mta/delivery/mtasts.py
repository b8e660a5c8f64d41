"""MTA-STS (RFC 8461) policies: the ``_mta-sts`` TXT record, the policy text, and which MX
hosts a policy allows. Pure parsing and matching; fetching and caching are in
:mod:`mta.delivery.stspolicies`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_AGE_LIMIT", "StsPolicy", "StsPolicyError", "is_sts_txt", "parse_policy",
           "parse_txt"]

MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: a year, the most a policy may ask to be cached
_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE_RE = re.compile(r"[0-9]{1,10}")
# A pattern is a host name, or "*." and a host name (the wildcard stands for one label).
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_PATTERN_RE = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})+")
_MODES = ("enforce", "testing", "none")


class StsPolicyError(ValueError):
    """A policy text or TXT record that does not parse (RFC 8461 3.1, 3.2)."""


@dataclass(frozen=True)
class StsPolicy:
    """One domain's policy, as fetched: ``mode``, the MX patterns, how long it may be cached
    (``max_age`` seconds from ``fetched``, wall clock) and the TXT ``id`` it was fetched for."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    fetched: float = 0.0

    @property
    def expires(self) -> float:
        return self.fetched + self.max_age

    def valid(self, now: float | None = None) -> bool:
        """Not expired (``now``: wall clock, default the current time)."""
        return (time.time() if now is None else now) < self.expires

    def matches(self, host: str) -> bool:
        """Does MX host ``host`` match one of the policy's ``mx`` patterns? A ``*.`` pattern
        matches exactly one more label on the left (RFC 8461 4.1)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, tail = host.partition(".")
                if head and tail == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "mx": list(self.mx), "max_age": self.max_age,
                "id": self.id, "fetched": self.fetched}

    @classmethod
    def from_json(cls, raw: Any) -> StsPolicy:
        """From :meth:`to_json`'s form; raises StsPolicyError for anything else."""
        try:
            policy = cls(mode=str(raw["mode"]), mx=tuple(str(m) for m in raw["mx"]),
                         max_age=int(raw["max_age"]), id=str(raw["id"]),
                         fetched=float(raw["fetched"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StsPolicyError(f"bad cached policy: {exc}") from None
        if policy.mode not in _MODES or not 0 <= policy.max_age <= MAX_AGE_LIMIT:
            raise StsPolicyError("bad cached policy: mode or max_age out of range")
        if not 0 <= policy.fetched <= time.time() + 86_400:
            raise StsPolicyError("bad cached policy: fetched in the future")
        return policy


def parse_txt(strings: list[bytes]) -> str:
    """The policy ``id`` of one ``_mta-sts`` TXT record (its strings joined); raises
    StsPolicyError if it is not a valid ``v=STSv1`` record."""
    try:
        text = b"".join(strings).decode("ascii")
    except UnicodeDecodeError:
        raise StsPolicyError("TXT record is not ASCII") from None
    fields: dict[str, str] = {}
    for i, raw in enumerate(text.split(";")):
        part = raw.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            raise StsPolicyError(f"TXT field without '=': {part[:40]!r}")
        key = key.strip(" \t")
        if i == 0 and (key != "v" or value.strip(" \t") != "STSv1"):
            raise StsPolicyError("TXT record does not begin with v=STSv1")
        fields.setdefault(key, value.strip(" \t"))
    ident = fields.get("id", "")
    if not _ID_RE.fullmatch(ident):
        raise StsPolicyError("TXT record has no valid id (1-32 letters and digits)")
    return ident


def is_sts_txt(strings: list[bytes]) -> bool:
    """Does this TXT record claim to be an MTA-STS record (begin with ``v=STSv1``)? Others
    at ``_mta-sts`` are ignored (RFC 8461 3.1)."""
    head = b"".join(strings)[:16].lstrip(b" \t")
    if not head.startswith(b"v=STSv1"):
        return False
    rest = head[len(b"v=STSv1"):].lstrip(b" \t")
    return not rest or rest.startswith(b";")  # "v=STSv10" is another version


def parse_policy(text: str, ident: str = "", fetched: float = 0.0) -> StsPolicy:
    """The policy in ``text`` (RFC 8461 3.2: ``key: value`` lines, the first of each key
    counts except ``mx``; unknown keys ignored); raises StsPolicyError if it is not valid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise StsPolicyError(f"policy line without ':': {line[:60]!r}")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _PATTERN_RE.fullmatch(pattern):
                raise StsPolicyError(f"policy mx pattern not a host name: {value[:60]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise StsPolicyError("policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in _MODES:
        raise StsPolicyError(f"policy mode {mode[:20]!r} is not enforce, testing or none")
    age = fields.get("max_age", "")
    if not _MAX_AGE_RE.fullmatch(age) or int(age) > MAX_AGE_LIMIT:
        raise StsPolicyError(f"policy max_age {age[:20]!r} is not 0-{MAX_AGE_LIMIT}")
    if not mx and mode != "none":
        raise StsPolicyError(f"policy in mode {mode} names no mx")
    return StsPolicy(mode, tuple(dict.fromkeys(mx)), int(age), ident, fetched)
