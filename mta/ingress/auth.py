"""SMTP AUTH users: a file of scrypt hashes, never plain passwords.

File format, one user per line (``#`` starts a comment)::

    alice:$scrypt$ln=14,r=8,p=1$<salt base64>$<hash base64>

Make a line with ``mtactl passwd alice``. Hashing is deliberately slow, so verification runs
in a worker thread, and successes are cached (keyed by an HMAC with a per-process key, so the
cache never holds a password) to keep AUTH on every connection cheap.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["UsersFile", "UsersFileError", "hash_password"]

_LINE_RE = re.compile(
    r"^(?P<user>[^:\s]+):\$scrypt\$ln=(?P<ln>\d+),r=(?P<r>\d+),p=(?P<p>\d+)"
    r"\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<hash>[A-Za-z0-9+/=]+)"
    # Optionally the tenant the user sends for (see [tenants]).
    r"(?::(?P<tenant>[A-Za-z0-9][A-Za-z0-9._-]{0,63}))?$"
)


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line; the message names file and line."""


@dataclass(frozen=True, slots=True)
class _Hash:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _scrypt(password: bytes, ln: int, r: int, p: int, salt: bytes, dklen: int) -> bytes:
    n = 1 << ln
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=256 * n * r * p + (1 << 20))


def hash_password(password: str, ln: int = 14, r: int = 8, p: int = 1) -> str:
    """The ``$scrypt$...`` string to put after ``user:`` in the users file."""
    salt = os.urandom(16)
    digest = _scrypt(password.encode(), ln, r, p, salt, 32)
    return (f"$scrypt$ln={ln},r={r},p={p}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


class UsersFile:
    """Users allowed to AUTH, loaded from a file."""

    _CACHE_SIZE = 4096

    def __init__(self, users: dict[str, _Hash], source: str = "",
                 tenants: dict[str, str] | None = None) -> None:
        self._users = users
        self._tenants = tenants or {}
        self.source = source
        self._key = os.urandom(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()

    @classmethod
    def load(cls, path: str) -> UsersFile:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except OSError as exc:
            raise UsersFileError(f"{path}: cannot read users file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsersFileError(f"{path}: users file is not UTF-8 text") from None
        users: dict[str, _Hash] = {}
        tenants: dict[str, str] = {}
        for lineno, raw_line in enumerate(lines, 1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE_RE.match(line)
            if not m:
                raise UsersFileError(
                    f"{path}:{lineno}: expected 'user:$scrypt$ln=N,r=N,p=N$salt$hash' "
                    "or the same and ':tenant' "
                    "(make one with 'mtactl passwd USER')"
                )
            try:
                users[m["user"]] = _Hash(int(m["ln"]), int(m["r"]), int(m["p"]),
                                         base64.b64decode(m["salt"]), base64.b64decode(m["hash"]))
            except ValueError:
                raise UsersFileError(f"{path}:{lineno}: salt or hash is not base64") from None
            if m["tenant"]:
                tenants[m["user"]] = m["tenant"]
        return cls(users, path, tenants)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        return user in self._users

    def tenant_of(self, user: str) -> str:
        """The tenant ``user`` sends for (the users file's third field), or ""."""
        return self._tenants.get(user, "")

    def _cache_key(self, user: str, password: bytes) -> bytes:
        return hmac.new(self._key, user.encode() + b"\0" + password, hashlib.sha256).digest()

    def _verify_blocking(self, user: str, password: bytes) -> bool:
        entry = self._users.get(user)
        if entry is None:
            # Spend the same time as a real check so user names cannot be probed by timing.
            _scrypt(password, 14, 8, 1, b"\0" * 16, 32)
            return False
        digest = _scrypt(password, entry.ln, entry.r, entry.p, entry.salt, len(entry.digest))
        return hmac.compare_digest(digest, entry.digest)

    async def verify(self, user: str, password: bytes) -> bool:
        """True if ``password`` is ``user``'s; never blocks the event loop on hashing."""
        key = self._cache_key(user, password)
        if key in self._ok:
            self._ok.move_to_end(key)
            return True
        ok = await asyncio.to_thread(self._verify_blocking, user, password)
        if ok:
            self._ok[key] = None
            if len(self._ok) > self._CACHE_SIZE:
                self._ok.popitem(last=False)
        return ok

    async def burn(self, user: str, password: bytes) -> None:
        """Spend exactly what :meth:`verify` would on a miss, and learn nothing: the answer
        to a password that must not be checked takes as long as a real check."""
        await asyncio.to_thread(self._verify_blocking, user, password)
