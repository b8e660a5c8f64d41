"""A node's replication, put together: its copies of other nodes' shards (the listener,
the copy writer, the follower) and the owner side of the shards it owns.

The node calls this from its ShardHost methods: :meth:`ReplicationService.acquire` after the
coordinator's claim wrote the in-sync record (the copy this node followed becomes the owner's
log in place: same directory, same bytes), :meth:`release` when it hands a shard back,
:meth:`fence` when its lease is in doubt.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog

from mta.config import Config
from mta.coordinator import Coordinator, Replication
from mta.replication.channel import Listener, serve
from mta.replication.copy import log_segments
from mta.replication.copywriter import CopyWriter
from mta.replication.follower import Follower
from mta.replication.insync import NOTHING, SyncRecord
from mta.replication.owner import OwnerEvents, OwnerSide, ShardReplica
from mta.replication.peerauth import PeerAuth
from mta.spool import Spool
from mta.spool.copyid import copy_id
from mta.spool.shard import shard_dir

__all__ = ["ReplicationService", "replicate_opened"]

log = structlog.get_logger("mta.replication")


class _Peers:
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def address(self, node: str) -> tuple[str, int] | None:
        return self._coordinator.replication_address(node)


class _Store:
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def change(self, shard: int, old: SyncRecord, new: SyncRecord) -> SyncRecord | None:
        return await self._coordinator.change_sync(shard, old, new)


def peer_auth(cfg: Config) -> PeerAuth:
    """How this node authenticates replication peers, from ``[cluster]``."""
    c = cfg.cluster
    return PeerAuth.from_config(cfg.node.id,
                                secret=c.secret.reveal() if c.secret is not None else None,
                                tls_ca=c.tls_ca or None, tls_cert=c.tls_cert or None,
                                tls_key=c.tls_key or None)


async def replicate_opened(spool: Spool, owner: OwnerSide, shard: int, token: int,
                           copy: str, record: SyncRecord, followers: list[str]) -> ShardReplica:
    """Replicate ``shard``, just opened on ``spool`` under ``token``, through ``owner``: the
    replica starts from the log as recovery left it (its end and segment sizes)."""
    directory = shard_dir(spool.root, shard)
    segs = await asyncio.to_thread(log_segments, directory)
    end = (segs[-1][0], segs[-1][2]) if segs else NOTHING
    rep = owner.open(shard, token, directory, copy, record, followers, end,
                     {seq: size for seq, _token, size in segs})
    spool.replicate(shard, rep)
    # This term's own segment now, shipped to the followers as they catch up: a copy then
    # always holds a segment newer than any the owner's compaction deletes, and a follower
    # that catches up on a log whose older segments were all delivered and deleted still
    # reaches everything acknowledged (the new segment lies past it).
    await spool.start_term(shard)
    return rep


class ReplicationService:
    """This node's part in replicating the spool ([spool] replicas > 1)."""

    def __init__(self, cfg: Config, spool: Spool, coordinator: Coordinator,
                 events: OwnerEvents | None = None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.root = Path(cfg.spool.path)
        self.auth = peer_auth(cfg)
        self.copy_ids: dict[int, str] = {}
        self.writer: CopyWriter | None = None
        self.follower: Follower | None = None
        self.listener: Listener | None = None
        self.owner = OwnerSide(cfg.node.id, self.auth, _Peers(coordinator), _Store(coordinator),
                               min_insync=cfg.spool.min_insync, replicas=cfg.spool.replicas,
                               replica_timeout=cfg.spool.replica_timeout,
                               on_fenced=self._on_fenced, followers=coordinator.followers,
                               events=events)

    async def start(self) -> None:
        """Name every shard's copy, then listen for owners (before joining the cluster: the
        node key publishes the listener's address and the copy ids)."""
        self.copy_ids = await asyncio.to_thread(self._make_copy_ids)
        loop = asyncio.get_running_loop()
        self.writer = CopyWriter(loop)
        # Owners ping every streamed shard each replica_timeout / 4, and drop a link they
        # hear nothing on after 2 x replica_timeout: silence far longer than that is a dead
        # connection (an owner with no shard to stream here redials when it has one).
        self.follower = Follower(self.cfg.node.id, self.root, self.writer, self.spool.owns,
                                 self.cfg.spool.shards,
                                 idle_timeout=max(10.0, 8 * self.cfg.spool.replica_timeout))
        listen = self.cfg.cluster.replication_listen
        assert listen is not None  # the config refuses replicas > 1 without it
        self.listener = await serve(listen[0], listen[1], self.auth, self.follower.handle)
        self.owner.start()
        log.info("replication.started", node_id=self.cfg.node.id, port=self.listener.port,
                 replicas=self.cfg.spool.replicas, min_insync=self.cfg.spool.min_insync)

    def _make_copy_ids(self) -> dict[int, str]:
        out = {}
        for n in range(self.cfg.spool.shards):
            directory = shard_dir(self.root, n)
            directory.mkdir(parents=True, exist_ok=True)
            out[n] = copy_id(directory)
        return out

    def endpoints(self) -> dict[str, Any]:
        """What the node key publishes for replication: listener, zone, copy ids."""
        out: dict[str, Any] = {"copies": {str(n): c for n, c in self.copy_ids.items()}}
        if self.cfg.cluster.zone:
            out["zone"] = self.cfg.cluster.zone
        adv = self.cfg.cluster.replication_advertise
        if adv is None and self.listener is not None and self.cfg.cluster.replication_listen:
            adv = (self.cfg.cluster.replication_listen[0], self.listener.port)
        if adv is not None:
            host, port = adv
            out["replication"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return out

    async def acquire(self, shard: int, token: int, replication: Replication) -> None:
        """Open ``shard`` as its owner and replicate it: the follower lets go of its copy
        first (the bytes stay: they are the log the owner opens)."""
        if self.follower is not None:
            await self.follower.release(shard)
        try:
            await self.spool.acquire_shard(shard, token, replicated=True)
        except BaseException:
            if self.follower is not None:
                self.follower.resume(shard)
            raise
        await replicate_opened(self.spool, self.owner, shard, token, self.copy_ids[shard],
                               replication.record, list(replication.followers))

    def release(self, shard: int) -> None:
        """The shard was handed back: stop replicating it; its copy may follow again."""
        self.owner.close_shard(shard)
        if self.follower is not None:
            self.follower.resume(shard)

    def fence(self, reason: str) -> None:
        """The lease is in doubt: nothing more is acknowledged on any owned shard."""
        for rep in list(self.owner.shards.values()):
            rep.fence(reason)

    def _on_fenced(self, shard: int, why: str) -> None:
        # A follower follows a newer owner: this node lost the shard. Stop writing it now;
        # the coordinator releases it when it sees the owner key gone or replaced.
        self.spool.fence_shard(shard)
        log.warning("replication.shard_lost", node_id=self.cfg.node.id, shard=shard, reason=why)

    def status(self) -> dict[int, dict[str, object]]:
        """Per owned shard: members, followers' states and positions."""
        return {n: rep.status() for n, rep in sorted(self.owner.shards.items())}

    async def stop(self) -> None:
        await self.owner.stop()
        if self.listener is not None:
            await self.listener.close()
        if self.writer is not None:
            await self.writer.close()

