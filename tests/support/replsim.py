"""A seeded, deterministic simulation of the replicated spool's protocol.

Nodes (owner and followers of one shard), the leader's promotion rule, the in-memory etcd from
:mod:`cluster.memstore` (revisions, compares, leases on a manual clock), and a network of
ordered links that delays, breaks and partitions, with crashes, disk losses and stalls
(SIGSTOP) at any step. The decisions under test are the real ones:
:class:`mta.replication.insync.OwnerReplica`, :func:`~mta.replication.insync.plan_catch_up`,
:func:`~mta.replication.insync.promotable` and
:func:`~mta.replication.insync.takeover_record`. What is modelled here is only the I/O: a copy is
a list of segments of whole batches with a durable prefix (recovery cuts torn tails, so a
crash keeps the durable batches and possibly some written after them), a link is a FIFO.

After every step the invariants are checked; a violation raises :class:`Violation` naming the
seed, so any failure replays exactly with ``run(seed)``.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cluster.memstore import ManualClock, MemEtcd
from cluster.store import Compare, Delete, Put, Txn
from mta.replication.insync import (
    NOTHING,
    OwnerReplica,
    Position,
    SegmentInfo,
    SyncRecord,
    plan_catch_up,
    promotable,
    takeover_record,
)

__all__ = ["Params", "Result", "Violation", "run"]

HEADER = 10  # bytes of a segment header record
OWNER_KEY = b"/sim/owner/0"
SYNC_KEY = b"/sim/sync/0"


class Violation(AssertionError):
    """An invariant failed; the message names the seed and the step."""


@dataclass(frozen=True)
class Params:
    """One schedule's shape."""

    nodes: int = 3
    replicas: int = 3
    min_insync: int = 2
    steps: int = 300
    settle_steps: int = 250
    dt: float = 0.05
    ttl: int = 2
    fence_after: float = 1.2
    replica_timeout: float = 0.5
    fault_rate: float = 0.04
    segment_size: int = 400
    wipes: bool = True


@dataclass
class Result:
    """What a schedule did, for the test's own checks and for reading a failure."""

    seed: int
    acked: int = 0
    takeovers: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    read_only_steps: int = 0


# --- disks ---------------------------------------------------------------------------------


@dataclass
class Segment:
    seq: int
    token: int
    batches: list[tuple[int, int]] = field(default_factory=list)  # (batch id, length)
    durable: int = 0  # how many of ``batches`` are fdatasynced (the header always is)

    @property
    def size(self) -> int:
        return HEADER + sum(n for _, n in self.batches)

    def size_of(self, count: int) -> int:
        return HEADER + sum(n for _, n in self.batches[:count])


@dataclass
class Copy:
    """A node's copy of the shard: segments of whole batches, the token it follows."""

    copy_id: str
    token: int = 0
    segments: list[Segment] = field(default_factory=list)

    @property
    def end(self) -> Position:
        return (self.segments[-1].seq, self.segments[-1].size) if self.segments else NOTHING

    @property
    def durable_end(self) -> Position:
        for seg in reversed(self.segments):
            return (seg.seq, seg.size_of(seg.durable))
        return NOTHING

    def infos(self) -> list[SegmentInfo]:
        return [SegmentInfo(s.seq, s.token, s.size) for s in self.segments]

    def sync(self) -> None:
        for seg in self.segments:
            seg.durable = len(seg.batches)

    def durable_ids(self) -> set[int]:
        return {b for s in self.segments for b, _ in s.batches[:s.durable]}

    def append(self, seq: int, offset: int, batch: tuple[int, int]) -> bool:
        """Write a frame at ``(seq, offset)``: a header (offset 0, ``batch`` is ``(0,
        token of its writer)``) or a batch; False if that is not where the copy ends."""
        if offset == 0:
            token = batch[1]
            if self.segments and seq <= self.segments[-1].seq:
                return False
            if self.segments:
                self.segments[-1].durable = len(self.segments[-1].batches)  # sealed: synced
            self.segments.append(Segment(seq, token))
            return True
        if self.end != (seq, offset):
            return False
        self.segments[-1].batches.append(batch)
        return True

    def truncate(self, to: Position) -> None:
        seq, offset = to
        while self.segments and self.segments[-1].seq > seq:
            self.segments.pop()
        if self.segments and self.segments[-1].seq == seq:
            seg = self.segments[-1]
            if offset == 0:
                self.segments.pop()
                return
            keep = 0
            while keep < len(seg.batches) and seg.size_of(keep + 1) <= offset:
                keep += 1
            del seg.batches[keep:]
            seg.durable = min(seg.durable, keep)

    def crash(self, rng: random.Random) -> None:
        """Lose what was not synced, except a random run of it the disk happened to keep."""
        for seg in self.segments:
            extra = rng.randint(0, len(seg.batches) - seg.durable)
            del seg.batches[seg.durable + extra:]
            seg.durable = len(seg.batches)

    def frames_from(self, start: Position) -> list[tuple[int, int, tuple[int, int]]]:
        """The frames (seq, offset, batch or header) that rebuild the log after ``start``
        on a copy ending there."""
        out: list[tuple[int, int, tuple[int, int]]] = []
        for seg in self.segments:
            if seg.seq < start[0]:
                continue
            if seg.seq > start[0] or start == NOTHING:
                out.append((seg.seq, 0, (0, seg.token)))  # the header names its writer
                skip = 0
            else:
                skip = start[1]
            off = HEADER
            for batch in seg.batches:
                if off >= skip:
                    out.append((seg.seq, off, batch))
                off += batch[1]
        return out


# --- nodes ---------------------------------------------------------------------------------


@dataclass
class Link:
    """The owner's view of its stream to one follower."""

    epoch: int
    since: float
    sent: Position | None = None  # where the follower's copy ends once all sent lands
    open: bool = False


@dataclass
class Node:
    name: str
    copy: Copy
    up: bool = True
    stalled_until: float = 0.0
    zombie_step: bool = False  # first step after a stall: acts before looking at the clock
    abandon: bool = False  # fenced: give the lease up once etcd answers
    streams: dict[str, int] = field(default_factory=dict)  # as a follower: plan per owner
    lease: int = 0
    refreshed: float = 0.0
    # owner role
    token: int = 0
    claim_rev: int = 0
    replica: OwnerReplica | None = None
    links: dict[str, Link] = field(default_factory=dict)
    pending: list[tuple[int, Position, str]] = field(default_factory=list)  # id, end, kind
    txn: tuple[float, Txn, SyncRecord, bool] | None = None  # due, txn, record, reaches etcd
    # A change whose answer was lost (it may have committed): the record it replaced, and
    # when to read etcd again to learn what is there.
    reread: tuple[float, SyncRecord, SyncRecord] | None = None

    @property
    def owner(self) -> bool:
        return self.replica is not None

    def step_down(self) -> None:
        self.replica = None
        self.reread = None
        self.links.clear()
        self.pending.clear()
        self.token = 0


class Sim:
    """One schedule."""

    def __init__(self, seed: int, p: Params) -> None:
        self.seed, self.p = seed, p
        self.rng = random.Random(seed)
        self.clock = ManualClock(1000.0)
        self.etcd = MemEtcd(self.clock)
        self.nodes = {f"n{i}": Node(f"n{i}", Copy(self._copy_id())) for i in range(p.nodes)}
        self.queues: dict[tuple[str, str], deque[tuple[float, int, tuple[Any, ...]]]] = {}
        self.epochs: dict[tuple[str, str], int] = {}
        self.cut: set[tuple[str, str]] = set()  # partitioned pairs (both directions stored)
        self.etcd_cut: set[str] = set()
        self.next_batch = 1
        self.acked: dict[int, tuple[int, str, str]] = {}  # batch -> token, node, kind
        self.ack_tokens: dict[int, str] = {}
        self.seen_tokens: dict[str, int] = {}
        self.lost: dict[str, set[int]] = {}  # copy id -> batches it held when its disk died
        self.record_token = 0
        self.result = Result(seed)
        self.step_no = 0
        self.quiet = False
        self.trace: deque[str] = deque(maxlen=40)
        for node in self.nodes.values():
            self._grant(node)

    # --- helpers -------------------------------------------------------------------------

    def _copy_id(self) -> str:
        return f"c{self.rng.getrandbits(32):08x}"

    def _grant(self, node: Node) -> None:
        node.lease = self.etcd.grant(self.p.ttl)
        node.refreshed = self.clock()

    def note(self, text: str) -> None:
        self.trace.append(f"{self.step_no}: {text}")

    def fail(self, what: str) -> None:
        raise Violation(f"seed {self.seed} step {self.step_no}: {what}\n  " +
                        "\n  ".join(self.trace))

    def record(self) -> tuple[SyncRecord | None, int]:
        entry = self.etcd.get(SYNC_KEY)
        return (None, 0) if entry is None else (SyncRecord.decode(entry.value), entry.mod_revision)

    # --- network -------------------------------------------------------------------------

    def send(self, src: str, dst: str, msg: tuple[Any, ...]) -> None:
        if (src, dst) in self.cut:
            return
        q = self.queues.setdefault((src, dst), deque())
        last = q[-1][0] if q else 0.0
        due = max(last, self.clock() + self.rng.choice((0.0, 0.0, self.p.dt, 2 * self.p.dt)))
        q.append((due, self.epochs.get(self._pair(src, dst), 0), msg))

    @staticmethod
    def _pair(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a < b else (b, a)

    def break_link(self, a: str, b: str) -> None:
        pair = self._pair(a, b)
        self.epochs[pair] = self.epochs.get(pair, 0) + 1
        self.queues.pop((a, b), None)
        self.queues.pop((b, a), None)
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            if node.replica is not None and y in node.links:
                node.links.pop(y)
                node.replica.disconnected(y)

    def deliver(self) -> None:
        for (src, dst), q in list(self.queues.items()):
            while q and q[0][0] <= self.clock():
                _, epoch, msg = q.popleft()
                target = self.nodes[dst]
                if epoch != self.epochs.get(self._pair(src, dst), 0) or not target.up:
                    continue
                if target.stalled_until > self.clock():
                    q.appendleft((self.clock() + self.p.dt, epoch, msg))
                    break
                self.receive(target, src, msg)

    # --- etcd ----------------------------------------------------------------------------

    def etcd_ok(self, node: Node) -> bool:
        return node.name not in self.etcd_cut

    def keepalive(self, node: Node) -> None:
        if not self.etcd_ok(node):
            return
        if node.abandon:
            # Fenced: the old lease (and the owner key on it) is given up, a new one taken,
            # as the coordinator does before it claims anything again.
            self.etcd.drop_lease(node.lease)
            node.abandon = False
            self._grant(node)
        elif self.etcd.refresh(node.lease):
            node.refreshed = self.clock()
        elif not node.owner or self.fenced(node):
            # The lease is gone: whatever it guarded is given up, then a new one (as the
            # coordinator does after a fence).
            node.step_down()
            self._grant(node)

    def fenced(self, node: Node) -> bool:
        return self.clock() - node.refreshed > self.p.fence_after

    def live_nodes(self) -> set[str]:
        self.etcd.expire()
        return {n.name for n in self.nodes.values() if n.lease in self.etcd.leases}

    # --- owner ---------------------------------------------------------------------------

    def leader(self) -> None:
        """Give a shard without an owner to a promotable live node (the leader's rule)."""
        self.etcd.expire()
        if self.etcd.get(OWNER_KEY) is not None:
            return
        rec, rev = self.record()
        live = self.live_nodes()
        candidates = [n for n in self.nodes.values()
                      if n.up and n.name in live and not self.fenced(n)
                      and n.stalled_until <= self.clock() and self.etcd_ok(n)
                      and promotable(rec, n.name, n.copy.copy_id)]
        if not candidates:
            return
        node = self.rng.choice(candidates)
        self.claim(node, rec, rev, live)

    def claim(self, node: Node, rec: SyncRecord | None, rev: int, live: set[str]) -> None:
        res = self.etcd.commit(Txn((Compare.absent(OWNER_KEY), Compare.modified_at(SYNC_KEY, rev)),
                                   (Put(OWNER_KEY, node.name.encode(), node.lease),)))
        if not res.succeeded:
            return
        entry = self.etcd.get(OWNER_KEY)
        assert entry is not None
        token = 1000 + entry.create_revision
        new = takeover_record(rec, node.name, node.copy.copy_id, token, live)
        res = self.etcd.commit(Txn((Compare.created_at(OWNER_KEY, entry.create_revision),
                                    Compare.modified_at(SYNC_KEY, rev)),
                                   (Put(SYNC_KEY, new.encode()),)))
        if not res.succeeded:
            self.etcd.commit(Txn((Compare.created_at(OWNER_KEY, entry.create_revision),),
                                 (Delete(OWNER_KEY),)))
            return
        self.become_owner(node, token, entry.create_revision, new)

    def become_owner(self, node: Node, token: int, claim_rev: int, rec: SyncRecord) -> None:
        copy = node.copy
        if token <= copy.token:
            self.fail(f"{node.name} claims token {token} not above its own {copy.token}")
        copy.token = token
        node.token, node.claim_rev = token, claim_rev
        seq = (copy.segments[-1].seq if copy.segments else 0) + 1
        copy.append(seq, 0, (0, token))
        replica = OwnerReplica(node.name, copy.copy_id, rec, self.p.min_insync,
                               self.p.replica_timeout)
        copy.sync()  # recovery syncs what it keeps
        replica.begin(copy.end, self.clock())
        node.replica = replica
        node.links.clear()
        node.pending.clear()
        self.result.takeovers += 1
        self.note(f"{node.name} owns with token {token}, members {sorted(rec.members)}")

    def owner_step(self, node: Node) -> None:
        replica = node.replica
        assert replica is not None
        entry = self.etcd.get(OWNER_KEY) if self.etcd_ok(node) else None
        lost = self.etcd_ok(node) and (entry is None or entry.create_revision != node.claim_rev)
        if not node.zombie_step and (self.fenced(node) or lost):
            self.note(f"{node.name} fences/steps down (token {node.token})")
            node.step_down()
            node.abandon = self.fenced(node)
            return
        self.connect_followers(node)
        if not self.quiet and self.rng.random() < 0.5:
            kind = "reception" if replica.accepting else "state"
            self.write_batch(node, kind)
        if self.rng.random() < 0.5:
            node.copy.sync()
            replica.synced(node.copy.durable_end)
        for peer in node.links:
            self.send(node.name, peer, ("ping", node.token))
        self.settle_txn(node)
        self.propose(node)
        self.acknowledge(node)

    def targets(self, node: Node) -> list[str]:
        replica = node.replica
        assert replica is not None
        want = [m for m in sorted(replica.record.members) if m != node.name]
        others = sorted(n for n in self.nodes if n != node.name and n not in want)
        self.rng.shuffle(others)
        return (want + others)[:max(self.p.replicas - 1, len(want))]

    def connect_followers(self, node: Node) -> None:
        now = self.clock()
        for peer in self.targets(node):
            link = node.links.get(peer)
            if link is not None and not link.open and now - link.since > 4 * self.p.dt:
                self.break_link(node.name, peer)  # no answer to the hello: connect again
                link = None
            if link is None:
                pair = self._pair(node.name, peer)
                node.links[peer] = Link(self.epochs.get(pair, 0), now)
                self.send(node.name, peer, ("hello", node.token))

    def write_batch(self, node: Node, kind: str) -> None:
        copy = node.copy
        if copy.end[1] > self.p.segment_size:
            self.rotate(node)
        batch = (self.next_batch, self.rng.randint(1, 50))
        self.next_batch += 1
        seq, offset = copy.end
        copy.append(seq, offset, batch)
        assert node.replica is not None
        node.replica.wrote(copy.end)
        node.pending.append((batch[0], copy.end, kind))
        for peer, link in node.links.items():
            if link.open and link.sent == (seq, offset):
                self.send(node.name, peer, ("append", node.token, seq, offset, batch))
                link.sent = copy.end

    def rotate(self, node: Node) -> None:
        """Open the next segment (a full one, or a failed write: seqs may skip)."""
        copy = node.copy
        seq = copy.end[0] + self.rng.choice((1, 1, 1, 2))
        copy.append(seq, 0, (0, node.token))
        assert node.replica is not None
        node.replica.wrote(copy.end)
        for peer, link in node.links.items():
            if link.open:
                self.send(node.name, peer, ("append", node.token, seq, 0, (0, node.token)))
                link.sent = copy.end

    def propose(self, node: Node) -> None:
        replica = node.replica
        assert replica is not None
        if node.txn is not None or node.reread is not None:
            return
        new = replica.proposal(self.clock())
        if new is None:
            return
        _, rev = self.record()
        guard = (Compare.created_at(OWNER_KEY, node.claim_rev), Compare.modified_at(SYNC_KEY, rev))
        txn = Txn(guard, (Put(SYNC_KEY, new.encode()),))
        due = self.clock() + self.rng.choice((0.0, self.p.dt, 3 * self.p.dt))
        node.txn = (due, txn, new, self.etcd_ok(node))
        self.note(f"{node.name} proposes members {sorted(new.members)}")

    def settle_txn(self, node: Node) -> None:
        if node.replica is None:
            return
        if node.reread is not None:
            self.reread(node)
            return
        if node.txn is None or node.txn[0] > self.clock():
            return
        _, txn, new, reaches = node.txn
        node.txn = None
        old = node.replica.record
        ok = reaches and self.etcd.commit(txn).succeeded
        if reaches and self.rng.random() < 0.15:
            # The answer is lost (a channel closed under the call): committed or not, the
            # owner cannot tell, and must read etcd before it settles.
            node.reread = (self.clock() + self.p.dt, old, new)
            self.note(f"{node.name} record change {sorted(new.members)}: answer lost "
                      f"({'committed' if ok else 'not committed'})")
            return
        node.replica.settled(new if ok else None)
        self.note(f"{node.name} record change {'committed' if ok else 'failed'}: "
                  f"{sorted(new.members)}")

    def reread(self, node: Node) -> None:
        """What the coordinator's change_sync does after a failed call: read the record
        (until etcd answers) and settle on it if it is still this term's."""
        assert node.reread is not None and node.replica is not None
        due, old, new = node.reread
        if due > self.clock():
            return
        if not self.etcd_ok(node):
            node.reread = (self.clock() + self.p.dt, old, new)
            return
        node.reread = None
        record, _ = self.record()
        same_term = record is not None and (record.token, record.owner) == (old.token,
                                                                             old.owner)
        node.replica.settled(record if same_term and record != old else None)
        self.note(f"{node.name} reread the record: {sorted(record.members) if record else None}")

    def acknowledge(self, node: Node) -> None:
        replica = node.replica
        assert replica is not None
        frontier, reception = replica.advance()
        keep = []
        for batch, end, kind in node.pending:
            gate = frontier if kind == "state" else reception
            if gate is not None and end <= gate:
                self.ack(node, batch, kind)
            else:
                keep.append((batch, end, kind))
        node.pending = keep

    def ack(self, node: Node, batch: int, kind: str) -> None:
        holder = self.ack_tokens.setdefault(node.token, node.name)
        if holder != node.name:
            self.fail(f"token {node.token} acked by {holder} and {node.name}")
        replica = node.replica
        assert replica is not None
        if kind == "reception":
            copies = self.copies_holding(batch, replica.record)
            if copies < self.p.min_insync:
                self.fail(f"batch {batch} answered 250 on {copies} copies")
        self.acked[batch] = (node.token, node.name, kind)
        self.result.acked += 1

    def copies_holding(self, batch: int, rec: SyncRecord) -> int:
        """Members whose copy holds ``batch``; a copy lost with its disk counts if it held
        the batch when it was lost (its ack was true; the owner cannot know yet)."""
        count = 0
        for name, cid in rec.members.items():
            copy = self.nodes[name].copy
            if copy.copy_id == cid:
                count += batch in copy.durable_ids()
            else:
                count += batch in self.lost.get(cid, ())
        return count

    # --- follower ------------------------------------------------------------------------

    def receive(self, node: Node, src: str, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind in ("status", "ack", "nack"):
            self.owner_receive(node, src, msg)
            return
        token = msg[1]
        copy = node.copy
        if token < copy.token or (token == copy.token and node.owner):
            self.send(node.name, src, ("nack", token, "stale", copy.token))
            return
        if token > copy.token:
            if node.owner:
                self.note(f"{node.name} sees newer token {token}: steps down")
                node.step_down()
            copy.token = token  # persisted before anything under it is written
        if kind == "hello":
            self.send(node.name, src, ("status", token, copy.copy_id, copy.infos()))
            return
        if kind == "start":
            _, _, stream, cut = msg
            if cut is not None:
                copy.truncate(cut)
                self.note(f"{node.name} truncated to {cut}")
            node.streams[src] = stream
        elif kind == "append":
            _, _, seq, offset, batch = msg
            if not copy.append(seq, offset, batch):
                self.send(node.name, src, ("nack", token, "position", copy.end))
                return
        if self.rng.random() < 0.6:
            copy.sync()
        self.send(node.name, src, ("ack", token, copy.durable_end, node.streams.get(src, 0)))

    def owner_receive(self, node: Node, src: str, msg: tuple[Any, ...]) -> None:
        replica = node.replica
        if replica is None or msg[1] != node.token:
            return
        link = node.links.get(src)
        if link is None:
            return
        now = self.clock()
        if msg[0] == "status":
            _, _, copy_id, infos = msg
            plan = plan_catch_up(node.copy.infos(), infos)
            stream = replica.connected(src, copy_id, now)
            self.send(node.name, src, ("start", node.token, stream, plan.truncate_to))
            for seq, offset, batch in node.copy.frames_from(plan.resume_from):
                self.send(node.name, src, ("append", node.token, seq, offset, batch))
            link.sent, link.open = node.copy.end, True
        elif msg[0] == "ack":
            replica.acked(src, msg[2], now, msg[3])
        elif msg[2] == "stale":
            self.note(f"{node.name} refused by {src}: token {msg[3]} is newer")
            node.step_down()
        else:  # position mismatch: start that stream again
            self.break_link(node.name, src)

    # --- faults --------------------------------------------------------------------------

    def fault(self) -> None:
        rng = self.rng
        choice = rng.choice(("crash", "restart", "wipe", "stall", "break", "partition",
                             "heal", "etcd_cut", "etcd_heal"))
        node = self.nodes[rng.choice(sorted(self.nodes))]
        if choice in ("crash", "wipe"):
            self.crash(node, wipe=choice == "wipe" and self.may_wipe(node))
        elif choice == "restart" and not node.up:
            node.up = True
            self._grant(node)
        elif choice == "stall":
            node.stalled_until = self.clock() + rng.choice((0.3, 1.0, 2.5, 4.0))
            node.zombie_step = True
        elif choice in ("break", "partition"):
            other = rng.choice([n for n in sorted(self.nodes) if n != node.name])
            if choice == "partition":
                self.cut |= {(node.name, other), (other, node.name)}
            self.break_link(node.name, other)
        elif choice == "heal":
            self.cut.clear()
        elif choice == "etcd_cut":
            self.etcd_cut.add(node.name)
        elif choice == "etcd_heal":
            self.etcd_cut.discard(node.name)
        self.result.faults[choice] = self.result.faults.get(choice, 0) + 1
        self.note(f"fault {choice} {node.name}")

    def crash(self, node: Node, wipe: bool) -> None:
        """SIGKILL (and with ``wipe``, a new empty disk): unsynced bytes may be lost."""
        if not node.up:
            return
        node.up = False
        node.step_down()
        node.txn = node.reread = None
        node.copy.crash(self.rng)
        if wipe:
            self.result.faults["disk_lost"] = self.result.faults.get("disk_lost", 0) + 1
            self.lost[node.copy.copy_id] = node.copy.durable_ids()
            node.copy = Copy(self._copy_id())
        for other in sorted(self.nodes):
            if other != node.name:
                self.break_link(node.name, other)

    def may_wipe(self, node: Node) -> bool:
        """Lose a disk only while every acknowledged batch has another valid copy: the
        promise is to survive ``min_insync - 1`` lost disks, not more."""
        if not self.p.wipes or self.p.min_insync < 2:
            return False
        rec, _ = self.record()
        if rec is None:
            return True
        others = [self.nodes[n].copy.durable_ids() for n, c in rec.members.items()
                  if n != node.name and self.nodes[n].copy.copy_id == c]
        return bool(others) and all(any(b in ids for ids in others) for b in self.acked)

    # --- invariants ----------------------------------------------------------------------

    def check(self) -> None:
        rec, _ = self.record()
        if rec is not None:
            if rec.token < self.record_token:
                self.fail(f"sync record token went back from {self.record_token} to {rec.token}")
            self.record_token = rec.token
            for name, cid in rec.members.items():
                copy = self.nodes[name].copy
                if copy.copy_id != cid:
                    continue
                missing = set(self.acked) - copy.durable_ids()
                if missing:
                    self.fail(f"member {name} lacks acknowledged batches {sorted(missing)[:5]}")
        for node in self.nodes.values():
            if node.copy.token < self.seen_tokens.get(node.copy.copy_id, 0):
                self.fail(f"{node.name}'s followed token went back")
            self.seen_tokens[node.copy.copy_id] = node.copy.token
        self.check_prefixes()

    def check_prefixes(self) -> None:
        copies = [n.copy for n in self.nodes.values()]
        for i, a in enumerate(copies):
            for b in copies[i + 1:]:
                segs = {s.seq: s for s in b.segments}
                for sa in a.segments:
                    sb = segs.get(sa.seq)
                    if sb is None or sb.token != sa.token:
                        continue
                    n = min(len(sa.batches), len(sb.batches))
                    if sa.batches[:n] != sb.batches[:n]:
                        self.fail(f"segment {sa.seq} (token {sa.token}) differs between copies")

    # --- the run -------------------------------------------------------------------------

    def step(self, faults: bool) -> None:
        self.step_no += 1
        self.clock.now += self.p.dt
        if faults and self.rng.random() < self.p.fault_rate:
            self.fault()
        for node in self.nodes.values():
            if node.up and node.stalled_until <= self.clock():
                self.keepalive(node)
        self.etcd.expire()
        self.deliver()
        self.leader()
        for name in sorted(self.nodes, key=lambda _: self.rng.random()):
            node = self.nodes[name]
            if not node.up or node.stalled_until > self.clock():
                continue
            if node.replica is not None:
                self.owner_step(node)
            elif self.rng.random() < 0.5:
                node.copy.sync()
            node.zombie_step = False
        if any(n.replica is not None and not n.replica.accepting for n in self.nodes.values()):
            self.result.read_only_steps += 1
        self.check()

    def heal(self) -> None:
        self.cut.clear()
        self.etcd_cut.clear()
        for node in self.nodes.values():
            node.stalled_until = 0.0
            if not node.up:
                node.up = True
                self._grant(node)

    def run(self) -> Result:
        for _ in range(self.p.steps):
            self.step(faults=True)
        self.heal()
        for i in range(self.p.settle_steps):
            # The last steps without new mail, so every copy can catch up before the end.
            self.quiet = i >= self.p.settle_steps - 40
            self.step(faults=False)
        self.check_settled()
        return self.result

    def check_settled(self) -> None:
        owners = [n for n in self.nodes.values() if n.replica is not None]
        if len(owners) != 1:
            self.fail(f"after healing, {len(owners)} owners")
        owner = owners[0]
        replica = owner.replica
        assert replica is not None
        missing = set(self.acked) - {b for s in owner.copy.segments for b, _ in s.batches}
        if missing:
            self.fail(f"acknowledged batches lost: {sorted(missing)[:5]}")
        if self.p.nodes >= self.p.min_insync and not replica.accepting:
            self.fail(f"after healing the shard is still read-only: {replica.record}")
        # Caught up, every member's copy is the owner's log: byte for byte in every sealed
        # segment, and nothing the owner does not have.
        sealed = [(g.seq, g.token, g.batches) for g in owner.copy.segments[:-1]]
        for name, cid in replica.record.members.items():
            copy = self.nodes[name].copy
            if name == owner.name or copy.copy_id != cid:
                continue
            theirs = [(g.seq, g.token, g.batches) for g in copy.segments]
            if theirs[:len(sealed)] != sealed or len(theirs) > len(sealed) + 1:
                self.fail(f"member {name}'s copy is not the owner's log")


def run(seed: int, params: Params | None = None) -> Result:
    """Run one schedule; raises :class:`Violation` on a broken invariant."""
    return Sim(seed, params or Params()).run()
