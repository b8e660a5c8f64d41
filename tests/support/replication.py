"""Real replication parts for tests: a follower node (listener, copy writer, copies) and an
owner side on a real spool, over loopback sockets, with the in-sync records in memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mta.envelope import Envelope
from mta.replication.channel import Listener, serve
from mta.replication.copywriter import CopyWriter
from mta.replication.follower import Follower
from mta.replication.insync import SyncRecord
from mta.replication.owner import OwnerSide, ShardReplica
from mta.replication.peerauth import PeerAuth
from mta.replication.service import replicate_opened
from mta.spool import Spool
from mta.spool.copyid import copy_id
from mta.spool.shard import shard_dir

__all__ = ["SECRET", "FollowerNode", "MemorySyncStore", "Pair", "Peers", "envelope",
           "open_owner", "start_pair"]

SECRET = b"test-cluster-secret-0123456789"


class MemorySyncStore:
    """``sync/<shard>`` records in memory, changed only from the record the owner read."""

    def __init__(self) -> None:
        self.records: dict[int, SyncRecord] = {}
        self.changes = 0
        self.history: list[SyncRecord] = []  # every record written by a change, in order

    async def change(self, shard: int, old: SyncRecord, new: SyncRecord) -> SyncRecord | None:
        if self.records.get(shard) != old:
            return None
        self.records[shard] = new
        self.changes += 1
        self.history.append(new)
        return new


@dataclass
class Peers:
    """Where each node's replication listener is."""

    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)

    def address(self, node: str) -> tuple[str, int] | None:
        return self.addresses.get(node)


class FollowerNode:
    """A node that only follows: its listener, copy writer and copies under ``root``."""

    def __init__(self, node_id: str, root: Path, owns: set[int] | None = None) -> None:
        self.node_id, self.root = node_id, root
        self.owns = owns or set()
        self.writer: CopyWriter | None = None
        self.follower: Follower | None = None
        self.listener: Listener | None = None

    async def start(self, peers: Peers, port: int = 0) -> FollowerNode:
        self.writer = CopyWriter(asyncio.get_running_loop())
        self.follower = Follower(self.node_id, self.root, self.writer, self.owns.__contains__,
                                 shards=2)
        self.listener = await serve("127.0.0.1", port, PeerAuth(self.node_id, secret=SECRET),
                                    self.follower.handle)
        peers.addresses[self.node_id] = ("127.0.0.1", self.listener.port)
        return self

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self.writer is not None:
            await self.writer.close()


async def open_owner(spool: Spool, side: OwnerSide, store: MemorySyncStore, shard: int,
                     token: int, followers: list[str]) -> ShardReplica:
    """Acquire ``shard`` on ``spool`` under ``token`` and replicate it through ``side``."""
    await spool.acquire_shard(shard, token, replicated=True)
    directory = shard_dir(spool.root, shard)
    cid = await asyncio.to_thread(copy_id, directory)
    record = store.records.get(shard)
    if record is None or record.token < token:
        members = dict(record.members) if record else {}
        members[side.node_id] = cid
        record = store.records[shard] = SyncRecord(token, side.node_id, members)
    return await replicate_opened(spool, side, shard, token, cid, record, followers)


def envelope(n: int = 0) -> Envelope:
    return Envelope(sender=f"s{n}@example.com", recipients=[f"r{n}@example.org"],
                    client_ip="127.0.0.1", helo="test")


@dataclass
class Pair:
    """Owner node "a" (a real spool with an owner side) and follower node "b", on loopback,
    with the in-sync records in memory."""

    tmp: Path
    peers: Peers
    store: MemorySyncStore
    spool: Spool
    side: OwnerSide
    follower: FollowerNode

    def members(self, shard: int = 0) -> set[str]:
        return set(self.store.records[shard].members)

    async def close(self) -> None:
        await self.side.stop()
        await self.spool.close()
        await self.follower.stop()


async def start_pair(tmp: Path, min_insync: int, replica_timeout: float, shards: int = 2,
                     **side: Any) -> Pair:
    """A started :class:`Pair` (``side``: more OwnerSide options, e.g. ``events``)."""
    peers, store = Peers(), MemorySyncStore()
    follower = await FollowerNode("b", tmp / "b").start(peers)
    spool = Spool(tmp / "a", "a", shards=shards, segment_size=4096)
    await spool.start()
    owner = OwnerSide("a", PeerAuth("a", secret=SECRET), peers, store, min_insync=min_insync,
                      replica_timeout=replica_timeout, **side)
    owner.start()
    return Pair(tmp, peers, store, spool, owner, follower)
