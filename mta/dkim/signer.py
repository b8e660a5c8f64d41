"""Sign a message once, at reception: pick the signing domain from the From: header (the
domain DMARC aligns with), and prepend one DKIM-Signature per configured key (two for dual
RSA and Ed25519 signing), relaxed/relaxed, over-signing the headers that matter."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import getaddresses
from typing import TYPE_CHECKING, Any

from mta.dkim import DEFAULT_HEADERS, DEFAULT_OVERSIGN
from mta.dkim.canon import HeaderField, relaxed_body, relaxed_header, split_message
from mta.dkim.errors import SigningStartError, Unsignable
from mta.dkim.keys import SigningKey, key_from_pem, load_key
from mta.dkim.pool import SigningPool
from mta.text import all_crlf

if TYPE_CHECKING:
    from mta.config import DkimConfig

__all__ = ["DomainKeys", "Signer", "Unsignable", "build_signer"]

_FOLD_AT = 72


_pools: dict[str, ThreadPoolExecutor] = {}
_LARGE = 256 * 1024  # bytes: signed in the bulk pool
_SMALL_THREADS = 2  # the small pool's threads (RSA runs outside the GIL: they add up)
_MAX_HEADER = 256 * 1024  # a header section larger than this is not signed
_MAX_FROM = 4096  # a From: field longer than this names no sender we sign for
_MAX_INSTANCES = 8  # instances of one header name signed (bottom up)
_LINE_END = re.compile(rb"\r\n|\r|\n")
# ``local@domain`` or ``Display Name <local@domain>``, ASCII, no quoting, no comments.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]"
_SIMPLE_FROM = re.compile(rf"(?:[A-Za-z0-9 !#$%&'*+/=?^_`{{|}}~.-]*<{_ATEXT}+@([A-Za-z0-9.-]+)>"
                          rf"|{_ATEXT}+@([A-Za-z0-9.-]+))")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                       r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


def build_signer(cfg: DkimConfig) -> Signer | None:
    """The signer ``[dkim]`` describes, its keys read now (None: nothing to sign with and
    nothing required). Raises DkimKeyError (the config check reads them first)."""
    if not cfg.domains and not cfg.required:
        return None
    domains = {}
    for name, entry in cfg.domains.items():
        keys = [load_key(entry.key, entry.selector, entry.algorithm)]
        if entry.dual is not None:
            keys.append(load_key(entry.dual.key, entry.dual.selector, entry.dual.algorithm))
        domains[name] = DomainKeys(tuple(keys), entry.signing_domain)
    return Signer(domains, headers=cfg.headers, oversign=cfg.oversign, expire=cfg.expire,
                  required=cfg.required, processes=signing_processes(cfg.processes))


def signing_processes(setting: int | str) -> int:
    """``[dkim] processes``: a count, or ``auto``: half the cores, at least 1 and at most 4
    (each signs about 3,000 messages a second: more than one node's event loop feeds it)."""
    if setting != "auto":
        return int(setting)
    return max(1, min(4, (os.cpu_count() or 1) // 2))


@dataclass(frozen=True)
class DomainKeys:
    """The keys one From: domain (or ``*.`` pattern) signs with, and the ``d=`` to use
    (empty: the From: domain itself)."""

    keys: tuple[SigningKey, ...]
    signing_domain: str = ""


class Signer:
    """DKIM signing by From: domain; :meth:`sign` returns the message with its signatures."""

    def __init__(self, domains: Mapping[str, DomainKeys], *,
                 headers: Sequence[str] = DEFAULT_HEADERS,
                 oversign: Iterable[str] = DEFAULT_OVERSIGN, expire: float = 0.0,
                 required: bool = False, clock: Callable[[], float] = time.time,
                 processes: int = 0) -> None:
        self.domains = {d.lower().rstrip("."): v for d, v in domains.items()}
        self.headers = tuple(h.lower() for h in headers)
        self.oversign = {h.lower() for h in oversign}
        self.expire = expire
        self.required = required
        self.clock = clock
        self.processes = processes  # 0: signed in threads of this process
        self._batches = _Batches(self.sign)
        self._h_tags: dict[tuple[int, ...], tuple[list[str], list[str]]] = {}
        self._pool: SigningPool | None = None

    def spec(self) -> dict[str, Any]:
        """What a signing process needs to build this signer (key material included: for
        this node's own child processes only)."""
        return {"headers": list(self.headers), "oversign": sorted(self.oversign),
                "expire": self.expire, "required": self.required,
                "domains": {name: [entry.signing_domain,
                                   [[k.selector, k.algorithm, k.path, k.pem()]
                                    for k in entry.keys]]
                            for name, entry in self.domains.items()}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Signer:
        """The signer :meth:`spec` describes, signing in the calling process."""
        domains = {name: DomainKeys(tuple(key_from_pem(pem, path, selector, algorithm)
                                          for selector, algorithm, path, pem in keys), d)
                   for name, (d, keys) in spec["domains"].items()}
        return cls(domains, headers=spec["headers"], oversign=spec["oversign"],
                   expire=spec["expire"], required=spec["required"])

    async def start(self) -> None:
        """Start the signing processes (when it has any); raises SigningStartError."""
        if self.processes and self._pool is None:
            self._pool = SigningPool(self.spec(), self.processes)
        if self._pool is not None:
            await self._pool.start()

    async def aclose(self) -> None:
        """End the signing processes once what they were sent is signed."""
        if self._pool is not None:
            await self._pool.aclose()

    def keys_for(self, domain: str) -> DomainKeys | None:
        """The entry for ``domain`` (an A-label name): its own, else the nearest
        ``*.parent`` pattern, else ``*``."""
        domain = domain.lower().rstrip(".")
        if (entry := self.domains.get(domain)) is not None:
            return entry
        labels = domain.split(".")
        for i in range(1, len(labels)):
            if (entry := self.domains.get("*." + ".".join(labels[i:]))) is not None:
                return entry
        return self.domains.get("*")

    def sign(self, message: bytes) -> bytes:
        """``message`` with its line endings made CRLF (what delivery sends) and its
        DKIM-Signature fields prepended; only the line endings change when its From: domain
        has no key and signing is not required."""
        signatures, message = self.signatures(message)
        return signatures + message if signatures else message

    def signatures(self, message: bytes) -> tuple[bytes, bytes]:
        """(the DKIM-Signature fields to prepend, ``message`` with CRLF line endings: the
        very object passed in when its line endings were all CRLF already)."""
        message = _crlf(message)
        head = message.find(b"\r\n\r\n")
        if head > _MAX_HEADER or (head < 0 and len(message) > _MAX_HEADER):
            # Abnormal, and costly to canonicalise: not signed (refused when required).
            if self.required:
                raise Unsignable(f"header section larger than {_MAX_HEADER // 1024} KiB: "
                                 "not signed (DKIM signing is required)", permanent=True)
            return b"", message
        fields, body = split_message(message)
        domain = _from_domain(fields)
        entry = self.keys_for(domain) if domain else None
        if entry is None:
            if not self.required:
                return b"", message
            if domain is None:
                raise Unsignable("no single From: domain to sign for (DKIM signing is "
                                 "required)", permanent=True)
            raise Unsignable(f"no DKIM key for the From: domain {_shown(domain)} (signing "
                             "is required)", permanent=True)
        d = entry.signing_domain or domain or ""
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()
        now = int(self.clock())
        try:
            signatures = [self._signature(fields, key, d, bh, now) for key in entry.keys]
        except (ValueError, TypeError) as exc:  # a key the crypto library refuses
            raise Unsignable(f"signing failed: {exc}", permanent=False) from None
        return b"".join(signatures), message

    async def sign_async(self, message: bytes) -> bytes:
        """:meth:`sign` off the event loop: an RSA signature costs as much CPU as the rest
        of a submission. In the signing processes when there are any (see SigningPool),
        else in batches to a thread pool (see _Batches). Large messages (whose body hash
        takes long) have a thread of their own, so a few of them never hold up the
        ordinary ones."""
        if len(message) > _LARGE:
            return await asyncio.get_running_loop().run_in_executor(
                _pool("bulk"), self.sign, message)
        if self.processes:
            if self._pool is None or not self._pool.started:
                try:
                    await self.start()
                except SigningStartError as exc:
                    raise Unsignable(str(exc), permanent=False) from None
            assert self._pool is not None
            return await self._pool.sign(message)
        return await self._batches.submit(message)

    def _signature(self, fields: list[HeaderField], key: SigningKey, d: str, bh: str,
                   now: int) -> bytes:
        counts = Counter(f.name.decode("latin-1") for f in fields)
        # The last few instances of a name (h= takes them bottom up): a message with a
        # million To: lines must not get a signature as large.
        present = tuple(min(counts.get(name, 0), _MAX_INSTANCES) for name in self.headers)
        names, h = self._h_tag(present)
        tags = [f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={d}; s={key.selector};",
                f"t={now};" + (f" x={now + int(self.expire)};" if self.expire else ""),
                *h, f"bh={bh};", "b="]
        unsigned = "DKIM-Signature: " + "\r\n\t".join(tags)
        data = _selected(fields, names) + relaxed_header(
            b"dkim-signature", unsigned.split(":", 1)[1].encode())
        b = base64.b64encode(key.sign(data)).decode()
        folded = "\r\n\t ".join(b[i:i + _FOLD_AT] for i in range(0, len(b), _FOLD_AT))
        return (unsigned + folded + "\r\n").encode()


    def _h_tag(self, present: tuple[int, ...]) -> tuple[list[str], list[str]]:
        """The names ``h=`` lists for a message with ``present`` instances of each signed
        header, and the tag folded: the same for most messages of a sender, so kept."""
        made = self._h_tags.get(present)
        if made is None:
            names: list[str] = []
            for name, count in zip(self.headers, present, strict=True):
                names += [name] * (count + (name in self.oversign))
            if len(self._h_tags) >= 256:
                self._h_tags.clear()
            made = self._h_tags[present] = (names, _fold_list("h=", names))
        return made


class _Batches:
    """Messages to sign, gathered over one turn of the event loop and handed to the small
    pool as one batch per thread: one hand-off and one wake-up of the loop per batch, not
    per message (under load, many sessions end DATA in the same turn)."""

    def __init__(self, sign: Callable[[bytes], bytes]) -> None:
        self._sign = sign
        self._pending: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._scheduled = False

    async def submit(self, message: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending.append((message, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        ways = min(_SMALL_THREADS, len(batch))
        for i in range(ways):
            part = batch[i::ways]
            done = _pool("small").submit(self._sign_all, [m for m, _ in part])
            done.add_done_callback(
                lambda f, part=part: loop.call_soon_threadsafe(_settle, part, f))

    def _sign_all(self, messages: list[bytes]) -> list[bytes | Exception]:
        out: list[bytes | Exception] = []
        for message in messages:
            try:
                out.append(self._sign(message))
            except Exception as exc:  # Unsignable, or a bug: that message's alone
                out.append(exc)
        return out


def _settle(part: list[tuple[bytes, asyncio.Future[bytes]]],
            done: concurrent.futures.Future[list[bytes | Exception]]) -> None:
    try:
        results = done.result()
    except Exception as exc:  # the pool refused the work (shutting down)
        results = [exc] * len(part)
    for (_, future), result in zip(part, results, strict=True):
        if future.done():  # its session went away meanwhile
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


def _selected(fields: list[HeaderField], names: list[str]) -> bytes:
    """The canonical headers ``h=`` names, each name taking its instances bottom up (a name
    listed more often than present adds nothing: over-signing)."""
    by_name: dict[bytes, list[HeaderField]] = {}
    for f in fields:
        by_name.setdefault(f.name, []).append(f)
    out = []
    for name in names:
        stack = by_name.get(name.encode())
        if stack:
            f = stack.pop()
            out.append(relaxed_header(f.name, f.raw.split(b":", 1)[1]) + b"\r\n")
    return b"".join(out)


def _fold_list(tag: str, names: list[str]) -> list[str]:
    """``h=a:b:...;`` split over lines of at most about 72 characters."""
    lines, line = [], tag
    for i, name in enumerate(names):
        piece = name + (":" if i < len(names) - 1 else ";")
        if len(line) + len(piece) > _FOLD_AT and line != tag:
            lines.append(line)
            line = " "
        line += piece
    lines.append(line if names else tag + ";")
    return lines


def _from_domain(fields: list[HeaderField]) -> str | None:
    """The one domain of the From: header's addresses, as an A-label name; None when there
    is no From:, more than one, its addresses name different domains (nothing DMARC could
    align), it is not a domain name, or the header is too long to be a sender's."""
    froms = [f for f in fields if f.name == b"from"]
    if len(froms) != 1 or len(froms[0].raw) > _MAX_FROM:
        return None
    value = froms[0].value().decode("utf-8", "replace")
    if simple := _SIMPLE_FROM.fullmatch(value):
        # The common form, read without the stdlib's address parser (a twentieth of the
        # signing process's time): the same answer, tested against it.
        domain = (simple[1] or simple[2]).lower().rstrip(".")
        return domain if _HOSTNAME.fullmatch(domain) else None
    return _parsed_from_domain(value)


def _parsed_from_domain(value: str) -> str | None:
    """:func:`_from_domain` of any From: value, by the stdlib's address parser."""
    try:
        domains = {addr.rpartition("@")[2].strip().lower().rstrip(".")
                   for _, addr in getaddresses([value]) if "@" in addr}
    except (RecursionError, ValueError, IndexError):  # the stdlib parser on odd input
        return None
    if len(domains) != 1:
        return None
    try:
        domain = domains.pop().encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return domain if _HOSTNAME.fullmatch(domain) else None


def _crlf(message: bytes) -> bytes:
    """Bare CR and bare LF made CRLF, as delivery sends them (the bytes signed must be
    the bytes that arrive)."""
    return message if all_crlf(message) else _LINE_END.sub(b"\r\n", message)


def _pool(kind: str) -> ThreadPoolExecutor:
    pool = _pools.get(kind)
    if pool is None:
        pool = _pools[kind] = ThreadPoolExecutor(_SMALL_THREADS if kind == "small" else 1,
                                                 thread_name_prefix=f"dkim-{kind}")
    return pool


def _shown(domain: str) -> str:
    """``domain`` fit for an SMTP reply and a log line: printable ASCII, 100 at most."""
    text = domain.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else "?" for c in text)[:100]
