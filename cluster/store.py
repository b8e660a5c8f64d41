"""The cluster store: what the coordinator reads and writes, and etcd behind it.

The coordinator decides; this module only stores. It holds the call deadlines
(:class:`Timing`), an immutable :class:`Snapshot` decoded from one read of the prefix, the
transactions as plain data (built here once, run alike by :class:`EtcdStore` and by
:class:`cluster.memstore.MemStore`), the :class:`Store` protocol the coordinator is written
against, and :class:`EtcdStore`, the etcd implementation with its endpoint rotation. The key
layout is :mod:`cluster.keys`.

Every call is abandoned, not awaited, at its deadline: a hung gRPC call must never hold the
caller past the moment the lease stops being provably ours (the fence deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

# gRPC's C core (read when grpc loads, here in a node) writes its own stderr line for every
# failed TLS handshake, at INFO; the node's log and start error say it once, in one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import aetcd
import grpc
import msgpack
import structlog
from aetcd import exceptions as etcd_errors
from aetcd import rpc, watcher

from cluster.keys import Keys
from mta.config import ClusterConfig, Secret, parse_rate
from mta.coordinator import RuntimeSettings
from mta.logs import describe
from mta.replication.insync import SyncRecord

__all__ = [
    "Compare",
    "Delete",
    "Entry",
    "EtcdAccess",
    "EtcdClient",
    "EtcdRefused",
    "EtcdStore",
    "Get",
    "LeaseLeft",
    "Owner",
    "Put",
    "Snapshot",
    "Store",
    "StoreDown",
    "Timing",
    "Transactions",
    "Txn",
    "TxnResult",
    "decode",
    "decode_replicas",
    "decode_sync",
    "encode_replicas",
    "split_endpoint",
]

log = structlog.get_logger("cluster")

Deadline = Callable[[], float | None]


class StoreDown(Exception):
    """The store did not answer (or refused): callers retry or fence."""


@dataclass(frozen=True)
class Timing:
    """Every interval and call deadline that follows from the lease TTL."""

    ttl: float

    @property
    def fence_after(self) -> float:
        """Fence this long after the last successful refresh was sent: TTL minus a margin,
        well before etcd could give our keys away."""
        return max(self.ttl * 0.6, self.ttl - max(1.0, self.ttl / 4))

    @property
    def call_timeout(self) -> float:
        """The longest any store call may take (less once the fence deadline is nearer)."""
        return max(0.5, self.ttl / 3)

    @property
    def refresh_interval(self) -> float:
        """Pause between successful lease refreshes."""
        return self.ttl / 6

    @property
    def refresh_timeout(self) -> float:
        """A refresh is abandoned this soon, so that once one is due, it and two retries on
        other endpoints all fit before the fence: a slow or silent endpoint (or a loaded
        CPU) costs one retry, not the lease."""
        return max(0.1, (self.fence_after - self.refresh_interval) / 3)

    @property
    def grant_ttl(self) -> int:
        """The TTL asked of etcd (whole seconds)."""
        return int(max(1, round(self.ttl)))


def budget(base: float, deadline: Deadline) -> float:
    """``base``, cut to the time left before ``deadline()`` (None: no deadline)."""
    until = deadline()
    return base if until is None else min(base, until - time.monotonic())


# --- transactions as data ------------------------------------------------------------------


@dataclass(frozen=True)
class Compare:
    """One compare of a transaction: the key's create or mod revision, or its value."""

    key: bytes
    target: Literal["create", "mod", "value"]
    expect: int | bytes

    @classmethod
    def absent(cls, key: bytes) -> Compare:
        """True when ``key`` does not exist."""
        return cls(key, "create", 0)

    @classmethod
    def created_at(cls, key: bytes, revision: int) -> Compare:
        """True when ``key`` is the one created at ``revision``."""
        return cls(key, "create", revision)

    @classmethod
    def modified_at(cls, key: bytes, revision: int) -> Compare:
        """True when ``key`` was last written at ``revision`` (0: absent)."""
        return cls(key, "mod", revision)

    @classmethod
    def equals(cls, key: bytes, value: bytes) -> Compare:
        """True when ``key`` exists and holds ``value``."""
        return cls(key, "value", value)


@dataclass(frozen=True)
class Put:
    """Write ``value`` at ``key`` (on ``lease``, if given)."""

    key: bytes
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    """Delete ``key``."""

    key: bytes


@dataclass(frozen=True)
class Get:
    """Read ``key`` within the transaction."""

    key: bytes


Op = Put | Delete | Get


@dataclass(frozen=True)
class Txn:
    """If every compare holds, run ``success``, else ``failure``; atomically."""

    compare: tuple[Compare, ...] = ()
    success: tuple[Op, ...] = ()
    failure: tuple[Op, ...] = ()


@dataclass(frozen=True)
class Entry:
    """One key as the store holds it."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0  # the lease the key lives on; 0: none


@dataclass(frozen=True)
class LeaseLeft:
    """A lease's remaining time (etcd counts whole seconds) and the TTL it was granted."""

    left: float
    granted: float

    @property
    def expiring(self) -> bool:
        """Not refreshed for over a third of its TTL: a live holder refreshes every sixth,
        so it has most likely stopped (killed, paused, cut off) and its keys will go. etcd
        floors the seconds left, so the time truly left is under ``left + 1``."""
        return self.left + 1 < self.granted * 2 / 3


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, and one entry (None: absent) per Get of the branch run."""

    succeeded: bool
    gets: tuple[Entry | None, ...] = ()


class Transactions:
    """Every write the cluster makes, as transactions over :class:`Keys`: one definition for
    every store, so etcd and the in-memory store run exactly the same compares."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def owner_guard(self, shard: int, node: str, revision: int) -> tuple[Compare, ...]:
        """Holds while ``node``'s owner key of ``shard`` is still the one created at
        ``revision``: the guard of every write an owner makes about its shard."""
        key = self.keys.owner(shard)
        return (Compare.created_at(key, revision), Compare.equals(key, node.encode()))

    def guarded_by_owner(self, shard: int, node: str, revision: int, ops: Iterable[Op],
                         *also: Compare) -> Txn:
        """``ops`` only while ``node`` still owns ``shard`` under the key made at ``revision``
        (and ``also`` holds)."""
        return Txn((*self.owner_guard(shard, node, revision), *also), tuple(ops))

    def claim(self, shard: int, node: str, lease: int) -> Txn:
        """Create the owner key of ``shard`` on ``lease`` if nobody holds it; read it back
        (its create revision makes the fencing token)."""
        key = self.keys.owner(shard)
        return Txn((Compare.absent(key),), (Put(key, node.encode(), lease), Get(key)))

    def read_token_base(self, shard: int, node: str, revision: int) -> Txn:
        """The token base, read only while our owner key of ``shard`` is the one made at
        ``revision``: a node that lost its key must not learn a newer base."""
        return self.guarded_by_owner(shard, node, revision, (Get(self.keys.token_base),))

    def raise_token_base(self, shard: int, node: str, revision: int, expect_mod: int,
                         base: int) -> Txn:
        """Set the token base to ``base`` if nobody wrote it since ``expect_mod`` (0: never)
        and our owner key still holds."""
        key = self.keys.token_base
        return self.guarded_by_owner(shard, node, revision, (Put(key, str(base).encode()),),
                                     Compare.modified_at(key, expect_mod))

    def release(self, shard: int, node: str, revision: int | None = None) -> Txn:
        """Delete ``node``'s owner key of ``shard`` (only the one created at ``revision``,
        if given): never someone else's."""
        key = self.keys.owner(shard)
        same = [Compare.equals(key, node.encode())]
        if revision is not None:
            same.append(Compare.created_at(key, revision))
        return Txn(tuple(same), (Delete(key),))

    def elect(self, node: str, lease: int) -> Txn:
        """Become leader if there is none."""
        key = self.keys.leader
        return Txn((Compare.absent(key),), (Put(key, node.encode(), lease),))

    def assign(self, leader: str, changes: Mapping[int, str],
               followers: Mapping[int, Sequence[str]] | None = None) -> Txn:
        """Write assignment ``changes`` (and follower placement changes, replicated spool)
        only while ``leader`` still leads: one transaction, so an owner and its followers
        are never seen from two different decisions."""
        ops = [Put(self.keys.assign(s), n.encode()) for s, n in changes.items()]
        ops += [Put(self.keys.replicas(s), encode_replicas(f))
                for s, f in (followers or {}).items()]
        return Txn((Compare.equals(self.keys.leader, leader.encode()),), tuple(ops))

    def read_replication(self, shard: int, node: str, revision: int) -> Txn:
        """``sync/<shard>`` and ``replicas/<shard>``, read only while our owner key of
        ``shard`` is the one made at ``revision`` (a claimer that lost it learns nothing)."""
        return self.guarded_by_owner(shard, node, revision,
                                     (Get(self.keys.sync(shard)), Get(self.keys.replicas(shard))))

    def write_sync(self, shard: int, node: str, revision: int, expect: bytes | None,
                   new: SyncRecord) -> Txn:
        """Replace the in-sync record of ``shard`` by ``new`` while our owner key is the one
        made at ``revision`` and the record is exactly ``expect`` (None: absent). Value, not
        mod revision: each owner's records carry its own token, so a record equal to the one
        we read can only be that one, and the caller (the owner, as change_sync) holds the
        record it proposed from, not its revision."""
        key = self.keys.sync(shard)
        same = Compare.absent(key) if expect is None else Compare.equals(key, expect)
        return self.guarded_by_owner(shard, node, revision, (Put(key, new.encode()),), same)

    def record_shard_count(self, shards: int) -> Txn:
        """Record the cluster's shard count unless one is recorded already."""
        key = self.keys.shards
        return Txn((Compare.absent(key),), (Put(key, str(shards).encode()),))

    def register(self, node: str, info: Mapping[str, Any], lease: int) -> Txn:
        """Announce ``node`` (on its lease)."""
        return Txn((), (Put(self.keys.node(node), msgpack.packb(dict(info)), lease),))

    def drain(self, node: str, draining: bool) -> Txn:
        """Mark ``node`` drained, or back in service."""
        key = self.keys.drain(node)
        return Txn((), (Put(key, b"1") if draining else Delete(key),))

    def request_rebalance(self, node: str) -> Txn:
        """Ask the leader to recompute the assignment."""
        return Txn((), (Put(self.keys.rebalance, node.encode()),))

    def clear_rebalance(self) -> Txn:
        """The leader acted on the rebalance request."""
        return Txn((), (Delete(self.keys.rebalance),))

    def runtime(self, throttles: Mapping[str, float | None],
                suspended: Mapping[str, bool]) -> Txn:
        """Set (rate) or clear (None) throttles, suspend (True) or resume domains: one key
        per change, so changes to other keys are never undone."""
        ops: list[Op] = []
        for name, rate in throttles.items():
            k = self.keys.throttle(name)
            ops.append(Delete(k) if rate is None else Put(k, f"{rate * 3600:g}/h".encode()))
        for domain, hold in suspended.items():
            k = self.keys.suspend(domain)
            ops.append(Put(k, b"1") if hold else Delete(k))
        return Txn((), tuple(ops))


# --- the snapshot --------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """The owner key of a shard: its node, and the revision that created it."""

    node: str
    revision: int


def _frozen(d: dict[Any, Any] | None = None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Snapshot:
    """The cluster as one read of the prefix showed it, at ``revision``."""

    revision: int = 0
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=_frozen)
    leader: str | None = None
    assignment: Mapping[int, str] = field(default_factory=_frozen)
    owners: Mapping[int, Owner] = field(default_factory=_frozen)
    token_base: int = 0
    draining: frozenset[str] = frozenset()
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    shard_count: int | None = None  # None: not recorded yet; 0: unreadable
    rebalance: bool = False
    member_leases: Mapping[str, int] = field(default_factory=_frozen)  # node -> its lease
    # Replicated spool: shard -> its in-sync record (one that does not decode has no
    # members: nobody is promoted from it), and shard -> the followers the leader placed.
    sync: Mapping[int, SyncRecord] = field(default_factory=_frozen)
    replicas: Mapping[int, tuple[str, ...]] = field(default_factory=_frozen)

    def token(self, shard: int) -> int:
        """The fencing token the owner of ``shard`` claimed with (unless the base rose since);
        0 if unowned."""
        owner = self.owners.get(shard)
        return self.token_base + owner.revision if owner is not None else 0

    def owned_per_node(self) -> dict[str, int]:
        """How many shards each node owns."""
        out: dict[str, int] = {}
        for owner in self.owners.values():
            out[owner.node] = out.get(owner.node, 0) + 1
        return dict(sorted(out.items()))

    def weights(self) -> dict[str, float]:
        """Members in service (not drained), with their weights: what the assignment spreads
        the shards over."""
        return {n: float(info.get("weight", 1.0)) for n, info in self.members.items()
                if n not in self.draining}

    def converged(self, total: int) -> bool:
        """Every shard assigned, and owned by the node it is assigned to."""
        return (not self.rebalance and len(self.assignment) == total
                and all((o := self.owners.get(s)) is not None and o.node == n
                        for s, n in self.assignment.items()))


class _Draft:
    """A snapshot being decoded (mutable until frozen)."""

    def __init__(self) -> None:
        self.members: dict[str, Mapping[str, Any]] = {}
        self.leader: str | None = None
        self.assignment: dict[int, str] = {}
        self.owners: dict[int, Owner] = {}
        self.token_base = 0
        self.draining: set[str] = set()
        self.throttles: dict[str, float] = {}
        self.suspended: set[str] = set()
        self.shard_count: int | None = None
        self.rebalance = False
        self.member_leases: dict[str, int] = {}
        self.sync: dict[int, SyncRecord] = {}
        self.replicas: dict[int, tuple[str, ...]] = {}

    def freeze(self, revision: int) -> Snapshot:
        return Snapshot(revision, _frozen(self.members), self.leader, _frozen(self.assignment),
                        _frozen(self.owners), self.token_base, frozenset(self.draining),
                        RuntimeSettings(self.throttles, frozenset(self.suspended)),
                        self.shard_count, self.rebalance, _frozen(self.member_leases),
                        _frozen(self.sync), _frozen(self.replicas))


def _members(d: _Draft, rest: str, e: Entry) -> None:
    d.members[rest] = MappingProxyType(msgpack.unpackb(e.value))
    if e.lease:
        d.member_leases[rest] = e.lease


def _assign(d: _Draft, rest: str, e: Entry) -> None:
    d.assignment[int(rest)] = e.value.decode()


def _owner(d: _Draft, rest: str, e: Entry) -> None:
    d.owners[int(rest)] = Owner(e.value.decode(), e.create_revision)


def _sync(d: _Draft, rest: str, e: Entry) -> None:
    d.sync[int(rest)] = decode_sync(e.value, int(rest))


def _replicas(d: _Draft, rest: str, e: Entry) -> None:
    d.replicas[int(rest)] = decode_replicas(e.value)


def _drain(d: _Draft, rest: str, e: Entry) -> None:
    d.draining.add(rest)


def _config(d: _Draft, rest: str, e: Entry) -> None:
    kind, _, name = rest.partition("/")
    if kind == "throttle":
        d.throttles[name] = parse_rate(e.value.decode())
    elif kind == "suspend":
        d.suspended.add(name)


def _leader(d: _Draft, e: Entry) -> None:
    d.leader = e.value.decode()


def _rebalance(d: _Draft, e: Entry) -> None:
    d.rebalance = True


def _token_base(d: _Draft, e: Entry) -> None:
    d.token_base = int(e.value)


def _shards(d: _Draft, e: Entry) -> None:
    d.shard_count = int(e.value) if e.value.isdigit() else 0


# ``<kind>/<rest>`` keys, and single keys, each with its decoder.
_BY_KIND: dict[str, Callable[[_Draft, str, Entry], None]] = {
    "nodes": _members, "assign": _assign, "owner": _owner, "drain": _drain, "config": _config,
    "sync": _sync, "replicas": _replicas}
_SINGLE: dict[str, Callable[[_Draft, Entry], None]] = {
    "leader": _leader, "rebalance": _rebalance, "token_base": _token_base, "shards": _shards}


def decode(keys: Keys, revision: int, entries: Iterable[Entry]) -> Snapshot:
    """The snapshot of every key under ``keys.prefix`` (read at ``revision``). A key that
    does not decode is logged and left out."""
    draft = _Draft()
    for entry in entries:
        key = keys.relative(entry.key)
        kind, _, rest = key.partition("/")
        try:
            if rest and kind in _BY_KIND:
                _BY_KIND[kind](draft, rest, entry)
            elif key in _SINGLE:
                _SINGLE[key](draft, entry)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("cluster.bad_key", key=key, error=describe(exc))
    return draft.freeze(revision)


def decode_sync(raw: bytes, shard: int) -> SyncRecord:
    """The in-sync record stored for ``shard``. One that does not decode is logged and read
    as a record with no members: the shard stays replicated (not "never replicated", which
    anyone may take) and nobody is promoted from a record nobody can read."""
    try:
        return SyncRecord.decode(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.error("cluster.bad_sync_record", shard=shard, error=describe(exc),
                  value=raw[:200].decode(errors="replace"))
        return SyncRecord(0, "", {})


def encode_replicas(followers: Sequence[str]) -> bytes:
    """The value of ``replicas/<shard>``."""
    return json.dumps(list(followers), separators=(",", ":")).encode()


def decode_replicas(raw: bytes) -> tuple[str, ...]:
    """The followers stored in ``replicas/<shard>``; ValueError if it is not a list of ids."""
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError("replicas: expected a JSON list of node ids")
    return tuple(value)


# --- the protocol ----------------------------------------------------------------------------


class Store(Protocol):
    """What the coordinator needs of the store. Every call raises :class:`StoreDown` when
    the store does not answer in time (the deadline is the store's, see :class:`Timing`)."""

    keys: Keys

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""

    async def refresh(self, lease: int) -> int | None:
        """Refresh ``lease`` (under the short refresh deadline): the TTL etcd now counts
        (<= 0: the lease is gone), or None when the answer had no TTL in it."""

    async def revoke(self, lease: int, timeout: float) -> None:
        """Revoke ``lease``: its keys go at once."""

    async def lease_left(self, lease: int) -> LeaseLeft | None:
        """How long ``lease`` has left unless refreshed, and its granted TTL; None when it is
        gone."""

    async def snapshot(self) -> Snapshot:
        """One consistent read of the whole prefix."""

    async def commit(self, txn: Txn) -> TxnResult:
        """Run ``txn`` atomically."""

    def changes(self, start: int) -> AsyncIterator[None]:
        """Yields once per change under the prefix from revision ``start`` on (0: from now);
        only a trigger to read sooner, never the source of truth."""

    async def close(self) -> None:
        """Drop the connection (without waiting for a hung one)."""


# --- etcd --------------------------------------------------------------------------------------


class EtcdRefused(RuntimeError):
    """etcd turned this node away in a way retrying does not mend (a wrong password, a
    certificate one side does not trust) before it was ever reached: a configuration problem,
    reported at start (the node's "[cluster] etcd: ..." line) instead of retried."""


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd beyond ``host:port``: TLS (PEM bytes, read once at start; no CA:
    the system's) and etcd's own user. The default is plain gRPC without a user."""

    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: Secret | None = None
    username: str = ""
    password: Secret | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            # gRPC aborts the process on a certificate without its key.
            raise ValueError("an etcd client certificate and its key go together")

    @classmethod
    def from_config(cls, cluster: ClusterConfig) -> EtcdAccess:
        """The ``[cluster]`` etcd keys, their files read (the config checked them)."""

        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as fh:
                return fh.read()

        key = read(cluster.etcd_key)
        return cls(cluster.etcd_tls, read(cluster.etcd_ca), read(cluster.etcd_cert),
                   None if key is None else Secret(key), cluster.etcd_username,
                   cluster.etcd_password)

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC TLS credentials: etcd's CA, and our client certificate if any."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, certificate_chain=self.cert,
            private_key=None if self.key is None else self.key.reveal())


def split_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """A configured endpoint (``host:port``, ``[v6]:port`` or ``https://host:port``) as
    host, port and whether the endpoint itself says TLS."""
    tls = endpoint.startswith("https://")
    host, _, port = endpoint.removeprefix("https://").rpartition(":")
    return host, int(port), tls


class EtcdClient(aetcd.Client):
    """aetcd's client over TLS when ``access`` (or an ``https://`` endpoint) asks for it:
    aetcd 1.x opens only plaintext channels. It authenticates as ``access``'s user on every
    connect; an authentication etcd refuses raises :class:`EtcdRefused`."""

    def __init__(self, endpoint: str, access: EtcdAccess | None = None,
                 timeout: int | None = None) -> None:
        access = access or EtcdAccess()
        host, port, tls = split_endpoint(endpoint)
        password = None if access.password is None else access.password.reveal().decode()
        super().__init__(host=host, port=port, username=access.username or None,
                         password=password, timeout=timeout)
        self.target = f"{host}:{port}"
        self._credentials = access.credentials() if access.tls or tls else None

    async def connect(self) -> None:
        """aetcd's connect, on a TLS channel if configured, with refusals told apart."""
        if self._connected.is_set():
            return
        if self._is_connecting:  # another task is connecting: wait for it
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            options = self._options.items()
            self.channel = (
                rpc.insecure_channel(self.target, options=options) if self._credentials is None
                else rpc.secure_channel(self.target, self._credentials, options=options))
            if self._username is not None:
                self.metadata = (("token", await self._authenticate()),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> str:
        self.auth_stub = rpc.AuthStub(self.channel)
        request = rpc.AuthenticateRequest(name=self._username, password=self._password)
        try:
            resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
        except rpc.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                              grpc.StatusCode.FAILED_PRECONDITION):
                # Wrong user or password, or auth not enabled on etcd: never mended by retrying.
                raise EtcdRefused(f"etcd at {self.target} refused user {self._username!r}: "
                                  f"{exc.details()} (check [cluster] etcd_username and "
                                  "etcd_password)") from None
            raise  # mapped to aetcd's errors by the call that connects
        return str(resp.token)


def _refusal(exc: BaseException, target: str) -> str | None:
    """What makes ``exc`` a refusal retrying will not mend, if it is one."""
    if isinstance(exc, EtcdRefused):
        return str(exc)
    text = describe(exc)
    if "handshake failed" in text.lower():
        return (f"TLS handshake with etcd at {target} failed: {text} (check [cluster] etcd_ca, "
                "etcd_cert and etcd_key against etcd's --trusted-ca-file and certificate)")
    if "user name is empty" in text or "permission denied" in text:
        return (f"etcd at {target} refused the call: {text} (check [cluster] etcd_username, "
                "and that etcd gives the user read and write on the cluster's prefix)")
    return None


class _TokenExpired(StoreDown):
    """etcd no longer knows our auth token (its TTL passed, or etcd restarted)."""


class EtcdStore:
    """:class:`Store` on etcd: one client at a time, rotated to the next endpoint whenever a
    call fails or times out. With an etcd user, an expired auth token (aetcd never renews
    one) drops the client and the call runs once more on a fresh, authenticated one."""

    def __init__(self, endpoints: Sequence[str], keys: Keys, timing: Timing,
                 deadline: Deadline, access: EtcdAccess | None = None) -> None:
        self.keys = keys
        self.timing = timing
        self._deadline = deadline
        self._access = access or EtcdAccess()
        self._endpoints = list(endpoints)
        self._endpoint = 0
        self._client: EtcdClient | None = None
        self.closing: set[asyncio.Task[None]] = set()  # channels being closed in the background
        self._reached = False  # a call ever succeeded: refusals are retried from then on
        self._refused: set[str] = set()  # endpoints that refused us before that

    @classmethod
    def for_cluster(cls, cluster: ClusterConfig, keys: Keys, timing: Timing,
                    deadline: Deadline) -> EtcdStore:
        """The store of ``[cluster]``: its endpoints, TLS files (read now) and etcd user."""
        return cls(cluster.etcd, keys, timing, deadline, EtcdAccess.from_config(cluster))

    def _connect(self) -> EtcdClient:
        if self._client is None:
            self._client = EtcdClient(self._endpoints[self._endpoint % len(self._endpoints)],
                                      self._access, timeout=max(1, int(self.timing.ttl / 3)))
        return self._client

    def _drop_client(self, rotate: bool = True) -> None:
        client, self._client = self._client, None
        if rotate:
            self._endpoint += 1  # try the next endpoint next time
        if client is not None:
            # Closing a gRPC channel to a dead peer can hang: never make the caller (the
            # keepalive loop, above all) wait for it.
            task = asyncio.create_task(_close_quietly(client))
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)

    async def close(self) -> None:
        self._drop_client()

    async def _call(self, fn: Callable[[EtcdClient], Coroutine[Any, Any, Any]],
                    timeout: float) -> Any:
        until = time.monotonic() + timeout
        try:
            return await self._attempt(fn, timeout)
        except _TokenExpired as exc:
            # Authenticate again on the same endpoint, within the same deadline; a second
            # expiry in a row is etcd trouble (StoreDown) like any other.
            log.info("cluster.etcd_reauthenticate", endpoint=self._endpoints[
                self._endpoint % len(self._endpoints)], reason=str(exc))
            return await self._attempt(fn, until - time.monotonic())

    async def _attempt(self, fn: Callable[[EtcdClient], Coroutine[Any, Any, Any]],
                       timeout: float) -> Any:
        if timeout <= 0:
            raise StoreDown("fence deadline passed")  # the fence timer is about to fire
        # A hard deadline: wait_for() would wait for a cancelled gRPC call to unwind, and a
        # wedged channel may never do so. Abandon the call instead (cancelled, not awaited).
        client = self._connect()
        call = asyncio.ensure_future(fn(client))
        try:
            done, _ = await asyncio.wait({call}, timeout=timeout)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if not done:
            call.cancel()
            call.add_done_callback(_retrieve)
            self._drop_client()
            raise StoreDown("etcd call timed out")
        try:
            result = call.result()
        except (asyncio.CancelledError, Exception) as exc:
            # We were not cancelled (the wait above returned), so a CancelledError here is
            # the gRPC call's own (its channel closed under it): etcd trouble, not shutdown.
            # aetcd lets raw gRPC errors and plain Exceptions through besides its ClientError
            # family: whatever it is, etcd did not answer usefully, and it must never escape
            # into a background loop (a dead keepalive task would leave the node fenced).
            if isinstance(exc, etcd_errors.UnauthenticatedError) and client.metadata:
                self._drop_client(rotate=False)  # the endpoint is fine; our token is not
                raise _TokenExpired(describe(exc)) from None
            self._drop_client()
            if isinstance(exc, asyncio.CancelledError):  # never "CancelledError" in a log
                raise StoreDown("etcd call aborted: its gRPC channel closed") from None
            self._check_refusal(exc, client.target)
            raise StoreDown(describe(exc)) from None
        self._reached = True
        return result

    def _check_refusal(self, exc: BaseException, target: str) -> None:
        """Before etcd was ever reached, raise :class:`EtcdRefused` once every endpoint has
        refused us: the node must not start, and should say why, not retry for a while."""
        refusal = _refusal(exc, target)
        if refusal is None or self._reached:
            return
        self._refused.add(target)
        if len(self._refused) >= len(set(self._endpoints)):
            raise EtcdRefused(refusal)

    def _timeout(self) -> float:
        return budget(self.timing.call_timeout, self._deadline)

    async def grant(self, ttl: int) -> int:
        lease = await self._call(lambda c: c.lease(ttl), self._timeout())
        return int(lease.id)

    async def refresh(self, lease: int) -> int | None:
        resp = await self._call(lambda c: c.refresh_lease(lease),
                                budget(self.timing.refresh_timeout, self._deadline))
        return None if resp is None else int(resp.TTL)

    async def revoke(self, lease: int, timeout: float) -> None:
        await self._call(lambda c: c.revoke_lease(lease), timeout)

    async def lease_left(self, lease: int) -> LeaseLeft | None:
        resp = await self._call(lambda c: c.get_lease_info(lease, keys=False), self._timeout())
        ttl = int(getattr(resp, "TTL", -1))
        return None if ttl < 0 else LeaseLeft(float(ttl), float(resp.grantedTTL))

    async def snapshot(self) -> Snapshot:
        rng = await self._call(lambda c: c.get_prefix(self.keys.prefix), self._timeout())
        revision = rng.header.revision if hasattr(rng, "header") else 0
        return decode(self.keys, revision, (
            Entry(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease)
            for kv in rng))

    async def commit(self, txn: Txn) -> TxnResult:
        def run(c: aetcd.Client) -> Coroutine[Any, Any, Any]:
            return c.transaction(compare=[_compare(c, x) for x in txn.compare],
                                 success=[_op(c, op) for op in txn.success],
                                 failure=[_op(c, op) for op in txn.failure])

        ok, responses = await self._call(run, self._timeout())
        ops = txn.success if ok else txn.failure
        gets = tuple(_entry(op.key, resp) for op, resp in zip(ops, responses, strict=False)
                     if isinstance(op, Get))
        return TxnResult(bool(ok), gets)

    async def changes(self, start: int) -> AsyncIterator[None]:
        client = self._connect()
        try:
            watch = await client.watch_prefix(self.keys.prefix, start_revision=start or None)
            async for _event in watch:
                yield
        except etcd_errors.UnauthenticatedError:
            if client is self._client:
                self._drop_client(rotate=False)  # the next call authenticates again
            raise


def _compare(c: aetcd.Client, x: Compare) -> Any:
    target = {"create": c.transactions.create, "mod": c.transactions.mod,
              "value": c.transactions.value}[x.target]
    return target(x.key) == x.expect


def _op(c: aetcd.Client, op: Op) -> Any:
    if isinstance(op, Put):
        return c.transactions.put(op.key, op.value, lease=op.lease)
    if isinstance(op, Delete):
        return c.transactions.delete(op.key)
    return c.transactions.get(op.key)


def _entry(key: bytes, resp: Any) -> Entry | None:
    if not resp:
        return None
    value, meta = resp[0]
    return Entry(key, value, meta.create_revision, meta.mod_revision)


async def _close_quietly(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 2.0)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume an abandoned call's outcome so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()
