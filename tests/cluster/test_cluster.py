"""A cluster of real node processes on a real etcd: election, spread, failover, drain, fencing."""

from __future__ import annotations

import json
import math
import signal
import smtplib
import socket
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import EtcdServer, NodeProcess, message, node_config
from tests.support import wait_until_sync as _poll
from tests.support.cluster import SHARDS, TTL, Cluster, Load, all_delivered


@pytest.fixture
def cluster(tmp_path: Path, etcd: EtcdServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd, enabled=False)
    yield c
    c.stop()


def test_three_nodes_elect_one_leader_spread_shards_and_reelect(cluster: Cluster) -> None:
    cluster.start_nodes(["n1", "n2", "n3"])
    st = cluster.wait(cluster.settled({"n1", "n2", "n3"}), 20, "3 nodes settled")
    counts = Counter(st["owner"].values())
    assert max(counts.values()) <= math.ceil(SHARDS / 3) + 1, counts
    assert sum(counts.values()) == SHARDS  # every shard has exactly one owner key

    leader = st["leader"]
    t0 = time.monotonic()
    cluster.nodes[leader].kill()  # SIGKILL the leader
    survivors = {"n1", "n2", "n3"} - {leader}
    cluster.wait(lambda s: s["leader"] in survivors, TTL + 2, "a new leader")
    assert time.monotonic() - t0 <= TTL + 2
    cluster.wait(cluster.settled(survivors), TTL + 6, "survivors own every shard")
    took = time.monotonic() - t0
    assert took <= TTL + 6, took


def test_graceful_stop_hands_shards_over_at_once(cluster: Cluster) -> None:
    for n in ("n1", "n2"):
        cluster.start_node(n)
    cluster.wait(cluster.settled({"n1", "n2"}), 20, "2 nodes settled")
    t0 = time.monotonic()
    cluster.nodes["n2"].signal(signal.SIGTERM)
    assert cluster.nodes["n2"].wait(30) == 0
    cluster.wait(cluster.settled({"n1"}), 10, "n1 owns everything")
    # Released and revoked on the way out: no lease expiry to wait for.
    assert time.monotonic() - t0 < TTL + 1


def test_a_stopping_node_takes_none_of_the_shards_a_stopping_peer_gives_back(
        cluster: Cluster) -> None:
    """n1 is draining (a client is still in DATA) when n2 stops too: n2's shards are assigned
    to n1, the only node left, but a stopping node claims nothing."""
    n1 = cluster.start_node("n1", shutdown_grace="30s")
    cluster.start_node("n2")
    st = cluster.wait(cluster.settled({"n1", "n2"}), 20, "2 nodes settled")
    theirs = {s for s, n in st["owner"].items() if n == "n2"}
    client = smtplib.SMTP("127.0.0.1", n1.smtp_port, timeout=30)
    try:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt("b@dest.test")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        n1.signal(signal.SIGTERM)  # draining: it waits for this DATA to end
        cluster.nodes["n2"].signal(signal.SIGTERM)
        assert cluster.nodes["n2"].wait(30) == 0
        cluster.wait(lambda s: all(s["assign"].get(x) == "n1" for x in theirs), 15,
                     "n2's shards assigned to n1")
        client.send(message(1, 500) + b"\r\n.\r\n")
        assert client.getreply()[0] == 250
    finally:
        client.close()
    assert n1.wait(30) == 0
    log = n1.log()
    after_stop = log[log.index('"node.stopping"'):]
    assert '"cluster.shard_acquired"' not in after_stop, after_stop[:2000]
    assert all(s not in cluster.state()["owner"] for s in theirs)


def test_drain_moves_shards_and_undrain_brings_them_back(cluster: Cluster) -> None:
    for n in ("n1", "n2"):
        cluster.start_node(n)
    cluster.wait(cluster.settled({"n1", "n2"}), 20, "2 nodes settled")
    cluster.etcd.put(f"{cluster.prefix}drain/n2", b"1")
    cluster.wait(cluster.settled({"n1"}), 10, "n2 drained")
    st = cluster.state()
    assert "n2" in st["nodes"]  # still a member, just owns nothing


@pytest.mark.slow
def test_sigkill_under_load_every_acknowledged_message_is_delivered(
        tmp_path: Path, etcd: EtcdServer) -> None:
    from tests.support import Sink, SinkScript

    sink = Sink("127.0.0.1", 0, SinkScript(data_delay=0.05))  # slow: mail piles up in spools
    sink.start()
    c = Cluster(tmp_path, etcd, enabled=True, smarthost=f"127.0.0.1:{sink.port}",
                max_connections=2, retry_initial="300ms", retry_max="1s")
    load = Load()
    acked = load.acked
    try:
        c.start_nodes(["n1", "n2", "n3"])
        c.wait(c.settled({"n1", "n2", "n3"}), 20, "settled")
        load.start([c.nodes[n].smtp_port for n in ("n1", "n2", "n3")])
        # Under load before the kill: every node has acknowledged mail (some still queued).
        _poll(lambda: {k.split("-")[0] for k in list(acked)} == {"0", "1", "2"}
              and len(acked) >= 30, 20, "mail acknowledged by every node")
        victim = "n2"
        t_kill = time.monotonic()
        c.nodes[victim].kill()
        load.stop()
        survivors = {"n1", "n3"}
        c.wait(c.settled(survivors), TTL + 6, "survivors own every shard")
        rto = time.monotonic() - t_kill
        assert rto <= TTL + 6, rto
        # At-least-once: only messages in flight at the kill may arrive twice, at most the
        # victim's open connections x 2.
        got = all_delivered(acked, sink.messages, 60, max_dupes=2 * 2)
        print(f"failover: {len(acked)} acked, RTO {rto:.2f}s, "
              f"duplicates {sum(1 for v in got.values() if v > 1)}")
    finally:
        load.stop()  # a failure must not leave the load running (and the run hanging)
        c.stop()
        sink.stop()


def _segment_owners(spool: Path) -> dict[int, list[tuple[int, str, int]]]:
    """Per shard, the (segment seq, node, token) headers in log order."""
    from mta.spool.record import Kind, ScannedRecord, scan
    from mta.spool.segment import list_segments, segment_path

    out: dict[int, list[tuple[int, str, int]]] = {}
    for shard in range(SHARDS):
        d = spool / f"shard-{shard:03d}"
        if not d.exists():
            continue
        for seq in list_segments(d):
            data = segment_path(d, seq).read_bytes()
            for item in scan(data):
                if isinstance(item, ScannedRecord) and item.meta[0] == Kind.SEGMENT:
                    h = item.meta[1]
                    out.setdefault(shard, []).append((seq, h["node"], h["token"]))
                break
    return out


def test_paused_node_fences_itself_and_never_writes_a_lost_shard(cluster: Cluster) -> None:
    for n in ("n1", "n2"):
        cluster.start_node(n)
    cluster.wait(cluster.settled({"n1", "n2"}), 20, "settled")
    n2 = cluster.nodes["n2"]
    # A client of n2 is mid-transaction when n2 freezes.
    s = smtplib.SMTP("127.0.0.1", n2.smtp_port, timeout=30)
    s.ehlo("c.example")
    s.mail("app@sender.test")
    s.rcpt("x@dest.test")
    n2.signal(signal.SIGSTOP)
    try:
        cluster.wait(cluster.settled({"n1"}), TTL + 6, "n1 took n2's shards")
        # The client sends its message while n2 is frozen; n2 reads it when it wakes up.
        s.putcmd("data")
    finally:
        n2.signal(signal.SIGCONT)
    code, reply = s.getreply()
    assert code == 354, (code, reply)  # the transaction was open when n2 froze
    s.send(message(1, 800) + b".\r\n")
    code, reply = s.getreply()
    # Refused as a node that may not write the shard: fenced, or the owner file names n1
    # (421 4.3.2), or the shard already released (451 4.3.0). Never a 250.
    assert (code, reply[:5]) in {(421, b"4.3.2"), (451, b"4.3.0")}, (code, reply)
    s.close()
    # n2 rejoins with a new lease; the leader gives it shards back, with newer tokens.
    cluster.wait(cluster.settled({"n1", "n2"}), 20, "n2 back in service")
    log = n2.log()
    assert "cluster.fenced" in log or "node.fenced" in log, log[-2000:]
    # No shard ever had two writers: each new segment's fencing token is larger than every
    # earlier one, and no segment was written by a stale owner after a newer claim.
    for shard, heads in _segment_owners(cluster.spool).items():
        tokens = [t for _, _, t in heads]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), (shard, heads)


@pytest.mark.slow
def test_etcd_killed_30s_under_load_fences_then_resumes_without_losing_mail(
        tmp_path: Path, etcd: EtcdServer) -> None:
    from tests.support import Sink

    own = EtcdServer(tmp_path / "etcd-own").start()  # this test stops etcd: use its own
    sink = Sink("127.0.0.1", 0)
    sink.start()
    c = Cluster(tmp_path, own, enabled=True, smarthost=f"127.0.0.1:{sink.port}",
                retry_initial="300ms", retry_max="1s")
    load = Load()  # its clients reconnect when a fenced node closes on them
    acked = load.acked
    try:
        for n in ("n1", "n2"):
            c.start_node(n)
        c.wait(c.settled({"n1", "n2"}), 20, "settled")
        load.start([c.nodes[n].smtp_port for n in ("n1", "n2")])
        _poll(lambda: len(acked) >= 20, 20, "load before the outage")
        own.kill()  # SIGKILL etcd for 30 s under load; it comes back with the same data
        t_kill = time.monotonic()

        def greetings() -> list[bytes]:
            out = []
            for node in c.nodes.values():
                with socket.create_connection(("127.0.0.1", node.smtp_port), 5) as conn:
                    out.append(conn.recv(200))
            return out

        # Fenced within TTL + 2 s: no new mail anywhere.
        refused = greetings()
        while not all(g.startswith(b"421") for g in refused):
            assert time.monotonic() - t_kill < TTL + 2, refused
            time.sleep(0.1)
            refused = greetings()
        time.sleep(max(0.0, t_kill + 30 - time.monotonic()))  # the rest of the outage
        assert all(n.proc is not None and n.proc.poll() is None for n in c.nodes.values())
        own.start()
        c.wait(c.settled({"n1", "n2"}), 30, "cluster back after the outage")
        before = len(acked)
        _poll(lambda: len(acked) >= before + 20, 20, "mail accepted again after the outage")
        load.stop()
        want = {f"X-Test-Id: {int(k.split('-')[0]) * 100000 + int(k.split('-')[1])}".encode()
                 for k in acked}

        def delivered() -> set[bytes]:
            return {line for m in list(sink.messages) for line in m.content.split(b"\r\n")
                    if line.startswith(b"X-Test-Id: ")}

        # Wait on the set of ids, not a count: at-least-once duplicates inflate the count.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not want <= delivered():
            time.sleep(0.2)
        got = delivered()
        assert want <= got, f"{len(want - got)} acknowledged messages lost"
        assert len(acked) > 50
    finally:
        load.stop()  # a failure must not leave the load running (and the run hanging)
        c.stop()
        sink.stop()
        own.stop()


def test_cluster_wide_domain_throttle_holds_at_the_sink(tmp_path: Path, etcd: EtcdServer) -> None:
    from tests.support import Sink

    sink = Sink("127.0.0.1", 0)
    sink.start()
    rate = 6.0
    c = Cluster(tmp_path, etcd, enabled=True, smarthost=f"127.0.0.1:{sink.port}",
                domains={"slow.test": {"rate": f"{rate:g}/s"}})
    try:
        c.start_nodes(["n1", "n2", "n3"])
        c.wait(c.settled({"n1", "n2", "n3"}), 20, "settled")
        total = 18  # three seconds at the cluster's rate; three times that if it were per node
        for i in range(total):
            node = c.nodes[("n1", "n2", "n3")[i % 3]]
            with smtplib.SMTP("127.0.0.1", node.smtp_port) as s:
                s.sendmail("app@sender.test", [f"r{i}@slow.test"], message(i, 500))
        deadline = time.monotonic() + 30
        while len(sink.messages) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sink.messages) == total
        times = sorted(m.at for m in sink.messages)
        # Each node sends at rate x its share of shards: together at most `rate` per second
        # (plus one first message per node, which GCRA lets through at once).
        worst = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
        assert worst <= rate + 3, worst
        assert times[-1] - times[0] >= (total - 3) / rate * 0.8
    finally:
        c.stop()
        sink.stop()


def test_two_node_processes_share_one_smtp_port(cluster: Cluster) -> None:
    from tests.support import free_port

    port = free_port()
    a = cluster.start_node("n1", smtp_port=port, reuse_port=True)
    b = cluster.start_node("n2", smtp_port=port, reuse_port=True)
    assert a.smtp_port == b.smtp_port == port
    cluster.wait(cluster.settled({"n1", "n2"}), 20, "settled")
    for i in range(40):
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("app@sender.test", ["x@dest.test"], message(i, 300))
    # The kernel spread the connections over both processes (SO_REUSEPORT).
    received = {n: (cluster.tmp_path / n / "acct.jsonl") for n in ("n1", "n2")}

    def counts() -> dict[str, int]:
        return {n: p.read_text().count('"Reception"') if p.exists() else 0
                for n, p in received.items()}

    # A Reception line is written with the message's spool records, before its 250.
    assert sum(counts().values()) == 40 and min(counts().values()) > 0, counts()


def test_a_dead_first_etcd_endpoint_is_rotated_past(cluster: Cluster) -> None:
    from tests.support import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    cluster.start_node("n1", endpoints=[dead, cluster.etcd.endpoint])
    cluster.wait(cluster.settled({"n1"}), 20, "n1 joined through the second endpoint")


def test_suspend_written_to_etcd_holds_mail_on_every_node(tmp_path: Path, etcd: EtcdServer) -> None:
    from tests.support import Sink

    sink = Sink("127.0.0.1", 0)
    sink.start()
    c = Cluster(tmp_path, etcd, enabled=True, smarthost=f"127.0.0.1:{sink.port}")
    try:
        for n in ("n1", "n2"):
            c.start_node(n)
        c.wait(c.settled({"n1", "n2"}), 20, "settled")
        etcd.put(f"{c.prefix}config/suspend/held.test", b"1")  # what mtactl suspend writes
        for node in c.nodes.values():  # every node re-reads config/ at least every TTL/3
            _poll(lambda node=node: "held.test" in _api(node, "/api/v1/throttles")["suspended"],
                  TTL + 5, "the suspension applied")
        sent: list[tuple[NodeProcess, str]] = []
        for i, n in enumerate(("n1", "n2", "n1", "n2")):
            with smtplib.SMTP("127.0.0.1", c.nodes[n].smtp_port) as s:
                s.ehlo("client.test")
                s.mail("app@sender.test")
                s.rcpt(f"r{i}@held.test")
                code, reply = s.data(message(i, 300))
                assert code == 250, reply
                sent.append((c.nodes[n], reply.decode().rsplit(" ", 1)[1]))
        # Each message's attempt found its domain suspended and put it off (no attempt
        # counted; the next look is in the future): only then is "nothing sent" proven.
        def held(node: NodeProcess, mid: str) -> bool:
            view = _api(node, f"/api/v1/messages/{mid}")
            return view["attempts"] == 0 and (view["next_attempt"] or 0) > time.time()

        for node, mid in sent:
            _poll(lambda node=node, mid=mid: held(node, mid), 15, f"{mid} held by its attempt")
        assert sink.messages == []  # held, on both nodes
        etcd.delete(f"{c.prefix}config/suspend/held.test")
        deadline = time.monotonic() + 15
        while len(sink.messages) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(sink.messages) == 4
    finally:
        c.stop()
        sink.stop()


def _api(node: NodeProcess, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}{path}",
                                 headers={"Authorization": "Bearer t0ken"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _owner_tokens(spool: Path) -> dict[int, int]:
    return {int(p.parent.name.split("-")[1]): int(json.loads(p.read_text())["token"])
            for p in spool.glob("shard-*/shard.owner")}


def test_a_standalone_spool_and_a_rebuilt_etcd_are_taken_over(tmp_path: Path,
                                                               etcd: EtcdServer) -> None:
    # Fencing tokens must only grow. A standalone node writes wall-clock nanoseconds into
    # shard.owner, and a fresh (or rebuilt) etcd's revisions start near 1: a cluster on that
    # spool must still win every shard, with tokens above what the disk holds, and deliver
    # the mail the standalone node accepted.
    from tests.support import Sink, SinkScript

    sink = Sink("127.0.0.1", 0, SinkScript())
    sink.start()
    try:
        spool = tmp_path / "shared-spool"
        (tmp_path / "solo").mkdir()
        solo = NodeProcess(tmp_path / "solo", node_config(
            spool, node={"id": "solo"}, spool={"shards": SHARDS})).start()
        with smtplib.SMTP("127.0.0.1", solo.smtp_port, timeout=10) as s:
            for n in range(5):
                s.sendmail("app@sender.test", [f"r{n}@dest.test"], message(n, 800))
        solo.signal(signal.SIGTERM)
        assert solo.wait(30) == 0
        disk = _owner_tokens(spool)
        assert len(disk) == SHARDS and min(disk.values()) > 10**15  # nanoseconds

        cluster = Cluster(tmp_path, etcd, enabled=True, smarthost=f"127.0.0.1:{sink.port}",
                          retry_initial="300ms")
        try:
            cluster.start_node("n1")
            cluster.wait(cluster.settled({"n1"}), 30, "n1 owns every shard of the old spool")
            deadline = time.monotonic() + 30
            while len(sink.messages) < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sorted(m.recipients[0] for m in sink.messages) == [
                f"r{n}@dest.test" for n in range(5)]
            after = _owner_tokens(spool)
            assert all(after[s] > disk[s] for s in disk)
            # Later claims keep growing: a second node takes some shards over.
            cluster.start_node("n2")
            cluster.wait(cluster.settled({"n1", "n2"}), 30, "2 nodes settled")
            moved = {s: t for s, t in _owner_tokens(spool).items() if t != after[s]}
            assert moved and all(t > after[s] for s, t in moved.items())
        finally:
            cluster.stop()
        # etcd rebuilt from nothing: its revisions start again near 1.
        fresh = EtcdServer(tmp_path / "etcd-rebuilt").start()
        before = _owner_tokens(spool)
        rebuilt = Cluster(tmp_path, fresh, enabled=True, smarthost=f"127.0.0.1:{sink.port}")
        try:
            rebuilt.start_node("n3")
            rebuilt.wait(rebuilt.settled({"n3"}), 30, "n3 owns every shard after the rebuild")
            assert all(t > before[s] for s, t in _owner_tokens(spool).items())
        finally:
            rebuilt.stop()
            fresh.stop()
    finally:
        sink.stop()


async def test_a_node_that_lost_its_owner_key_cannot_learn_or_raise_the_token_base(
        tmp_path: Path, etcd: EtcdServer) -> None:
    # A node stalled between winning the owner key and computing its token: its key is gone
    # (lease expired) and a successor claimed with a raised base. The stale node must get no
    # token at all, or its claim could outbid the live owner's on disk.
    import aetcd

    from cluster.coordinator import EtcdCoordinator
    from tests.support import make_config

    class Spool:  # the node side of ShardHost that the token needs: the recorded token
        def __init__(self, recorded: int) -> None:
            self.recorded = recorded

        async def recorded_token(self, shard: int) -> int:
            return self.recorded

    name = f"t{uuid.uuid4().hex[:8]}"

    def coordinator(node: str, recorded: int) -> EtcdCoordinator:
        cfg = make_config(tmp_path / "spool", node={"id": node},
                          cluster={"etcd": [etcd.endpoint], "name": name, "lease_ttl": 3.0})
        c = EtcdCoordinator(cfg)
        c._host = Spool(recorded)  # type: ignore[assignment]
        return c

    host, port = etcd.endpoint.rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    key = f"/mta/{name}/owner/5".encode()
    a, b = coordinator("a", 0), coordinator("b", 10**12)
    try:
        await client.put(key, b"a")
        rev_a = (await client.get(key)).create_revision
        assert await a._fencing_token(5, rev_a) == rev_a  # no base yet
        await client.delete(key)  # a's lease expired while it stalled
        await client.put(key, b"b")
        rev_b = (await client.get(key)).create_revision
        token_b = await b._fencing_token(5, rev_b)  # the spool holds 10**12: base raised
        assert token_b is not None and token_b > 10**12
        assert await a._fencing_token(5, rev_a) is None  # stale: no token, no raise
        base = int((await client.get(f"/mta/{name}/token_base".encode())).value)
        assert base + rev_b == token_b
    finally:
        for c in (a, b):
            await c.store.close()
        await client.close()
