"""The in-sync set of one shard, as its owner keeps it: decisions only, no I/O.

The owner feeds in what happened (its own writes and syncs, followers' acks and reports, the
clock, the outcome of its etcd transactions) and reads back what follows: how far the shard is
durable on every copy that may be promoted, whether it may accept new mail, and which change of
the ``sync/<shard>`` record to propose. The same code runs in the node and in the seeded
simulation (tests/replication/sim), so the rules below are tested against thousands of
schedules of crashes and partitions, not only against the schedules a test author thought of.

The rules (docs/replication.md):

- A position is acknowledged (its senders get ``250``) only when it is durable on the owner and
  acked by every member of the committed record **and** by every node whose joining is being
  proposed; and only while the record has at least ``min_insync`` members. STATE and DONE
  records need the first part only: they never need a 250, but a DONE must be on every
  promotable copy before a delivery counts as finished.
- Members are named with the id of their copy (a random id made when a shard directory is
  created): a node whose disk was replaced comes back with another id, is not promotable and
  is not counted, though its node id is in the record.
- Shrink before acknowledging without: a member silent for ``replica_timeout`` is proposed out;
  until the owner's transaction removing it commits, nothing is acknowledged without it.
- Grow only when caught up: a follower is proposed in once it has acked everything
  acknowledged so far; from that proposal on its acks are required, so it holds every
  acknowledged record when the change commits.
- One proposal at a time; the owner's transaction is guarded by its owner key and by the
  record's revision, so a stalled owner whose lease is gone can change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "NOTHING",
    "CatchUp",
    "FollowerView",
    "OwnerReplica",
    "Position",
    "SegmentInfo",
    "SyncRecord",
    "plan_catch_up",
    "promotable",
    "takeover_record",
]

Position = tuple[int, int]  # (segment seq, offset); compares in log order
NOTHING: Position = (0, 0)  # an empty copy: before any segment

# How close behind what is acknowledged (same segment) a follower must be before the owner
# waits for it: it closes the gap in well under replica_timeout.
_JOIN_GAP = 4 << 20


@dataclass(frozen=True)
class SyncRecord:
    """The value of ``sync/<shard>``: the owner's token and the promotable copies."""

    token: int
    owner: str
    members: Mapping[str, str]  # node id -> copy id; the owner is a member

    def encode(self) -> bytes:
        return json.dumps({"token": self.token, "owner": self.owner,
                           "members": dict(sorted(self.members.items()))},
                          separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SyncRecord:
        data = json.loads(raw)
        members = data["members"]
        if not isinstance(members, dict):
            raise ValueError("sync record: members is not a mapping")
        return cls(int(data["token"]), str(data["owner"]),
                   {str(k): str(v) for k, v in members.items()})

    def with_members(self, members: Mapping[str, str]) -> SyncRecord:
        return SyncRecord(self.token, self.owner, dict(members))


def promotable(record: SyncRecord | None, node: str, copy_id: str | None) -> bool:
    """May ``node``, holding the copy ``copy_id``, take the shard over?

    A shard never replicated (no record) may go anywhere, as before replication. Otherwise
    only a member whose copy is the one the record names: every acknowledged record is on it.
    """
    if record is None:
        return True
    return copy_id is not None and record.members.get(node) == copy_id


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a copy: its sequence number, the token in its header, its length."""

    seq: int
    token: int
    size: int


@dataclass(frozen=True)
class CatchUp:
    """What to do with a follower's copy before shipping to it: keep only what lies before
    ``truncate_to`` (None: nothing to cut; ``(seq, 0)`` drops segment ``seq`` and every later
    one), then send from ``resume_from``."""

    truncate_to: Position | None
    resume_from: Position


def plan_catch_up(owner: Sequence[SegmentInfo], follower: Sequence[SegmentInfo]) -> CatchUp:
    """Where a follower's copy parts from the owner's log, and where shipping resumes.

    A new owner always opens a new segment whose header carries its token, so a segment is
    written by one owner: a segment with the same seq and token on both sides holds the same
    bytes up to the shorter end. The follower keeps the longest such common prefix: a segment
    the owner lacks or got from another token, and bytes past the owner's end of a sealed
    segment, were never acknowledged (the owner was a member when they were written and never
    acked them) and are cut (KIP-101's truncation, by segment header instead of epoch list).
    """
    mine = {s.seq: s for s in owner}
    oldest = owner[0].seq if owner else 0
    keep: Position = NOTHING
    for i, seg in enumerate(follower):
        have = mine.get(seg.seq)
        if have is None and seg.seq < oldest:
            continue  # compacted away on the owner: dead there too, a drop will follow
        if have is None or have.token != seg.token:
            return CatchUp((seg.seq, 0), keep)
        if seg.size > have.size:
            return CatchUp((seg.seq, have.size), (seg.seq, have.size))
        keep = (seg.seq, seg.size)
        if seg.size < have.size:
            # A prefix of the owner's segment: anything the follower has after it came
            # from another owner.
            later = follower[i + 1:]
            return CatchUp((later[0].seq, 0) if later else None, keep)
    if keep == NOTHING and follower:
        # All it has was compacted away here: start it afresh, a full copy.
        return CatchUp((follower[0].seq, 0), NOTHING)
    return CatchUp(None, keep)


@dataclass
class FollowerView:
    """What the owner knows of one follower's copy."""

    copy_id: str | None = None
    acked: Position = NOTHING  # durable on the follower, as it last said
    last_seen: float = float("-inf")
    connected: bool = False
    # Numbers each catch-up plan sent to the follower; an ack counts only if it echoes the
    # current one, so an ack of bytes the plan then cut can never be taken for our bytes.
    stream: int = 0
    # Joining: once it is close behind what is acknowledged, its acks are required
    # (``joining``, since when) so acknowledgements stop outrunning it, and it joins as soon
    # as it has everything acknowledged; after a failed try, not again before ``rejoin``.
    joining: float | None = None
    rejoin: float = float("-inf")


@dataclass
class OwnerReplica:
    """The owner's side of one shard's replication. Feed events in, read decisions out."""

    node: str
    copy_id: str
    record: SyncRecord
    min_insync: int
    replica_timeout: float
    written: Position = NOTHING  # written locally (and so shipped)
    durable: Position = NOTHING  # fdatasynced locally
    followers: dict[str, FollowerView] = field(default_factory=dict)
    proposed: SyncRecord | None = None  # a record change whose transaction is in flight
    acknowledged: Position = NOTHING  # the furthest position ever handed out by advance()
    # Where the owner's log starts now: segments before it were dead and are deleted.
    floor: Position = NOTHING

    # --- events ------------------------------------------------------------------------------

    def begin(self, end: Position, now: float) -> None:
        """A new term: the log recovered up to ``end``, the members not heard from yet.

        Everything in the log may have been acknowledged by an earlier owner, so a follower
        joins only once it has all of it; and members get ``replica_timeout`` to answer
        before they count as silent (else a takeover would drop live copies at once).
        """
        self.written = max(self.written, end)
        self.durable = max(self.durable, end)
        self.acknowledged = max(self.acknowledged, end)
        for node in self.record.members:
            if node != self.node:
                self.followers.setdefault(node, FollowerView(last_seen=now))

    def wrote(self, end: Position) -> None:
        """The local log was written up to ``end`` and the bytes were handed to followers."""
        self.written = max(self.written, end)

    def synced(self, end: Position) -> None:
        """The local log is durable up to ``end``."""
        self.durable = max(self.durable, end)

    def connected(self, node: str, copy_id: str, now: float) -> int:
        """``node`` answered our hello with its copy's id; returns the stream number the
        catch-up plan sent to it carries and its acks must echo."""
        view = self.followers.setdefault(node, FollowerView())
        if view.copy_id != copy_id:
            view.acked = NOTHING  # another disk: nothing it said before holds
        view.copy_id, view.connected, view.last_seen = copy_id, True, now
        view.stream += 1
        view.joining = None
        return view.stream

    def disconnected(self, node: str) -> None:
        if (view := self.followers.get(node)) is not None:
            view.connected, view.joining = False, None

    def acked(self, node: str, position: Position, now: float, stream: int) -> None:
        """``node`` says its copy is durable up to ``position`` (cumulative), having applied
        catch-up plan ``stream``."""
        view = self.followers.get(node)
        if view is None or not view.connected:
            return
        view.last_seen = now
        if stream != view.stream:
            return  # said before it applied the current plan: may name bytes it then cut
        view.acked = max(view.acked, position)

    def heard(self, node: str, now: float) -> None:
        """Any frame from ``node``: it is alive, whatever it acked."""
        if (view := self.followers.get(node)) is not None and view.connected:
            view.last_seen = now

    def compacted(self, floor: Position) -> None:
        """The log's dead head was deleted: it starts at ``floor`` now."""
        self.floor = max(self.floor, floor)

    def settled(self, committed: SyncRecord | None) -> None:
        """The proposal's transaction finished: ``committed`` is the record now in etcd
        (None: it failed; the record is unchanged as far as we know)."""
        if committed is not None:
            self.record = committed
        self.proposed = None
        for node in self.record.members:
            if (view := self.followers.get(node)) is not None:
                view.joining = None  # a member now: required as one

    # --- decisions ---------------------------------------------------------------------------

    def _required(self) -> set[str]:
        """The nodes whose acks a position needs: members now, and whoever is being added
        (a removal counts only once it has committed)."""
        need = set(self.record.members)
        if self.proposed is not None:
            need |= set(self.proposed.members)
        need |= {n for n, v in self.followers.items() if v.joining is not None}
        need.discard(self.node)
        return need

    def _ack_of(self, node: str) -> Position:
        # A follower that disconnected still has on disk what it acked: only another copy
        # (a replaced disk) loses it.
        view = self.followers.get(node)
        if view is None:
            return NOTHING
        expected = (self.proposed.members.get(node) if self.proposed is not None
                    and node in self.proposed.members else self.record.members.get(
                        node, view.copy_id if view.joining is not None else None))
        if view.copy_id != expected:
            return NOTHING  # a replaced disk: its acks do not make the old copy
        return view.acked

    @property
    def frontier(self) -> Position:
        """Everything up to here is durable on the owner and every promotable copy."""
        pos = self.durable
        for node in self._required():
            pos = min(pos, self._ack_of(node))
        return pos

    @property
    def accepting(self) -> bool:
        """May new mail be acknowledged into this shard? Only while the committed record
        names ``min_insync`` copies; below that the shard is read-only (``451``)."""
        return len(self.record.members) >= self.min_insync

    def advance(self) -> tuple[Position, Position | None]:
        """What may be acknowledged now: up to where STATE and DONE records are safe, and up
        to where new mail may be answered ``250`` (None: the shard is read-only). The owner
        calls this when it acknowledges; what it returns is remembered, so a follower
        joining later is measured against everything ever acknowledged."""
        pos = self.frontier
        self.acknowledged = max(self.acknowledged, pos)
        return pos, (pos if self.accepting else None)

    def proposal(self, now: float, placed: Collection[str] = (),
                 replicas: int = 0) -> SyncRecord | None:
        """The record change to propose now, if any (one at a time): drop a member that is
        silent or lost its disk, else one the leader no longer places (``placed``: the
        followers of the current placement; empty: unknown) while more than ``replicas``
        copies are in the set without it, else add a (placed) follower that caught up."""
        if self.proposed is not None:
            return None
        members = dict(self.record.members)
        for node, copy_id in sorted(members.items()):
            if node == self.node:
                continue
            view = self.followers.get(node)
            silent = view is None or now - view.last_seen > self.replica_timeout
            replaced = view is not None and view.copy_id is not None and view.copy_id != copy_id
            if silent or replaced:
                del members[node]
                return self._propose(members)
        if (extra := self._unplaced(members, placed, replicas)) is not None:
            del members[extra]
            return self._propose(members)
        acknowledged = max(self.acknowledged, self.frontier)
        if acknowledged < self.floor:
            # Everything acknowledged so far sat in segments since deleted (all of it dead,
            # delivered): a copy has it all once it holds what the log has now, from the
            # floor on; and from its joining its acks are required.
            acknowledged = NOTHING
        for node, view in sorted(self.followers.items()):
            if node in members or not view.connected or view.copy_id is None:
                continue
            if placed and node not in placed:
                # Streamed to until the placement's change reaches us: not added, and a join
                # it had begun is off (acknowledgements must not wait for it any more).
                view.joining = None
                continue
            fresh = now - view.last_seen <= self.replica_timeout
            # It has everything acknowledged so far, and from the proposal on its acks are
            # required: when the change commits it holds every acknowledged record.
            if view.acked >= acknowledged and fresh:
                members[node] = view.copy_id
                return self._propose(members)
            self._join_step(view, acknowledged, now, fresh)
        return None

    def _join_step(self, view: FollowerView, acknowledged: Position, now: float,
                   fresh: bool) -> None:
        """Under steady writes what is acknowledged moves on with every batch the other
        copies ack: a follower a little behind would never have it all. Once it is within
        :data:`_JOIN_GAP` of it, require its acks (acknowledgements wait for it, and it
        catches up); if it does not within replica_timeout, stop, and try again later."""
        if view.joining is None:
            close = (view.acked[0] == acknowledged[0]
                     and acknowledged[1] - view.acked[1] <= _JOIN_GAP)
            if fresh and close and now >= view.rejoin:
                view.joining = now
        elif now - view.joining > self.replica_timeout or not fresh:
            # Slower than the writes: stop holding acknowledgements for it a while (a slow
            # disk must not stall the owner again and again).
            view.joining, view.rejoin = None, now + 2 * self.replica_timeout

    def _unplaced(self, members: Mapping[str, str], placed: Collection[str],
                  replicas: int) -> str | None:
        """A member to prune: a move or a replacement left an extra copy in the set (the
        node the shard moved from, a follower replaced by one that has caught up). Never
        below ``replicas``, so the copies in sync do not dip while placement changes."""
        if not placed or not replicas or len(members) <= replicas:
            return None
        return next((n for n in sorted(members) if n != self.node and n not in placed), None)

    def _propose(self, members: dict[str, str]) -> SyncRecord:
        self.proposed = self.record.with_members(members)
        return self.proposed

    def forget(self, node: str) -> None:
        """``node`` is no longer streamed to (the placement dropped it and it is no member):
        a join it had begun is abandoned, since no ack of it will come."""
        view = self.followers.get(node)
        if view is not None:
            view.joining = None
        if node not in self._required():
            self.followers.pop(node, None)

    def lagging(self) -> dict[str, Position]:
        """Followers and how far they have acked, for status and metrics."""
        return {n: v.acked for n, v in sorted(self.followers.items())}


def takeover_record(previous: SyncRecord | None, node: str, copy_id: str, token: int,
                    live: Iterable[str]) -> SyncRecord:
    """The record a new owner writes when it claims the shard: itself as owner, and of the
    previous members those still alive (a dead one would only hold acks back until it timed
    out; it rejoins by catching up)."""
    alive = set(live)
    members = {node: copy_id}
    if previous is not None:
        for member, copy in previous.members.items():
            if member != node and member in alive:
                members[member] = copy
    return SyncRecord(token, node, members)
