"""MTA-STS policies of destination domains: the ``_mta-sts`` TXT lookup, the HTTPS fetch of
``https://mta-sts.<domain>/.well-known/mta-sts.txt``, and a cache persisted to disk, so a
restarted node keeps enforcing what it learnt (RFC 8461 5.1: a cached, unexpired policy is
used when the TXT record is gone, the point being that an attacker who strips DNS answers
must not turn enforcement off)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp.abc
import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog

from mta.delivery.mtasts import StsPolicy, StsPolicyError, is_sts_txt, parse_policy, parse_txt
from mta.durable import replace_file
from mta.logs import describe
from mta.metrics import NodeMetrics
from mta.tasks import cancel_and_wait

__all__ = ["StsFetchError", "StsPolicies", "StsSettings", "StsStore"]

log = structlog.get_logger("mta.delivery")

MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3 lets senders bound the size; 64 KiB is generous
# After a failed fetch, the same domain (and TXT id) is not fetched again for this long: a
# domain with a broken policy server must not cost a fetch per message.
_FETCH_RETRY = 60.0
# A cached policy is fetched again (in the background, while it stays in use) once it is this
# old, or half its max_age: a long-lived policy is refreshed before it can expire.
_REFRESH_AFTER = 86_400.0
_SAVE_EVERY = 1.0  # the cache file is rewritten at most this often


class StsFetchError(Exception):
    """The policy could not be fetched or did not parse (the reason in one line)."""


class StsSettings:
    """What the policies need from ``[delivery]``, re-read on reload."""

    __slots__ = ("ca_file", "port", "timeout")

    def __init__(self, port: int = 443, timeout: float = 10.0, ca_file: str = "") -> None:
        self.port = port
        self.timeout = timeout
        self.ca_file = ca_file


class StsStore:
    """The cache file: JSON ``{domain: policy}``, replaced atomically (write, fsync,
    rename, fsync the directory). Blocking: call through a thread."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, StsPolicy]:
        """The unexpired policies in the file; an unreadable or damaged file is an empty cache
        (logged), never a failed start: the cache only protects, it is not the mail."""
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("delivery.mta_sts_cache_unreadable", path=self.path,
                        error=describe(exc))
            return {}
        out: dict[str, StsPolicy] = {}
        now = time.time()
        for domain, entry in (raw.items() if isinstance(raw, dict) else ()):
            try:
                policy = StsPolicy.from_json(entry)
            except StsPolicyError:
                continue
            if policy.valid(now):
                out[str(domain)] = policy
        return out

    def save(self, policies: dict[str, StsPolicy]) -> None:
        replace_file(self.path, json.dumps({d: p.to_json() for d, p in policies.items()}
                                           ).encode())


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole body, or its first ``limit`` bytes if it is longer (``read(n)`` returns
    what has arrived so far, not n bytes)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


class _Resolver(aiohttp.abc.AbstractResolver):
    """aiohttp's host lookups through the delivery resolver (the configured nameservers),
    not the system's: the policy host is found the way the MX hosts are."""

    def __init__(self, lookup: Callable[[str], Awaitable[list[str]]]) -> None:
        self._lookup = lookup

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        addrs = await self._lookup(host)
        if not addrs:
            raise OSError(f"no address for {host}")
        return [{"hostname": host, "host": a, "port": port,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in addrs]

    async def close(self) -> None:
        return None


class StsPolicies:
    """The policy in force for each destination domain: cached, fetched when its TXT id
    changes, refreshed before it expires, persisted."""

    def __init__(self, store: StsStore, settings: StsSettings,
                 resolver: Callable[[], dns.asyncresolver.Resolver],
                 addresses: Callable[[str], Awaitable[list[str]]],
                 metrics: NodeMetrics | None = None, size: int = 100_000,
                 node_id: str = "") -> None:
        self.store = store
        self.settings = settings
        self._resolver = resolver
        self._addresses = addresses
        self._metrics = metrics
        self.size = size
        self.node_id = node_id
        self._cache: OrderedDict[str, StsPolicy] = OrderedDict()
        # (domain, TXT id) -> monotonic time before which a failed fetch is not retried;
        # oldest first, at most ``size``.
        self._failed: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._fetching: dict[str, asyncio.Task[StsPolicy | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._dirty = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the cache file and start saving changes to it."""
        loaded = await asyncio.to_thread(self.store.load)
        self._cache = OrderedDict(sorted(loaded.items(), key=lambda kv: kv[1].fetched))
        self._saver = asyncio.create_task(self._save_loop(), name="delivery:mta-sts-cache")

    async def close(self) -> None:
        """Stop fetching, write what is not saved yet, close the HTTP client."""
        await cancel_and_wait(*self._fetching.values())
        await cancel_and_wait(self._saver)
        self._saver = None
        if self._dirty.is_set():
            await self._save()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reconfigure(self, settings: StsSettings) -> None:
        """New fetch settings (reload); the cache stays. The HTTP client is rebuilt, as its
        trust store may have changed."""
        self.settings = settings
        session, self._session = self._session, None
        if session is not None:
            task = asyncio.get_running_loop().create_task(session.close())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, domain: str) -> StsPolicy | None:
        """The cached policy of ``domain``, expired or not (for the admin view and tests)."""
        return self._cache.get(domain)

    # --- the policy in force ---------------------------------------------------------------

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy to apply to mail for ``domain`` now, or None (no MTA-STS). Never
        raises: a lookup or fetch that fails falls back to the cached policy, else to none
        (RFC 8461 5.1)."""
        cached = self._cache.get(domain)
        if cached is not None and not cached.valid():
            del self._cache[domain]
            self._dirty.set()
            cached = None
        ident = await self._txt_id(domain)
        cached = self._cache.get(domain, cached)  # a fetch may have ended meanwhile
        if ident is None:
            return cached  # no record (or no answer): the cached policy still holds
        if cached is not None:
            self._cache.move_to_end(domain)  # least recently used goes first
        if cached is not None and cached.id == ident:
            if time.time() - cached.fetched > min(_REFRESH_AFTER, cached.max_age / 2):
                self._start_fetch(domain, ident)  # refreshed while it stays in use
            return cached
        # Shielded: one delivery giving up must not cancel the fetch others wait for.
        found = await asyncio.shield(self._start_fetch(domain, ident))
        return found if found is not None else cached

    async def _txt_id(self, domain: str) -> str | None:
        name = f"_mta-sts.{domain}"
        try:
            answer = await self._resolver().resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.DNSException as exc:
            log.debug("delivery.mta_sts_txt_failed", domain=domain, node_id=self.node_id,
                      error=describe(exc))
            return None
        records = [r.strings for r in answer if is_sts_txt(list(r.strings))]
        if len(records) != 1:
            if records:
                log.info("delivery.mta_sts_txt_invalid", domain=domain, node_id=self.node_id,
                         error=f"{len(records)} v=STSv1 records")
            return None
        try:
            return parse_txt(list(records[0]))
        except StsPolicyError as exc:
            log.info("delivery.mta_sts_txt_invalid", domain=domain, node_id=self.node_id,
                     error=str(exc))
            return None

    def _start_fetch(self, domain: str, ident: str) -> asyncio.Task[StsPolicy | None]:
        task = self._fetching.get(domain)
        if task is None:
            task = asyncio.create_task(self._fetch_and_keep(domain, ident),
                                       name=f"delivery:mta-sts:{domain}")
            self._fetching[domain] = task
            task.add_done_callback(lambda t: self._fetched(domain, t))
        return task

    def _fetched(self, domain: str, task: asyncio.Task[StsPolicy | None]) -> None:
        self._fetching.pop(domain, None)
        if not task.cancelled():
            task.exception()  # a refresh nobody awaits must not warn "never retrieved"

    async def _fetch_and_keep(self, domain: str, ident: str) -> StsPolicy | None:
        key = (domain, ident)
        if self._failed.get(key, 0.0) > time.monotonic():
            return None
        try:
            policy = await self.fetch(domain, ident)
        except StsFetchError as exc:
            self._failed[key] = time.monotonic() + _FETCH_RETRY
            self._failed.move_to_end(key)
            while len(self._failed) > self.size:
                self._failed.popitem(last=False)
            self._count("failed")
            log.warning("delivery.mta_sts_fetch_failed", domain=domain, node_id=self.node_id,
                        policy_id=ident, error=str(exc))
            return None
        self._failed.pop(key, None)
        self._count("fetched")
        log.info("delivery.mta_sts_policy", domain=domain, node_id=self.node_id,
                 policy_id=ident, mode=policy.mode, mx=",".join(policy.mx),
                 max_age=policy.max_age)
        self._keep(domain, policy)
        return policy

    def _keep(self, domain: str, policy: StsPolicy) -> None:
        self._cache[domain] = policy
        self._cache.move_to_end(domain)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        self._dirty.set()

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.mta_sts_fetches.labels(result).inc()

    async def fetch(self, domain: str, ident: str = "") -> StsPolicy:
        """Fetch and parse ``domain``'s policy over HTTPS (a certificate valid for
        ``mta-sts.<domain>``, status 200, no redirect, text/plain, at most 64 KiB)."""
        host = f"mta-sts.{domain}"
        port = "" if self.settings.port == 443 else f":{self.settings.port}"
        url = f"https://{host}{port}/.well-known/mta-sts.txt"
        try:
            async with self._client().get(
                    url, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.settings.timeout)) as resp:
                if resp.status != 200:
                    raise StsFetchError(f"{url}: HTTP status {resp.status}")
                ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                if ctype != "text/plain":
                    raise StsFetchError(f"{url}: media type {ctype[:40]!r}, not text/plain")
                body = await _read_at_most(resp.content, MAX_POLICY_BYTES + 1)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise StsFetchError(f"{url}: {describe(exc)}") from None
        if len(body) > MAX_POLICY_BYTES:
            raise StsFetchError(f"{url}: policy larger than {MAX_POLICY_BYTES} bytes")
        try:
            return parse_policy(body.decode("utf-8"), ident, time.time())
        except (UnicodeDecodeError, StsPolicyError) as exc:
            raise StsFetchError(f"{url}: {exc}") from None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx = ssl.create_default_context(cafile=self.settings.ca_file or None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, resolver=_Resolver(self._addresses),
                                               use_dns_cache=False, limit=50),
                headers={"User-Agent": "mta (MTA-STS)"})
        return self._session

    # --- persistence -----------------------------------------------------------------------

    async def _save_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await self._save()
            await asyncio.sleep(_SAVE_EVERY)

    async def _save(self) -> None:
        self._dirty.clear()
        snapshot = dict(self._cache)
        try:
            await asyncio.to_thread(self.store.save, snapshot)
        except OSError as exc:
            # Kept in memory; saved again with the next change.
            log.warning("delivery.mta_sts_cache_save_failed", path=self.store.path,
                        node_id=self.node_id, error=describe(exc))
