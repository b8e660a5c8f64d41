"""Password-guessing defence: slow down, then refuse, AUTH from an address that keeps failing,
and stop checking a user's password for strangers once many addresses failed at it."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["AuthAttempt", "AuthGuard", "AuthOutcome"]

_MAX_TRACKED = 100_000  # addresses (and users, and known pairs) remembered at most, oldest first
# A (user, address) pair that logged in keeps passing a locked user's check this long: the
# legitimate user's usual clients keep working while strangers guess at the account.
_KNOWN_FOR = 30 * 86400.0


@dataclass(slots=True)
class _Track:
    """Failures within the window, attempts being checked right now, and the lock."""

    fails: deque[tuple[float, str]] = field(default_factory=deque)  # (when, user or address)
    inflight: Counter[str] = field(default_factory=Counter)
    locked_until: float = 0.0

    def prune(self, now: float, window: float) -> None:
        while self.fails and now - self.fails[0][0] > window and self.locked_until <= now:
            self.fails.popleft()

    def used(self) -> int:
        return len(self.fails) + self.inflight.total()

    def forget(self, key: str) -> None:
        kept = [f for f in self.fails if f[1] != key]
        if len(kept) != len(self.fails):
            self.fails = deque(kept)

    def unreserve(self, key: str) -> None:
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def idle(self, now: float) -> bool:
        return not self.fails and not self.inflight and self.locked_until <= now


@dataclass(slots=True)
class AuthAttempt:
    """One password check, reserved against the budgets before any hashing starts.

    ``refused_for`` > 0: refuse (454) and check nothing. ``check`` False: the user is locked
    for this address, so answer exactly as a wrong password would, without checking it.
    """

    ip: str
    user: str
    refused_for: float = 0.0
    check: bool = True
    user_reserved: bool = False
    settled: bool = False


class AuthOutcome(NamedTuple):
    delay: float  # seconds to wait before answering (the tarpit)
    address_locked: bool  # this failure locked the address out now
    user_locked: bool  # this failure locked the user's checks for strangers now


class AuthGuard:
    """Budgets of failed AUTHs, in a sliding window of ``lockout`` seconds.

    Per client address: each failure after the first answers ``delay`` x (failures - 1) later
    (at most 5x); ``max_failures`` failures lock the address out of AUTH for ``lockout``
    seconds. An attempt counts against the budget from the moment it is reserved (before the
    password is hashed), so parallel connections get no more guesses than sequential ones.

    Per user (distributed guessing): ``user_max_failures`` failures from any addresses lock
    that user's password checks for ``lockout`` seconds, except from trusted addresses
    (``relay_networks``) and addresses the user has logged in from before; everyone else gets
    the ordinary 535, so the lock reveals nothing and is no oracle.
    """

    def __init__(self, max_failures: int, lockout: float, delay: float,
                 user_max_failures: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.user_max_failures = user_max_failures
        self.lockout = lockout
        self.delay = delay
        self._clock = clock
        self._addrs: OrderedDict[str, _Track] = OrderedDict()
        self._users: OrderedDict[str, _Track] = OrderedDict()
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()

    # --- lookups -----------------------------------------------------------------------------

    def _track(self, table: OrderedDict[str, _Track], key: str, now: float) -> _Track:
        track = table.pop(key, None) or _Track()
        track.prune(now, self.lockout)
        table[key] = track  # most recently used last: the oldest are forgotten first
        while len(table) > _MAX_TRACKED:
            table.popitem(last=False)
        return track

    def _settle_track(self, table: OrderedDict[str, _Track], key: str, now: float) -> None:
        track = table.get(key)
        if track is not None and track.idle(now):
            del table[key]

    def locked_for(self, ip: str) -> float:
        """Seconds this address is still refused AUTH (0 when it may try)."""
        track = self._addrs.get(ip)
        if track is None:
            return 0.0
        return max(0.0, track.locked_until - self._clock())

    def user_locked_for(self, user: str) -> float:
        """Seconds strangers' password checks for ``user`` stay locked (0: not locked)."""
        track = self._users.get(user)
        if track is None:
            return 0.0
        return max(0.0, track.locked_until - self._clock())

    def _known_pair(self, ip: str, user: str, now: float) -> bool:
        since = self._known.get((user, ip))
        return since is not None and now - since <= _KNOWN_FOR

    # --- one attempt -------------------------------------------------------------------------

    def begin(self, ip: str, user: str, *, track_user: bool = True,
              trusted: bool = False) -> AuthAttempt:
        """Reserve a check of ``user``'s password from ``ip``; settle it with :meth:`finish`.

        ``track_user``: count failures against this user name (only names in the users file,
        so guessed names cannot grow memory). ``trusted``: the address may log in even while
        the user is locked (``relay_networks``).
        """
        now = self._clock()
        addr = self._track(self._addrs, ip, now)
        if addr.locked_until > now:
            return AuthAttempt(ip, user, refused_for=addr.locked_until - now)
        if addr.used() >= self.max_failures:
            # Every remaining guess is being checked right now; one will free a slot or lock.
            wait = self.lockout - (now - addr.fails[0][0]) if addr.fails else self.delay
            return AuthAttempt(ip, user, refused_for=max(1.0, wait))
        addr.inflight[user] += 1
        attempt = AuthAttempt(ip, user)
        if not track_user:
            return attempt
        acct = self._track(self._users, user, now)
        if not trusted and not self._known_pair(ip, user, now) and (
                acct.locked_until > now or acct.used() >= self.user_max_failures):
            attempt.check = False
            return attempt
        acct.inflight[ip] += 1
        attempt.user_reserved = True
        return attempt

    def finish(self, attempt: AuthAttempt, ok: bool) -> AuthOutcome:
        """Settle a reserved attempt. Idempotent, so a cancelled session can always settle."""
        if attempt.settled or attempt.refused_for:
            return AuthOutcome(0.0, False, False)
        attempt.settled = True
        now = self._clock()
        addr = self._track(self._addrs, attempt.ip, now)
        addr.unreserve(attempt.user)
        acct = self._users.get(attempt.user) if attempt.user_reserved else None
        if acct is not None:
            acct.unreserve(attempt.ip)
        if ok and attempt.check:
            self._succeeded(attempt.ip, attempt.user, now)
            return AuthOutcome(0.0, False, False)
        user_locked = False
        if acct is not None:
            acct.prune(now, self.lockout)
            acct.fails.append((now, attempt.ip))
            if len(acct.fails) >= self.user_max_failures and acct.locked_until <= now:
                acct.locked_until = now + self.lockout
                user_locked = True
        delay, address_locked = self._failed(addr, attempt.user, now)
        return AuthOutcome(delay, address_locked, user_locked)

    # --- direct records (no reservation) -----------------------------------------------------

    def failed(self, ip: str, user: str = "") -> tuple[float, bool]:
        """Record a failure of ``ip`` against ``user`` that was not reserved with begin()."""
        now = self._clock()
        return self._failed(self._track(self._addrs, ip, now), user, now)

    def succeeded(self, ip: str, user: str = "") -> None:
        """``ip`` logged in as ``user``: forget only that user's failures from that address
        (a login as another account must not reset the guessing at this one)."""
        self._succeeded(ip, user, self._clock())

    def _failed(self, addr: _Track, user: str, now: float) -> tuple[float, bool]:
        addr.fails.append((now, user))
        count = len(addr.fails)
        locked = count >= self.max_failures and addr.locked_until <= now
        if locked:
            addr.locked_until = now + self.lockout
        return self.delay * min(count - 1, 5), locked

    def _succeeded(self, ip: str, user: str, now: float) -> None:
        addr = self._addrs.get(ip)
        if addr is not None:
            addr.forget(user)
            self._settle_track(self._addrs, ip, now)
        acct = self._users.get(user)
        if acct is not None:
            acct.forget(ip)
            self._settle_track(self._users, user, now)
        self._known.pop((user, ip), None)
        self._known[(user, ip)] = now
        while len(self._known) > _MAX_TRACKED:
            self._known.popitem(last=False)
