"""Every accounting record, POSTed to ``[events] url`` in batches, at least once; and each
tenant's records to its own ``[tenants."<name>"] events_url`` too.

The accounting log is the source (it says exactly what the spool says, see
:mod:`mta.accounting`); a cursor on disk (the file's identity and the offset of the first
record not yet acknowledged by the receiver) is moved only after a 2xx, and written with
fsync. So nothing is lost across a restart or a kill -9, and what is sent twice carries the
same ``event_id`` (a digest of the record's bytes) for the receiver to drop.

The body is ``{"node": ..., "events": [record, ...]}``, each record the accounting line's JSON
plus ``event_id``; ``X-MTA-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">``
with the shared secret (as Stripe signs its webhooks: the receiver recomputes it, compares in
constant time and refuses an old ``t``).

A destination is one :class:`EventShipper`: the global webhook takes every record; a tenant's
takes the records whose ``tenant`` is that tenant, signed with its ``events_secret`` (else
``[events] secret``), from a cursor of its own (``<cursor>.<tenant>``), so a receiver that is
down holds up nobody else's. Its cursor moves past other tenants' records along with its own
acknowledged ones, or, when a read holds none of its records, without a POST.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import time
from typing import NamedTuple

import aiohttp
import structlog
from prometheus_client import Counter, Gauge

from mta.config import Config, EventsConfig, Secret
from mta.durable import replace_file
from mta.logs import describe
from mta.metrics import NodeMetrics

__all__ = ["EventCursor", "EventShipper", "event_id", "shippers", "signature"]

log = structlog.get_logger("mta.events")

_READ = 1 << 20  # bytes read from the log at a time
_IDLE = 0.2  # seconds between looks at the log when everything was sent


def event_id(line: bytes) -> str:
    """A record's stable id: the same bytes (a record sent again) give the same id."""
    return hashlib.sha256(line).hexdigest()[:32]


def signature(secret: bytes, body: bytes, at: int) -> str:
    """The ``X-MTA-Signature`` value of ``body`` sent at ``at`` (unix seconds)."""
    mac = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


class EventCursor:
    """Where shipping stands: ``{"ident": "dev:ino", "offset": N}`` in a small file, replaced
    atomically with fsync. Blocking: call through a thread."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> tuple[str, int]:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
            return str(raw["ident"]), int(raw["offset"])
        except FileNotFoundError:
            return "", 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("events.cursor_unreadable", path=self.path, error=describe(exc))
            return "", 0

    def save(self, ident: str, offset: int) -> None:
        replace_file(self.path, json.dumps({"ident": ident, "offset": offset}).encode())


class _Log:
    """The accounting log, read from an offset by whole lines (the writer appends; this
    reader follows the inode it opened, as the writer keeps its file across a rename)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.ident = ""

    def open(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        st = os.fstat(self.fd)
        self.ident = f"{st.st_dev}:{st.st_ino}"
        return True

    def read(self, offset: int, limit: int | None) -> list[bytes]:
        """Up to ``limit`` (None: all) whole lines from ``offset`` of one read (a torn last
        line waits)."""
        assert self.fd is not None
        size = _READ
        while True:
            data = os.pread(self.fd, size, offset)
            if b"\n" in data or len(data) < size:
                break
            size *= 2  # one record longer than a read (a message with many recipients)
        lines = data.split(b"\n")[:-1]  # the last piece has no newline yet
        return [line + b"\n" for line in lines[:limit]]

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd is not None else 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Series(NamedTuple):
    """One destination's series of the event metrics (label ``target``)."""

    sent: Counter
    failures: Counter
    backlog: Gauge
    last_success: Gauge

    @classmethod
    def of(cls, metrics: NodeMetrics, target: str) -> _Series:
        # Made at the start: each series exists (at 0) before its first event.
        return cls(metrics.events_sent.labels(target), metrics.events_failures.labels(target),
                   metrics.events_backlog.labels(target),
                   metrics.events_last_success.labels(target))


def shippers(cfg: Config, node_id: str, metrics: NodeMetrics | None = None
             ) -> list[EventShipper]:
    """One shipper per destination: ``[events] url`` (every record) if set, and each tenant
    with an ``events_url`` (its records only)."""
    log_path = cfg.delivery.accounting_log
    out = [EventShipper(cfg.events, log_path, node_id, metrics)] if cfg.events.url else []
    for name, tenant in sorted(cfg.tenants.names.items()):
        if tenant.events_url:
            out.append(EventShipper(cfg.events, log_path, node_id, metrics, tenant=name,
                                    url=tenant.events_url, secret=tenant.events_secret))
    return out


class EventShipper:
    """Tails the accounting log and POSTs what the receiver has not acknowledged yet.

    ``tenant`` empty: every record, to ``[events] url`` with ``[events] secret``. Else that
    tenant's records only, to ``url`` with ``secret`` (default ``[events] secret``), from the
    cursor ``<[events] cursor>.<tenant>``. ``target`` (the metrics' label): ``all`` or
    ``tenant:<name>``."""

    def __init__(self, cfg: EventsConfig, accounting_log: str, node_id: str,
                 metrics: NodeMetrics | None = None, *, tenant: str = "", url: str = "",
                 secret: Secret | None = None) -> None:
        self.cfg = cfg
        self.tenant = tenant
        self.url = url or cfg.url
        secret = secret if secret is not None else cfg.secret
        assert self.url and secret is not None
        assert not tenant or url, "a tenant's webhook has its own url"
        self.node_id = node_id
        self.target = f"tenant:{tenant}" if tenant else "all"
        self._secret = secret.reveal()
        self._log = _Log(accounting_log)
        cursor = cfg.cursor or f"{accounting_log}.events-cursor"
        self.cursor = EventCursor(f"{cursor}.{tenant}" if tenant else cursor)
        # The global webhook takes batch_size lines at a time; a tenant's looks through what
        # one read of the log holds for up to batch_size of its records.
        self._scan: int | None = None if tenant else cfg.batch_size
        self._metrics = None if metrics is None else _Series.of(metrics, self.target)
        self.offset = 0
        self.sent = 0  # events acknowledged since start

    def backlog(self) -> int:
        """Bytes of the log not acknowledged (nor passed over) yet."""
        return max(0, self._log.size() - self.offset)

    async def run(self) -> None:
        """Ship for ever (a supervised loop: cancel it to stop; the cursor is always on
        disk, so nothing is owed at a stop)."""
        while not await asyncio.to_thread(self._log.open):
            await asyncio.sleep(_IDLE)  # no accounting log yet
        try:
            ident, offset = await asyncio.to_thread(self.cursor.load)
            if ident and ident != self._log.ident:
                # Another file than the one the cursor was for (rotated while stopped):
                # its unsent tail is not here to read.
                log.warning("events.log_replaced", node_id=self.node_id, target=self.target,
                            path=self._log.path, skipped_from=offset)
                offset = 0
            self.offset = min(offset, self._log.size()) if ident else 0
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                    headers={"User-Agent": "mta (events)"}) as session:
                await self._ship(session)
        finally:
            self._log.close()

    async def _ship(self, session: aiohttp.ClientSession) -> None:
        failures = 0
        while True:
            body, count, used = await asyncio.to_thread(self._next_batch)
            self._gauge()
            if not used:
                await asyncio.sleep(_IDLE)
                continue
            if body is not None:
                try:
                    await self._post(session, body)
                except _PostFailed as exc:
                    failures += 1
                    wait = min(self.cfg.retry_max, 0.5 * 2 ** min(failures, 16))
                    wait *= random.uniform(0.8, 1.2)
                    if self._metrics is not None:
                        self._metrics.failures.inc()
                    log.warning("events.post_failed", node_id=self.node_id,
                                target=self.target, url=self.url, error=str(exc),
                                events=count, retry_in=round(wait, 2), failures=failures)
                    await asyncio.sleep(wait)
                    continue
                failures = 0
            # Acknowledged, or nothing of this destination's in what was read.
            self.offset += used
            await asyncio.to_thread(self.cursor.save, self._log.ident, self.offset)
            if body is not None:
                self.sent += count
                if self._metrics is not None:
                    self._metrics.sent.inc(count)
                    self._metrics.last_success.set(time.time())

    def _next_batch(self) -> tuple[bytes | None, int, int]:
        """Blocking: the next POST's body (None: no record of this destination's in what was
        read), how many events it holds and how many bytes of the log it accounts for (0:
        nothing new). Those bytes end at the batch's last record, or at the end of the read
        when it holds fewer than batch_size of them."""
        events: list[dict[str, object]] = []
        used = 0
        for line in self._log.read(self.offset, self._scan):
            if len(events) == self.cfg.batch_size:
                break
            used += len(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a record (cannot happen unless the file was edited)
            if isinstance(record, dict) and (not self.tenant
                                             or record.get("tenant") == self.tenant):
                record["event_id"] = event_id(line)
                events.append(record)
        if not events:
            return None, 0, used
        body = json.dumps({"node": self.node_id, "events": events},
                          ensure_ascii=False, separators=(",", ":")).encode()
        return body, len(events), used

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> None:
        headers = {"Content-Type": "application/json",
                   "X-MTA-Signature": signature(self._secret, body, int(time.time()))}
        try:
            async with session.post(self.url, data=body, headers=headers,
                                    allow_redirects=False) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise _PostFailed(f"HTTP status {resp.status}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _PostFailed(describe(exc)) from None

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.backlog.set(self.backlog())


class _PostFailed(Exception):
    """The receiver did not acknowledge the batch (the reason in one line)."""
