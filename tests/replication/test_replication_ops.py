"""Operating a replicated spool: the metrics, the read-only / writable log lines, and what
``/api/v1/shards`` and ``mtactl shards`` show of followers, in-sync sets and lag.

The metrics and log lines are checked on the real parts in one process (an owner side on a
real spool, a follower node over loopback: tests/support/replication.py); the shard table on
the coordinator over the in-memory store, and its rendering as a unit.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from harness.config import make_config
from mta.admin.facade import NodeFacade
from mta.admin.routes.cluster import shard_table
from mta.admin.server import AdminServer
from mta.cli.ctl.shards import _follower_lag, render
from mta.coordinator import Member, ShardInfo
from mta.gauges import ReplicationGauges
from mta.metrics import NodeMetrics
from mta.node import Node
from mta.replication.copy import log_segments
from mta.replication.insync import NOTHING, SyncRecord
from mta.replication.lag import WriteMarks
from mta.replication.owner import OwnerSide, lag_bytes, shard_state
from mta.replication.peerauth import PeerAuth
from mta.spool.shard import shard_dir
from tests.support import wait_until
from tests.support.memcluster import CopyHost as Host
from tests.support.memcluster import ReplicatedMem as MemWorld
from tests.support.memcluster import settled_replicated as settled
from tests.support.replication import (
    SECRET,
    FollowerNode,
    MemorySyncStore,
    Pair,
    Peers,
    envelope,
    open_owner,
    start_pair,
)

TIMEOUT = 0.4  # replica_timeout
# The test that waits out replica_timeouts on purpose runs on uvloop only (the loop a node
# picks when it is installed); the others here check the same gauges on both loops.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


@dataclass
class Ops(Pair):
    """The pair, with the owner's metrics."""

    registry: CollectorRegistry

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def restart_follower(self, port: int) -> None:
        self.follower = await FollowerNode("b", self.tmp / "b").start(self.peers, port)


async def _ops(tmp: Path, min_insync: int) -> Ops:
    metrics = NodeMetrics()
    pair = await start_pair(tmp, min_insync, TIMEOUT, events=metrics.replication())
    metrics.registry.register(ReplicationGauges("a", pair.side, 2))
    return Ops(pair.tmp, pair.peers, pair.store, pair.spool, pair.side, pair.follower,
               metrics.registry)


@pytest.fixture
async def ops2(tmp_path: Path) -> AsyncIterator[Ops]:
    """replicas = 2, min_insync = 2."""
    w = await _ops(tmp_path, 2)
    yield w
    await w.close()


@pytest.fixture
async def ops1(tmp_path: Path) -> AsyncIterator[Ops]:
    """replicas = 2, min_insync = 1: the shard keeps taking mail on the owner alone."""
    w = await _ops(tmp_path, 1)
    yield w
    await w.close()


def _events(logs: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] in names]


def _states(w: Ops) -> dict[str, float | None]:
    return {s: w.value("mta_replication_shards", state=s)
            for s in ("in_sync", "under_replicated", "read_only")}


@ONE_LOOP
async def test_metrics_and_log_lines_follow_a_shard_to_read_only_and_back(ops2: Ops) -> None:
    w = ops2
    # Every known label exported at 0 before anything happened.
    for change in ("grow", "shrink"):
        assert w.value("mta_replication_insync_changes_total", change=change) == 0
    for reason in ("stale", "position", "owner", "broken", "other"):
        assert w.value("mta_replication_refused_total", reason=reason) == 0
    assert _states(w) == {"in_sync": 0, "under_replicated": 0, "read_only": 0}
    with capture_logs() as logs:
        # Opened with the owner alone in the in-sync set: below min_insync, read-only.
        await open_owner(w.spool, w.side, w.store, 0, 10, ["b"])
        assert _states(w) == {"in_sync": 0, "under_replicated": 0, "read_only": 1}
        await wait_until(lambda: w.members() == {"a", "b"}, what="b joined")
        await wait_until(lambda: _states(w)["in_sync"] == 1, what="in sync")
        assert w.value("mta_replication_insync_changes_total", change="grow") == 1
        assert w.value("mta_replication_followers_connected") == 1
        await asyncio.gather(*(w.spool.submit(envelope(n), b"x" * 500) for n in range(5)))
        await wait_until(lambda: w.value("mta_replication_follower_lag_bytes", peer="b") == 0,
                         what="b acked everything")
        port = w.peers.addresses["b"][1]
        await w.follower.stop()
        await wait_until(lambda: w.members() == {"a"}, what="b dropped")
        await wait_until(lambda: _states(w)["read_only"] == 1, what="read-only again")
        assert w.value("mta_replication_insync_changes_total", change="shrink") == 1
        await wait_until(lambda: w.value("mta_replication_followers_connected") == 0,
                         what="link down")
        await asyncio.sleep(4 * TIMEOUT)  # many ticks: no more log lines
        lines = _events(logs, "replication.shard_read_only", "replication.shard_writable")
        assert [e["event"] for e in lines] == ["replication.shard_read_only",
                                               "replication.shard_writable",
                                               "replication.shard_read_only"]
        assert lines[0] == {"event": "replication.shard_read_only", "log_level": "warning",
                            "node_id": "a", "shard": 0, "members": ["a"], "min_insync": 2}
        assert lines[1]["members"] == ["a", "b"] and lines[1]["log_level"] == "info"
        assert lines[2]["members"] == ["a"]
        await w.restart_follower(port)
        await wait_until(lambda: _states(w)["in_sync"] == 1, what="b caught up and rejoined")
        assert w.value("mta_replication_insync_changes_total", change="grow") == 2
        lines = _events(logs, "replication.shard_read_only", "replication.shard_writable")
        assert lines[-1]["event"] == "replication.shard_writable" and len(lines) == 4


async def test_lag_is_the_bytes_a_stopped_follower_lacks_across_segments(ops1: Ops) -> None:
    w = ops1
    rep = await open_owner(w.spool, w.side, w.store, 0, 10, ["b"])
    await wait_until(lambda: w.members() == {"a", "b"}, what="b joined")
    assert _states(w) == {"in_sync": 1, "under_replicated": 0, "read_only": 0}
    await asyncio.gather(*(w.spool.submit(envelope(n), b"x" * 300) for n in range(3)))
    await wait_until(lambda: w.value("mta_replication_follower_lag_bytes", peer="b") == 0,
                     what="b acked everything")
    await w.follower.stop()
    await wait_until(lambda: w.members() == {"a"}, what="b dropped")
    # Still takes mail (min_insync 1), on fewer copies than planned.
    assert _states(w) == {"in_sync": 0, "under_replicated": 1, "read_only": 0}
    acked = tuple(rep.status()["followers"]["b"]["acked"])  # type: ignore[index]
    for first in range(0, 40, 5):
        await asyncio.gather(*(w.spool.submit(envelope(n), b"y" * 700)
                               for n in range(first, first + 5)))
    segs = log_segments(shard_dir(w.spool.root, 0))
    assert segs[-1][0] > acked[0] + 1, "the log rolled over segments since b's ack"
    expected = sum(size for seq, _, size in segs if seq > acked[0])
    expected += next(size for seq, _, size in segs if seq == acked[0]) - acked[1]
    assert w.value("mta_replication_follower_lag_bytes", peer="b") == expected
    lag = rep.status()["followers"]["b"]  # type: ignore[index]
    assert lag["lag_bytes"] == expected
    # 40 messages, each a MSG record, in batches that each end with a COMMIT record.
    assert 40 < lag["lag_records"] <= 80, lag
    assert 0 < lag["lag_age"] < 60
    later = rep.status()["followers"]["b"]  # type: ignore[index]
    assert later["lag_age"] >= lag["lag_age"], "the oldest record it lacks only gets older"
    assert rep.status()["followers"]["b"]["connected"] is False  # type: ignore[index]


async def test_a_follower_refusal_is_counted_by_reason(ops2: Ops) -> None:
    w = ops2
    w.follower.owns.add(0)  # b says it owns shard 0 itself: nack "owner"
    rep = await open_owner(w.spool, w.side, w.store, 0, 10, ["b"])
    await wait_until(lambda: rep.streams["b"].retry_at > 0, what="b refused")
    assert (w.value("mta_replication_refused_total", reason="owner") or 0) >= 1
    assert w.value("mta_replication_refused_total", reason="stale") == 0


def test_lag_bytes() -> None:
    sizes = {3: 4000, 4: 4096, 5: 1000}
    assert lag_bytes((5, 1000), (5, 1000), sizes) == 0
    assert lag_bytes((5, 1000), (5, 200), sizes) == 800
    assert lag_bytes((5, 1000), (3, 3000), sizes) == 1000 + 4096 + 1000
    assert lag_bytes((5, 1000), (0, 0), sizes) == 4000 + 4096 + 1000
    assert lag_bytes((5, 1000), (6, 0), sizes) == 0  # acked past the end: nothing lacking
    assert lag_bytes((5, 1000), (2, 10), sizes) == 4000 + 4096 + 1000  # 2: compacted away


def test_shard_state() -> None:
    assert [shard_state(n, 3, 2) for n in (3, 4, 2, 1, 0)] == [
        "in_sync", "in_sync", "under_replicated", "read_only", "read_only"]
    assert [shard_state(n, 2, 2) for n in (2, 1)] == ["in_sync", "read_only"]


def test_a_node_that_does_not_replicate_exports_no_replication_metric(tmp_path: Path) -> None:
    plain = Node(make_config(tmp_path / "plain"))
    names = {m.name for m in plain.metrics.registry.collect()}
    assert not {n for n in names if n.startswith("mta_replication")}
    cfg = make_config(tmp_path / "repl", spool={"replicas": 2}, cluster={
        "etcd": ["127.0.0.1:2379"], "replication_listen": "127.0.0.1:0", "secret": "s" * 32})
    replicated = Node(cfg)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in replicated.metrics.registry.collect() for s in m.samples
               if s.name.startswith("mta_replication")}
    assert samples[("mta_replication_shards", (("state", "read_only"),))] == 0
    assert samples[("mta_replication_followers_connected", ())] == 0
    assert samples[("mta_replication_insync_changes_total", (("change", "grow"),))] == 0
    assert samples[("mta_replication_refused_total", (("reason", "position"),))] == 0


# --- /api/v1/shards and mtactl shards --------------------------------------------------------

PLAIN = [ShardInfo(0, "n1", "n1", 7), ShardInfo(1, "n2", "n2", 8), ShardInfo(2, "n2", None, 0)]


def test_the_unreplicated_answer_and_output_are_as_before() -> None:
    data = shard_table(PLAIN, {"n2"}, 3)
    assert data == {"shards": [
        {"shard": 0, "assigned": "n1", "owner": "n1", "token": 7, "owner_lease_expiring": False},
        {"shard": 1, "assigned": "n2", "owner": "n2", "token": 8, "owner_lease_expiring": True},
        {"shard": 2, "assigned": "n2", "owner": None, "token": 0,
         "owner_lease_expiring": False}], "total": 3, "unowned": 1}
    assert render(data).splitlines() == [
        "SHARD  ASSIGNED  OWNER                TOKEN",
        "0      n1        n1                   7",
        "1      n2        n2 (lease expiring)  8",
        "2      n2        UNOWNED              0",
        "2 of 3 shards owned"]


def _status(token: int, **lags: tuple[int, bool]) -> dict[str, Any]:
    return {"token": token, "members": [], "accepting": True, "end": [3, 100],
            "followers": {p: {"state": "live" if up else "idle", "connected": up,
                              "acked": [3, 100 - lag], "lag_bytes": lag,
                              "lag_records": lag // 1000, "lag_age": 2.5 if lag else 0.0}
                          for p, (lag, up) in lags.items()}}


def test_the_replicated_answer_has_followers_in_sync_sets_and_lag() -> None:
    table = [ShardInfo(0, "n1", "n1", 7, ("n2",), ("n1", "n2")),
             ShardInfo(1, "n2", "n2", 8, ("n3",), ("n2",)),
             ShardInfo(2, "n3", "n3", 9, ("n1",), ("n3",)),
             ShardInfo(3, "n3", None, 0, ("n1",), None)]
    owned = [{"0": _status(7, n2=(0, True))},  # n1's answer
             # n2 owned shard 2 under an older token once: only the table's token counts.
             {"1": _status(8, n3=(3 << 20, False)), "2": _status(5, n1=(0, True))}]
    data = shard_table(table, set(), 4, (2, 1), owned)
    rows = data["shards"]
    assert (data["replicas"], data["min_insync"]) == (2, 1)
    assert rows[0]["followers"] == ["n2"] and rows[0]["in_sync"] == ["n1", "n2"]
    assert [r["state"] for r in rows] == ["in_sync", "under_replicated", "under_replicated",
                                          None]
    assert rows[0]["replication"] == {"n2": {"state": "live", "connected": True,
                                             "acked": [3, 100], "lag_bytes": 0,
                                             "lag_records": 0, "lag_age": 0.0}}
    assert rows[1]["replication"]["n3"]["lag_bytes"] == 3 << 20
    assert rows[2]["replication"] is None  # its owner (n3) did not answer
    assert rows[3]["replication"] is None
    data["unreachable"] = [{"node": "n3", "error": "timed out"}]
    lines = render(data).splitlines()
    assert lines[0].split() == ["SHARD", "ASSIGNED", "OWNER", "TOKEN", "FOLLOWERS", "IN-SYNC",
                                "LAG"]
    assert lines[1].split() == ["0", "n1", "n1", "7", "n2", "n1,n2", "n2=0"]
    assert lines[2].split() == ["1", "n2", "n2", "8", "n3", "n2",
                                "n3=3.0MiB/3145rec/2.5s(down)"]
    assert lines[3].split() == ["2", "n3", "n3", "9", "n1", "n3", "?"]
    assert lines[4].split() == ["3", "n3", "UNOWNED", "0", "n1", "-", "-"]
    assert lines[5] == ("3 of 4 shards owned; replicas 2, min_insync 1: 2 under-replicated, "
                        "0 read-only")
    assert "n3: no answer (timed out)" in lines[6]
    two = shard_table(table, set(), 4, (2, 2), owned)
    assert "(READ-ONLY)" in render(two).splitlines()[2]
    assert [r["state"] for r in two["shards"]][:3] == ["in_sync", "read_only", "read_only"]


async def test_the_coordinator_reports_followers_and_in_sync_sets(tmp_path: Path) -> None:
    """The shard table from the (in-memory) store: replicas/ and sync/ per shard."""
    world = MemWorld(tmp_path)
    try:
        hosts = {n: Host(n) for n in ("n1", "n2")}
        cs = {n: world.coordinator(n) for n in hosts}
        for n, host in hosts.items():
            await cs[n].start(host)
        await wait_until(lambda: len(world.snapshot().replicas) == 8, 10, "placed")
        await wait_until(settled(world, list(cs.values())), 10, "settled")
        v = world.snapshot()
        owner = cs[v.owners[0].node]
        follower = v.replicas[0][0]
        old = v.sync[0]
        new = old.with_members({**old.members, follower: f"{follower}-copy0"})
        assert await owner.change_sync(0, old, new) == new
        table = await cs["n2"].shards()
        assert table[0].followers == (follower,)
        assert table[0].in_sync == tuple(sorted((v.owners[0].node, follower)))
        assert all(len(s.followers) == 1 and s.in_sync == (s.owner,) for s in table[1:])
        data = shard_table(table, set(), 8, (2, 2))
        assert [r["state"] for r in data["shards"]] == ["in_sync"] + ["read_only"] * 7
    finally:
        await world.close()


class _Coordinator:
    """The cluster as both admin APIs below read it: two members and the shard table."""

    def __init__(self) -> None:
        self.admins: dict[str, str] = {}
        self.is_leader = False

    async def members(self, *, leases: bool = False) -> list[Member]:
        return [Member(n, "", url, False, False, 1, "x", 0.0)
                for n, url in sorted(self.admins.items())]

    async def shards(self) -> list[ShardInfo]:
        return [ShardInfo(0, "n1", "n1", 7, ("n2",), ("n1", "n2")),
                ShardInfo(1, "n2", "n2", 8, ("n1",), ("n2",))]


def _api(tmp: Path, node: str, coordinator: _Coordinator, replicas: int,
         status: dict[int, dict[str, Any]]) -> AdminServer:
    cluster = {"etcd": ["127.0.0.1:2379"], "replication_listen": "127.0.0.1:0",
               "secret": "s" * 32} if replicas > 1 else {}
    cfg = make_config(tmp / node, node={"id": node}, spool={"replicas": replicas},
                      cluster=cluster)
    facade = NodeFacade(
        node_id=node, spool=SimpleNamespace(total_shards=2),  # type: ignore[arg-type]
        engine=None, coordinator=coordinator, metrics=NodeMetrics(),  # type: ignore[arg-type]
        slo=None, prober=None, config=lambda: cfg,  # type: ignore[arg-type]
        readiness=dict, ingress=lambda: None, fenced=lambda: False,
        replication=(lambda: status) if replicas > 1 else None)
    return AdminServer(facade)


def _get(port: int, path: str) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": "Bearer t0ken"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("replicas", [1, 2])
async def test_the_shards_route_asks_each_owner_for_its_followers(tmp_path: Path,
                                                                  replicas: int) -> None:
    """Two real admin APIs: n1 answers /api/v1/shards with n2's view of the shard n2 owns."""
    coordinator = _Coordinator()
    apis = {"n1": _api(tmp_path, "n1", coordinator, replicas, {0: _status(7, n2=(0, True))}),
            "n2": _api(tmp_path, "n2", coordinator, replicas,
                       {1: _status(8, n1=(5000, True))})}
    try:
        for node, api in apis.items():
            await api.start()
            coordinator.admins[node] = f"http://127.0.0.1:{api.port}"
        port = apis["n1"].port
        data = await asyncio.to_thread(_get, port, "/api/v1/shards")
        if replicas == 1:
            assert data == shard_table(await coordinator.shards(), set(), 2)
            return
        rows = data["shards"]
        assert [r["in_sync"] for r in rows] == [["n1", "n2"], ["n2"]]
        assert [r["state"] for r in rows] == ["in_sync", "read_only"]
        assert rows[0]["replication"]["n2"]["lag_bytes"] == 0
        assert rows[1]["replication"]["n1"] == {"state": "live", "connected": True,
                                                "acked": [3, 100 - 5000], "lag_bytes": 5000,
                                                "lag_records": 5, "lag_age": 2.5}
        assert data["unreachable"] == []
        mine = await asyncio.to_thread(_get, port, "/api/v1/shards?local=1")
        assert mine == {"node": "n1", "owned": {"0": _status(7, n2=(0, True))}}
    finally:
        for api in apis.values():
            await api.close()


def test_write_marks_count_the_records_and_age_past_a_position() -> None:
    marks = WriteMarks(limit=3)
    marks.wrote((1, 40), 0, 0.0)  # a segment header: no record
    marks.wrote((1, 100), 3, 1.0)
    marks.wrote((1, 200), 2, 2.0)
    marks.wrote((2, 50), 4, 3.0)
    assert marks.lag((2, 50), 9.0) == (0, 0.0), "caught up"
    assert marks.lag((1, 200), 9.0) == (4, 6.0)
    assert marks.lag((1, 150), 9.0) == (6, 7.0), "inside a batch: that batch counts whole"
    assert marks.lag((0, 0), 9.0) == (9, 8.0)
    marks.prune((1, 100))
    assert marks.lag((1, 200), 9.0) == (4, 6.0), "pruning keeps what is past the position"
    marks.wrote((2, 90), 1, 4.0)
    marks.wrote((2, 99), 1, 5.0)  # past the limit: the oldest batch is forgotten
    assert marks.lag((0, 0), 9.0) == (6, 6.0), "a lower bound once the oldest is gone"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def side() -> AsyncIterator[tuple[OwnerSide, MemorySyncStore, Clock, dict]]:
    clock, store, placement = Clock(), MemorySyncStore(), {}
    s = OwnerSide("a", PeerAuth("a", secret=SECRET), Peers(), store, min_insync=2,
                  replica_timeout=1.0, replicas=3, clock=clock,
                  followers=lambda shard: placement.get(shard, ()))
    yield s, store, clock, placement
    await s.stop()


async def test_each_follower_s_lag_in_records_and_age_counts_from_its_own_ack(
        side: tuple[OwnerSide, MemorySyncStore, Clock, dict], tmp_path: Path) -> None:
    s, _, clock, _ = side
    rep = s.open(0, 10, tmp_path, "ca", SyncRecord(10, "a", {"a": "ca"}), ["b", "c", "d"],
                 NOTHING)
    rep.written(1, 0, b"h" * 16, 0)  # a segment header: no record
    rep.written(1, 16, b"x" * 100, 3)  # at 100
    clock.now = 101
    rep.written(1, 116, b"y" * 100, 2)
    for node, pos in (("b", (1, 216)), ("c", (1, 116))):  # d never acks
        rep.replica.acked(node, pos, clock.now, rep.replica.connected(node, f"c{node}", 101))
    rep.written(2, 0, b"h" * 16, 0)  # a new segment: what every follower has is forgotten
    clock.now = 103
    rep.written(2, 16, b"z" * 50, 4)
    clock.now = 105
    lag = {p: (f["lag_records"], f["lag_age"])
           for p, f in rep.status()["followers"].items()}  # type: ignore[union-attr]
    assert lag == {"b": (4, 2.0), "c": (6, 4.0), "d": (9, 5.0)}
    rep.replica.acked("d", (2, 82), 105, rep.replica.connected("d", "cd", 105))
    rep.written(3, 0, b"h" * 16, 0)  # pruned up to the slowest (c): its part stays
    lag = {p: (f["lag_records"], f["lag_age"])
           for p, f in rep.status()["followers"].items()}  # type: ignore[union-attr]
    assert lag == {"b": (4, 2.0), "c": (6, 4.0), "d": (0, 0.0)}


async def test_the_owner_prunes_the_set_back_to_replicas_not_to_min_insync(
        side: tuple[OwnerSide, MemorySyncStore, Clock, dict], tmp_path: Path) -> None:
    # replicas 3, min_insync 2: four copies in sync after a move, and the placement kept only
    # b of them (e is the new follower): one copy goes, three stay.
    s, store, clock, placement = side
    placement[0] = ("b", "e")
    record = store.records[0] = SyncRecord(10, "a", {"a": "ca", "b": "cb", "c": "cc",
                                                     "d": "cd"})
    rep = s.open(0, 10, tmp_path, "ca", record, ["b", "e"], NOTHING)
    for node in ("b", "c", "d"):
        rep.replica.connected(node, f"c{node}", clock.now)
    for _ in range(4):
        rep._propose(clock.now)
        if rep._proposing is not None:
            await rep._proposing
    assert set(store.records[0].members) == {"a", "b", "d"}, store.history


def test_pruning_write_marks_keeps_every_batch_past_the_position() -> None:
    marks = WriteMarks()
    marks.wrote((1, 100), 3, 1.0)
    marks.wrote((1, 200), 2, 2.0)
    marks.wrote((2, 50), 4, 3.0)
    marks.prune((1, 100))
    assert marks.lag((1, 100), 9.0) == (6, 7.0)
    marks.prune((1, 150))  # inside a batch: the batch stays
    assert marks.lag((1, 150), 9.0) == (6, 7.0)
    assert marks.lag((1, 200), 9.0) == (4, 6.0)


def test_a_follower_lacking_bytes_is_not_shown_caught_up() -> None:
    # Bytes behind but no record counted (what it lacks was written before this owner opened
    # the shard, or is a segment header): not "0".
    f = {"lag_bytes": 5000, "lag_records": 0, "lag_age": 0.0, "connected": True}
    assert _follower_lag(f) == "4.9KiB/0rec/0.0s"
    assert _follower_lag({"lag_bytes": 0, "lag_records": 0, "lag_age": 0.0}) == "0"


async def test_a_follower_being_added_is_streamed_to_even_once_no_longer_placed(
        side: tuple[OwnerSide, MemorySyncStore, Clock, dict], tmp_path: Path) -> None:
    # x caught up and its grow is in flight when the leader's placement drops it: its acks are
    # required from the proposal on, and if the grow commits it is a member; the owner must
    # not stop streaming to it meanwhile (a member with no stream never acks again).
    import asyncio
    s, store, clock, placement = side
    gate = asyncio.Event()
    real = store.change

    async def slow(shard: int, old: SyncRecord, new: SyncRecord) -> SyncRecord | None:
        await gate.wait()
        return await real(shard, old, new)

    store.change = slow  # type: ignore[method-assign]
    placement[0] = ("b", "x")
    record = store.records[0] = SyncRecord(10, "a", {"a": "ca", "b": "cb"})
    rep = s.open(0, 10, tmp_path, "ca", record, ["b", "x"], NOTHING)
    for node in ("b", "x"):
        rep.replica.connected(node, f"c{node}", clock.now)
    rep._propose(clock.now)
    assert rep.replica.proposed is not None and "x" in rep.replica.proposed.members
    placement[0] = ("b",)
    rep._follow_placement()
    assert "x" in rep.streams, "x is being added"
    gate.set()
    await rep._proposing  # type: ignore[misc]
    assert "x" in store.records[0].members
    rep._follow_placement()
    assert "x" in rep.streams, "a member is streamed to until it is pruned"


async def test_a_follower_the_placement_dropped_is_forgotten(
        side: tuple[OwnerSide, MemorySyncStore, Clock, dict], tmp_path: Path) -> None:
    s, store, clock, placement = side
    placement[0] = ("b", "y")
    record = store.records[0] = SyncRecord(10, "a", {"a": "ca", "b": "cb"})
    rep = s.open(0, 10, tmp_path, "ca", record, ["b", "y"], NOTHING)
    for node in ("b", "y"):
        rep.replica.connected(node, f"c{node}", clock.now)
    placement[0] = ("b",)
    rep._follow_placement()
    assert "y" not in rep.streams and "y" not in rep.replica.followers
    assert "b" in rep.streams and "b" in rep.replica.followers


def test_a_replicated_node_prunes_its_in_sync_sets_back_to_the_configured_copies(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, spool={"replicas": 3, "min_insync": 2}, cluster={
        "etcd": ["127.0.0.1:2379"], "replication_listen": "127.0.0.1:0", "secret": "s" * 32})
    node = Node(cfg)
    assert node.replication is not None
    owner = node.replication.owner
    assert (owner.replicas, owner.min_insync) == (3, 2)


def test_lag_behind_what_the_log_held_at_open_is_unknown_not_zero() -> None:
    """After a takeover the owner knows nothing of the records before its own writes: a
    follower behind them lacks an unknown number, for at least as long as the term."""
    marks = WriteMarks(start=(3, 100), opened=10.0)
    marks.wrote((3, 160), 2, 11.0)
    assert marks.lag((2, 0), 15.0) == (None, 5.0)
    assert marks.lag((3, 100), 15.0) == (2, 4.0)
    shown = _follower_lag({"lag_bytes": 5000, "lag_records": None, "lag_age": 5.0})
    assert shown == "4.9KiB/?rec/>5.0s"
