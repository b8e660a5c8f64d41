"""The replicated spool across a network the test controls, with real node processes on a
real etcd, each node its own spool directory: n2's replication listener sits behind a TCP
proxy (tests/support/netproxy.py) that delays, drops or blackholes what owners send to it and
what it answers; and a new node with an empty spool joins a loaded cluster.

Only the owners' channel to n2 goes through the proxy: n2's lease, its clients and its own
channel to n1 (for the shards it owns) are untouched, a partial partition.

The partition tests share one such cluster per min_insync (a class each): each test heals
what it broke, and the next starts only once every shard is on both copies again, with new
clients and the sink closed, as on a fresh cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.spool.recovery import recover_shard
from mta.spool.segment import list_segments, segment_path
from mta.spool.shard import shard_dir
from tests.support import EtcdServer, free_port
from tests.support import wait_until_sync as _poll
from tests.support.cluster import SHARDS, Cluster, Replicated, Reply, Submitter, replicated
from tests.support.netproxy import NetProxy

REPLICA_TIMEOUT = 1.0
# Shrinking every shard n1 owns is 32 etcd transactions: on a loaded 2-core machine that
# takes a few replica_timeouts (about 1.2 s when idle: the test prints it).
SHRINK_WITHIN = 10.0
REJOIN_WITHIN = 15.0
# The new node's link is this much slower than the others, so that a copy let into the
# in-sync set before it caught up is seen lacking; longer than the time between two writes
# of a shard, so it joins only because the owner waits for a joiner close behind
# (mta.replication.insync _JOIN_GAP).
JOIN_DELAY = 0.2


def _replicated(tmp_path: Path, etcd: EtcdServer, **kw: object) -> Any:
    return replicated(tmp_path, etcd, replica_timeout=f"{REPLICA_TIMEOUT:g}s", **kw)


def _start_behind_proxy(run: Replicated) -> NetProxy:
    """Start n1 and n2 with n2's replication listener behind a proxy (closed with the run);
    return the proxy once every shard is on both copies."""
    listen = free_port()
    proxy = NetProxy(listen).start()
    run.cleanups.append(proxy.close)
    run.c.start_replicated(["n1", "n2"], copies=2, n2={
        "replication_listen": f"127.0.0.1:{listen}", "replication_advertise": proxy.address})
    return proxy


@contextlib.contextmanager
def _behind_proxy(tmp_path: Path, etcd: EtcdServer,
                  min_insync: int) -> Iterator[tuple[Replicated, NetProxy]]:
    """n1 and n2 (replicas 2) with n2's replication listener behind a proxy, for a class of
    tests to share: each test heals what it broke and waits until it is whole again."""
    with _replicated(tmp_path, etcd, replicas=2, min_insync=min_insync) as run:
        yield run, _start_behind_proxy(run)


@contextlib.contextmanager
def _turn(shared: tuple[Replicated, NetProxy]) -> Iterator[tuple[Replicated, NetProxy]]:
    """One test's turn on a shared cluster: it starts as a fresh one would, every shard on
    both copies (what the test before it left, once healed), with no clients and the sink
    closed; the proxy passes everything again on the way out."""
    base, proxy = shared
    with base.round() as run:
        try:
            proxy.heal()
            _poll(lambda: len(m := run.c.members()) == SHARDS
                  and all(v == {"n1", "n2"} for v in m.values()), 30,
                  "every shard on both copies")
            yield run, proxy
        finally:
            proxy.heal()


def _owned_by(c: Cluster, node: str) -> set[int]:
    return {s for s, o in c.state()["owner"].items() if o == node}


def _ok_on(sub: Submitter, shards: set[int], since: float) -> list[Reply]:
    return [r for r in sub.ok(since) if r.shard in shards]


def _insync_changes(log: str) -> set[int]:
    """The shards whose in-sync set the node's log says it changed."""
    out = set()
    for line in log.splitlines():
        if "replication.insync_change" in line:
            out.add(int(json.loads(line)["shard"]))
    return out


# --- partitions between owner and follower ------------------------------------------------------


def _partition(proxy: NetProxy, mode: str) -> None:
    if mode == "blackhole":
        proxy.blackhole()  # silent, and the connections through it stay dead after the heal
    elif mode == "blackhole-hold":
        proxy.blackhole(hold=True)  # silent; what was sent flows after the heal (TCP resends)
    elif mode == "drop":
        proxy.drop()  # every connection reset, new ones too
    else:  # a follower far slower than replica_timeout: each ack comes 2 x 2.5 s late
        proxy.delay(2.5 * REPLICA_TIMEOUT)


@pytest.fixture(scope="class")
def min1(tmp_path_factory: pytest.TempPathFactory,
         etcd: EtcdServer) -> Iterator[tuple[Replicated, NetProxy]]:
    """The cluster of a class: replicas 2, min_insync 1."""
    with _behind_proxy(tmp_path_factory.mktemp("min1"), etcd, min_insync=1) as shared:
        yield shared


@pytest.mark.slow
class TestMinInsyncOne:
    """replicas 2, min_insync 1: one cluster for the class, n2's replication behind a proxy."""

    @pytest.mark.parametrize("mode", [
        "blackhole", "blackhole-hold", "drop", "delay"])
    def test_partitioned_follower_leaves_the_insync_set_then_catches_up_and_rejoins(
            self, min1: tuple[Replicated, NetProxy], mode: str) -> None:
        """replicas 2, min_insync 1. n1 drops the cut-off n2 from the in-sync sets of its shards
        within about replica_timeout and keeps answering 250 on them, without waiting for n2;
        n2's own shards keep both copies. After the heal n2 catches up and rejoins; every
        acknowledged message is delivered, none twice."""
        with _turn(min1) as (run, proxy):
            c, acked, subs = run.c, run.acked, run.subs
            cut = _owned_by(c, "n1")  # n1 ships these to n2 through the proxy
            theirs = _owned_by(c, "n2")  # n2 ships these to n1 directly
            assert cut and theirs, c.state()["owner"]
            run.submit("n1", "n2")
            _poll(lambda: len(_ok_on(subs[0], cut, 0)) >= 10, 15, "250s from n1")
            _partition(proxy, mode)
            t_cut = time.monotonic()
            try:
                _poll(lambda: all(m[s] == {"n1"} for m in [c.members()] for s in cut),
                      SHRINK_WITHIN, f"n2 out of the in-sync sets of n1's shards ({mode})")
                t_drop = time.monotonic()
                members = c.members()
                assert all(members[s] == {"n1", "n2"} for s in theirs), members
                # n1 keeps acknowledging on its shards, without waiting for the cut follower
                # (its acks, if any get through, come 5 s late with the delay).
                _poll(lambda: len(_ok_on(subs[0], cut, t_drop)) >= 5, 15,
                      f"250s from n1 after the shrink ({mode})")
                _poll(lambda: len(_ok_on(subs[1], theirs, t_drop)) >= 5, 15,
                      f"250s from n2 after the shrink ({mode})")
                slow = [r for r in _ok_on(subs[0], cut, t_drop)
                        if r.done - r.sent >= 2.5 * REPLICA_TIMEOUT]
                assert not slow, slow[:3]
            finally:
                proxy.heal()
            t_heal = time.monotonic()
            _poll(lambda: all(m[s] == {"n1", "n2"} for m in [c.members()] for s in cut),
                  REJOIN_WITHIN, f"n2 back in the in-sync sets of n1's shards ({mode})")
            t_rejoin = time.monotonic()
            _poll(lambda: len(_ok_on(subs[0], cut, t_rejoin)) >= 3, 15,
                  "250s from n1 after the heal")
            run.deliver_all()
            print(f"partition ({mode}): {len(acked)} acked, n2 out of {len(cut)} in-sync sets "
                  f"{t_drop - t_cut:.2f}s after the cut, back {t_rejoin - t_heal:.2f}s after the "
                  f"heal; proxy accepted {proxy.accepted}, reset {proxy.reset}, lost {proxy.lost} "
                  f"bytes; total {run.elapsed():.1f}s")

    def test_follower_slower_than_the_network_but_within_replica_timeout_holds_every_250(
            self, min1: tuple[Replicated, NetProxy]) -> None:
        """A delay below replica_timeout on the channel to n2: n2 stays in the in-sync sets of
        n1's shards, and every 250 on them waits for n2's ack, a round trip through the delay."""
        delay = 0.15
        with _turn(min1) as (run, proxy):
            c, subs = run.c, run.subs
            cut = _owned_by(c, "n1")
            run.submit("n1")
            _poll(lambda: len(subs[0].ok()) >= 5, 15, "250s from n1")
            log_from = len(c.nodes["n1"].log())
            proxy.delay(delay)
            t_delay = time.monotonic()
            _poll(lambda: len(_ok_on(subs[0], cut, t_delay)) >= 15, 20, "250s through the delay")
            members = c.members()
            assert all("n2" in members[s] for s in cut), members
            # A shard whose set changed meanwhile (a shrink under heavy load) may answer without
            # n2 for a while: only the others are judged, and most must be.
            changed = _insync_changes(c.nodes["n1"].log()[log_from:])
            judged = _ok_on(subs[0], cut - changed, t_delay)
            assert len(judged) >= 10, (len(judged), sorted(changed))
            fast = [r for r in judged if r.done - r.sent < 2 * delay]
            assert not fast, fast[:3]
            proxy.heal()
            run.deliver_all()
            latency = sorted(r.done - r.sent for r in judged)
            print(f"delay {delay}s: {len(judged)} 250s judged, latency min {latency[0]:.3f}s "
                  f"median {latency[len(latency) // 2]:.3f}s, in-sync changes on "
                  f"{len(changed)} shards; total {run.elapsed():.1f}s")


@pytest.fixture(scope="class")
def min2(tmp_path_factory: pytest.TempPathFactory,
         etcd: EtcdServer) -> Iterator[tuple[Replicated, NetProxy]]:
    """The cluster of a class: replicas = min_insync = 2."""
    with _behind_proxy(tmp_path_factory.mktemp("min2"), etcd, min_insync=2) as shared:
        yield shared


@pytest.mark.slow
class TestMinInsyncTwo:
    """replicas = min_insync = 2: one cluster for the class, n2's replication behind a proxy."""

    @pytest.mark.parametrize("hold", [
        pytest.param(False, id="blackhole"), pytest.param(True, id="blackhole-hold")])
    def test_blackholed_follower_with_min_insync_all_answers_451_never_250_then_recovers(
            self, min2: tuple[Replicated, NetProxy], hold: bool) -> None:
        """replicas = min_insync = 2, the owners' channel to n2 blackholed: n1's shards (all
        followed by n2) answer 451, and never 250 for a message that reached only n1's disk,
        until the heal; n2's shards (followed by n1, not cut) keep taking mail all along."""
        with _turn(min2) as (run, proxy):
            acked, subs = run.acked, run.subs
            run.submit("n1", "n2")
            _poll(lambda: all(len(s.ok()) >= 10 for s in subs), 15, "250s from both")
            proxy.blackhole(hold=hold)
            t_cut = time.monotonic()
            try:
                _poll(lambda: sum(r.code == 451 and r.sent >= t_cut
                                  for r in subs[0].replies) >= 3, SHRINK_WITHIN, "451s from n1")
                t_451 = time.monotonic()
                _poll(lambda: len(subs[1].ok(t_451)) >= 5, 15, "250s from n2 meanwhile")
            finally:
                proxy.heal()
            t_heal = time.monotonic()
            _poll(lambda: len(subs[0].ok(t_heal)) >= 5, REJOIN_WITHIN,
                  "250s from n1 after the heal")
            t_back = time.monotonic()
            # Nothing n1 received after the cut reached n2 before the heal: no 250 for any of it.
            bad = [r for r in subs[0].ok(t_cut) if r.done < t_heal]
            assert not bad, bad[:5]
            refused = [r for r in subs[0].replies if t_cut <= r.sent and r.done < t_heal]
            assert all(r.code == 451 and r.text.startswith(b"4.3.0") for r in refused), refused[:5]
            run.deliver_all()
            print(f"blackhole (hold={hold}), min_insync 2: {len(acked)} acked, first 451s "
                  f"{t_451 - t_cut:.2f}s after the cut, {len(refused)} refused, 250s again "
                  f"{t_back - t_heal:.2f}s after the heal; total {run.elapsed():.1f}s")


# --- a new node joins ---------------------------------------------------------------------------


def _log_differs(copy: Path, log: Path) -> str | None:
    """How the shard directory ``copy`` is not a byte prefix of the live log ``log`` (the
    same segments, each the log's bytes up to the copy's length, the newest possibly
    shorter); None when it is. ``log`` is read after ``copy``: it only grows at its end,
    and loses head segments to compaction (the copy then still has them until the owner's
    drop reaches it)."""
    copied = {seq: segment_path(copy, seq).read_bytes() for seq in list_segments(copy)}
    owned = list_segments(log)
    if owned:
        copied = {seq: data for seq, data in copied.items() if seq >= owned[0]}
    if not copied:
        return None  # a prefix of anything (whether it lacks acknowledged mail: missing())
    if sorted(copied) != [seq for seq in owned if seq <= max(copied)]:
        return f"segments {sorted(copied)}, the owner's {owned}"
    for seq, data in copied.items():
        try:
            theirs = segment_path(log, seq).read_bytes()
        except FileNotFoundError:
            continue  # compacted away meanwhile
        if theirs[:len(data)] != data:
            return f"segment {seq}: its {len(data)} bytes differ from the owner's"
    return None


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy a live shard directory, oldest segment first. A head segment that vanishes
    meanwhile was dropped after compaction moved its live records to the tail, which is
    copied after it."""
    dst.mkdir(parents=True)
    for name in sorted(os.listdir(src)):
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(src / name, dst / name)


class Snapshots:
    """Copies of a node's shard directories taken the moment it is first seen in their
    in-sync sets as a follower, each compared with its owner's live log."""

    def __init__(self, c: Cluster, node: str, where: Path) -> None:
        self.c, self.node, self.where = c, node, where
        self.seen: dict[int, float] = {}  # shard -> when it was seen in sync (before the read)
        self.differs: dict[int, str] = {}

    def _read(self) -> tuple[dict[int, set[str]], dict[int, tuple[str, int]], set[int]]:
        """One etcd read: in-sync sets, owner keys (node, create revision), and the shards
        whose followers the leader places on ``node``."""
        members: dict[int, set[str]] = {}
        owners: dict[int, tuple[str, int]] = {}
        placed: set[int] = set()
        for key, (value, rev) in self.c.etcd.get_prefix(self.c.prefix).items():
            kind, _, shard = key[len(self.c.prefix):].partition("/")
            if kind == "sync":
                members[int(shard)] = set(json.loads(value)["members"])
            elif kind == "owner":
                owners[int(shard)] = (value.decode(), rev)
            elif kind == "replicas" and self.node in json.loads(value):
                placed.add(int(shard))
        return members, owners, placed

    def take(self) -> tuple[dict[int, set[str]], set[int]]:
        """Snapshot every shard ``node`` newly joined as a follower; the in-sync sets and the
        shards placed on ``node``, as read."""
        t = time.monotonic()
        members, owners, placed = self._read()
        new = {s: owners[s] for s, names in members.items()
               if self.node in names and s not in self.seen and s in owners
               and owners[s][0] != self.node}
        for shard in new:  # copy first, compare after: the owner's log only grows
            self.seen[shard] = t
            _copy_dir(shard_dir(self.c.spool_of(self.node), shard), self._path(shard))
        differs = {s: d for s, (owner, _rev) in new.items()
                   if (d := _log_differs(self._path(s), shard_dir(self.c.spool_of(owner), s)))}
        if differs:
            now = self._read()[1]
            # A claim meanwhile (n3 taking the shard over) moves the logs on: no verdict.
            self.differs |= {s: d for s, d in differs.items() if now.get(s) == new[s]}
        return members, placed

    def _path(self, shard: int) -> Path:
        return self.where / f"shard-{shard}"

    def missing(self, replies: list[Reply]) -> dict[int, list[str]]:
        """Per snapshot, the messages acknowledged before it was taken that it lacks."""
        out = {}
        for shard, t in self.seen.items():
            index, _ = recover_shard(self._path(shard), shard)
            want = {r.queue_id for r in replies if r.shard == shard and r.done < t}
            if lost := sorted(want - set(index.messages)):
                out[shard] = lost
        return out


@pytest.mark.slow
def test_new_empty_node_gets_copies_rebuilt_and_joins_the_insync_sets(
        tmp_path: Path, etcd: EtcdServer) -> None:
    """Two nodes with a backlog (the sink defers everything); a third starts with an empty
    spool while the load goes on, over a slow link (its replication listener behind a proxy
    adding a delay). The leader places copies on it; the owners rebuild them (a full copy
    each) and it joins those shards' in-sync sets only once caught up: a snapshot of each copy
    taken the moment it is seen in sync is byte for byte a prefix of the owner's log and holds
    every message acknowledged before. Shards the leader then moves to it are claimed, and
    every acknowledged message is delivered exactly once."""
    with _replicated(tmp_path, etcd, replicas=2) as run:
        c, acked, subs = run.c, run.acked, run.subs
        listen = free_port()
        proxy = NetProxy(listen).start()
        run.cleanups.append(proxy.close)
        proxy.delay(JOIN_DELAY)
        snaps = Snapshots(c, "n3", tmp_path / "snapshots")
        c.start_replicated(["n1", "n2"], copies=2)
        run.submit("n1", "n2")
        _poll(lambda: all(len(s.ok()) >= 30 for s in subs), 20, "a backlog on both")
        assert not c.spool_of("n3").exists()
        t_start = time.monotonic()
        c.start_node("n3", replication_listen=f"127.0.0.1:{listen}",
                     replication_advertise=proxy.address)
        placed = _poll(lambda: {s for s, f in c.placement().items() if "n3" in f}, 20,
                       "n3 placed as a follower")

        def joined() -> set[int] | None:
            members, now = snaps.take()
            return now if now and all("n3" in members[s] for s in now) else None

        try:
            insync = _poll(joined, 40, "n3 in the in-sync set of every shard placed on it")
        except AssertionError as exc:
            members, now = snaps.take()
            owners = c.state()["owner"]
            raise AssertionError(f"{exc}: " + ", ".join(
                f"{s}: owner {owners.get(s)} members {sorted(members.get(s, ()))}"
                for s in sorted(now) if "n3" not in members.get(s, ()))) from None
        t_insync = time.monotonic()
        assert not snaps.differs, snaps.differs
        replies = [r for s in subs for r in s.ok()]
        assert not (missing := snaps.missing(replies)), missing
        checked = {s for s, t in snaps.seen.items()
                   if any(r.shard == s and r.done < t for r in replies)}
        assert checked, (snaps.seen, insync)  # a copy that got no mail proves little
        # In sync, n3 may be given shards (balancing): it claims them, and every
        # acknowledged message is still delivered, once.
        run.submit("n3")
        try:
            mine = _poll(lambda: {s for s, n in c.state()["assign"].items() if n == "n3"},
                         15, "shards assigned to n3")
        except AssertionError:
            mine = set()  # not balanced onto the new node (yet): not this test's subject
        if mine:
            _poll(lambda: all(c.state()["owner"].get(s) == "n3" for s in mine), 20,
                  f"n3 claims the {len(mine)} shards assigned to it")
        run.deliver_all()
        print(f"new node: placed on {len(placed)} shards, in sync on {len(insync)} "
              f"{t_insync - t_start:.2f}s after its start, {len(checked)} copies checked "
              f"when seen in sync, assigned {len(mine)} shards, {len(acked)} acked, "
              f"total {run.elapsed():.1f}s")
