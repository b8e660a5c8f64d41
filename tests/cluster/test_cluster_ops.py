"""The cluster verbs of mtactl against three real node processes on a real etcd: any node
answers for the whole cluster, forwards to the owner of a message, drains and rebalances."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import EtcdServer, Sink, ctl, ctl_json, read_accounting, submit
from tests.support import wait_until_sync as _wait
from tests.support.cluster import SHARDS, Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer,
            sink: Sink) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cops"), etcd, enabled=True,
                smarthost=f"127.0.0.1:{sink.port}", retry_initial="1h", retry_max="2h",
                idle_timeout="1s")
    c.start_nodes(["n1", "n2", "n3"])
    c.wait(c.settled({"n1", "n2", "n3"}), 30, "3 nodes settled")
    yield c
    c.stop()


def _deferred(work: Path, mid: str) -> bool:
    return any(r["type"] == "TransientFailure" and r["message_id"] == mid
               for r in read_accounting(work / "acct.jsonl"))


def test_membership_and_shard_verbs_answer_from_any_node(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["n1"], cluster.nodes["n2"]
    nodes = ctl_json(n1, "nodes")["nodes"]
    assert {n["node"] for n in nodes} == {"n1", "n2", "n3"}
    assert sum(n["leader"] for n in nodes) == 1
    assert sum(n["shards"] for n in nodes) == SHARDS
    assert {n["admin"] for n in nodes} == {
        f"http://127.0.0.1:{p.admin_port}" for p in cluster.nodes.values()}
    human = ctl(n2, "nodes").stdout
    assert "leader" in human and all(n in human for n in ("n1", "n2", "n3"))

    shards = ctl_json(n2, "shards")
    owners = {s["shard"]: s["owner"] for s in shards["shards"]}
    assert shards["unowned"] == 0 and owners == cluster.state()["owner"]
    assert all(s["token"] > 0 for s in shards["shards"])
    assert f"{SHARDS} of {SHARDS} shards owned" in ctl(n1, "shards").stdout


def test_queue_message_flush_and_slo_span_the_cluster(cluster: Cluster) -> None:
    ids = {name: submit(node, [f"{name}@held.test"], i)
           for i, (name, node) in enumerate(sorted(cluster.nodes.items()))}
    for name, mid in ids.items():
        _wait(lambda n=name, m=mid: _deferred(cluster.nodes[n].workdir, m), 20, "deferral")
    n1 = cluster.nodes["n1"]

    q = ctl_json(n1, "queue")
    held = next(d for d in q["domains"] if d["domain"] == "held.test")
    assert held["messages"] == 3 and sorted(q["nodes"]) == ["n1", "n2", "n3"]
    local = ctl_json(n1, "queue", "--local")
    assert local["nodes"] == ["n1"] and local["total"] == 1

    shown = ctl_json(n1, "message", "show", ids["n3"])  # forwarded to the owner
    assert shown["node"] == "n3" and shown["recipients"][0]["status"] == "pending"
    bounced = ctl_json(n1, "message", "bounce", ids["n2"])
    assert bounced == {"id": ids["n2"], "bounced_recipients": 1, "node": "n2"}
    assert ctl(n1, "message", "show", ids["n2"]).returncode == 1

    flushed = ctl_json(n1, "flush", "--domain", "held.test")
    assert flushed["nodes"] == 3 and flushed["rescheduled"] == 2 and not flushed["unreachable"]
    # Counts reach the SLO history at the next sample (every 5 s by default).
    slo = _wait(lambda: (r := ctl_json(n1, "slo", "--window", "15m"))["submitted"] >= 3 and r,
                15, "3 submissions in the SLO history")
    assert slo["nodes"] == 3 and sorted(slo["nodes_answered"]) == ["n1", "n2", "n3"]


def test_runtime_changes_from_two_nodes_do_not_undo_each_other(cluster: Cluster) -> None:
    n1, n2, n3 = (cluster.nodes[n] for n in ("n1", "n2", "n3"))
    assert ctl(n1, "throttle", "set", "a.test", "10/s").returncode == 0
    assert ctl(n2, "throttle", "set", "b.test", "20/s").returncode == 0
    assert ctl(n3, "suspend", "c.test").returncode == 0
    shown = _wait(lambda: (t := ctl_json(n2, "throttle", "show"))["runtime"] == {
        "a.test": 10.0, "b.test": 20.0} and t, 10, "both throttles on n2")
    assert shown["suspended"] == ["c.test"]
    assert ctl(n1, "throttle", "clear", "a.test").returncode == 0
    assert ctl(n2, "resume", "c.test").returncode == 0
    _wait(lambda: (t := ctl_json(n3, "throttle", "show"))["runtime"] == {"b.test": 20.0}
          and t["suspended"] == [], 10, "the clear and resume seen on n3")
    assert ctl(n3, "throttle", "clear", "b.test").returncode == 0


def test_drain_undrain_and_rebalance(cluster: Cluster) -> None:
    n1, n3 = cluster.nodes["n1"], cluster.nodes["n3"]
    mid = submit(n3, ["drained@held.test"], 99)
    _wait(lambda: _deferred(n3.workdir, mid), 20, "deferral on n3")

    res = ctl(n1, "drain", "n3")
    assert res.returncode == 0 and "n3 draining" in res.stdout
    cluster.wait(cluster.settled({"n1", "n2"}), 20, "n3's shards moved away")
    nodes = {n["node"]: n for n in ctl_json(n1, "nodes")["nodes"]}
    assert nodes["n3"]["draining"] and nodes["n3"]["shards"] == 0
    # n3's message now lives on a survivor, and any node (n3 too) finds it there.
    shown = ctl_json(n3, "message", "show", mid)
    assert shown["node"] in ("n1", "n2")

    res = ctl(n1, "drain", "nope")
    assert res.returncode == 1 and "no live node 'nope'" in res.stderr

    assert ctl(n1, "--json", "undrain", "n3").returncode == 0
    # Undrains that change nothing: a live node that is not draining, a mistyped node.
    res = ctl(n1, "undrain", "n3")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.startswith("mtactl: n3 is not draining (HTTP 409)"), res.stderr
    res = ctl(n1, "undrain", "node9")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.startswith("mtactl: no node 'node9' in cluster"), res.stderr
    data = ctl_json(n1, "rebalance", "--timeout", "30")
    assert data["converged"] and data["unowned"] == 0
    assert sorted(data["per_node"]) == ["n1", "n2", "n3"]
    assert sum(data["per_node"].values()) == SHARDS
    assert "converged" in ctl(n1, "rebalance").stdout
    counts = Counter(cluster.state()["owner"].values())
    assert set(counts) == {"n1", "n2", "n3"}


def test_an_unreachable_peer_is_reported_not_fatal(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["n1"], cluster.nodes["n2"]
    n2.signal(signal.SIGSTOP)  # a member in etcd that does not answer
    try:
        # One call: within a lease TTL n2 drops out of the membership and is not asked.
        human = ctl(n1, "queue")
        assert human.returncode == 0 and "warning: node n2 did not answer" in human.stdout
    finally:
        n2.signal(signal.SIGCONT)
