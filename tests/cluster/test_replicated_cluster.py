"""The replicated spool with real node processes on a real etcd, each node its own spool
directory (no shared filesystem): a node killed under load with its disk wiped loses no
acknowledged message."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.support import EtcdServer, Sink, SinkScript
from tests.support import wait_until_sync as _poll
from tests.support.cluster import SHARDS, TTL, Cluster, Load, all_delivered


def _sync_members(c: Cluster) -> dict[int, set[str]]:
    import json

    out = {}
    for key, (value, _rev) in c.etcd.get_prefix(c.prefix + "sync/").items():
        out[int(key.rsplit("/", 1)[1])] = set(json.loads(value)["members"])
    return out


@pytest.mark.slow
def test_sigkill_and_disk_loss_under_load_lose_no_acknowledged_message(
        tmp_path: Path, etcd: EtcdServer) -> None:
    # Closed (451) until the kill: every acknowledged message is still queued then, so the
    # victim's share exists only on its followers' copies once its disk is gone.
    open_ = threading.Event()
    sink = Sink("127.0.0.1", 0, SinkScript(
        data_reply=lambda _rcpts, _n: None if open_.is_set() else "451 4.3.0 not yet"))
    sink.start()
    c = Cluster(tmp_path, etcd, replicas=2, enabled=True, smarthost=f"127.0.0.1:{sink.port}",
                max_connections=2, retry_initial="300ms", retry_max="1s")
    load = Load()
    acked = load.acked
    try:
        for n in ("n1", "n2", "n3"):
            c.start_node(n)
        c.wait(c.settled({"n1", "n2", "n3"}), 30, "settled")
        # Every shard has its second copy in the in-sync set before the load starts.
        _poll(lambda: len(m := _sync_members(c)) == SHARDS
              and all(len(v) >= 2 for v in m.values()), 60, "every shard on two copies")
        load.start([c.nodes[n].smtp_port for n in ("n1", "n2", "n3")])
        _poll(lambda: {k.split("-")[0] for k in list(acked)} == {"0", "1", "2"}
              and len(acked) >= 60, 30, "mail acknowledged by every node")
        victim = "n2"
        c.nodes[victim].kill()  # under load: its last acknowledgements were just sent
        shutil.rmtree(c.spool_of(victim))  # the disk is gone with the node
        t_kill = time.monotonic()
        load.stop()
        assert not sink.messages, "nothing may have been delivered before the kill"
        open_.set()
        c.wait(c.settled({"n1", "n3"}), TTL + 15, "survivors own every shard")
        rto = time.monotonic() - t_kill
        got = all_delivered(acked, sink.messages, 90, max_dupes=2 * 2)
        dupes = {k: v for k, v in got.items() if v > 1}
        print(f"replicated failover with disk loss: {len(acked)} acked, takeover {rto:.2f}s, "
              f"duplicates {len(dupes)}")
    finally:
        load.stop()
        c.stop()
        sink.stop()
