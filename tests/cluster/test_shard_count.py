"""The shard count is fixed for the life of a spool and of a cluster: a node whose config
disagrees refuses to start (exit 2, one line), instead of silently hiding the mail of the
shards it would not open. Real node processes, a real etcd."""

from __future__ import annotations

import signal
import smtplib
import uuid
from pathlib import Path
from typing import Any

import pytest

from mta.envelope import shard_of
from mta.spool.layout import SHARDS_FILE, ShardCountMismatch, ensure_shard_count
from mta.spool.shard import shard_dir
from tests.support import EtcdServer, NodeProcess, message, node_config, read_spool


def _refused(work: Path, raw: dict[str, Any]) -> str:
    """Start a node that must refuse: returns its one-line complaint."""
    work.mkdir(exist_ok=True)
    node = NodeProcess(work, raw)
    try:
        node.start(timeout=30)
    except RuntimeError:
        assert node.proc is not None
        assert node.proc.returncode == 2, node.log()
        errors = [line for line in node.log().splitlines() if line.startswith("mta: ")]
        assert len(errors) == 1, node.log()
        return errors[0]
    node.kill()
    pytest.fail(f"the node started although its shard count is wrong:\n{node.log()}")


def _expect_line(line: str, config: Path, configured: int, recorded: int) -> None:
    assert line.startswith(f"mta: config error: {config}: [spool] shards: is {configured}, "
                           f"but "), line
    assert f"was created with {recorded} shards; set [spool] shards = {recorded}" in line, line


def test_restart_with_fewer_shards_refuses_and_hides_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (tmp_path / "a").mkdir()
    first = NodeProcess(tmp_path / "a", node_config(spool, spool={"shards": 64})).start()
    try:
        with smtplib.SMTP("127.0.0.1", first.smtp_port, timeout=10) as smtp:
            for n in range(40):
                smtp.sendmail("a@example.com", ["b@example.org"], message(n, 500))
        first.signal(signal.SIGTERM)
        assert first.wait() == 0
    finally:
        first.kill()
    assert (spool / SHARDS_FILE).read_text() == "64\n"

    fewer = node_config(spool, spool={"shards": 32})
    line = _refused(tmp_path / "b", fewer)
    _expect_line(line, tmp_path / "b" / "node.toml", 32, 64)
    assert f"the spool {spool} (recorded in {spool / SHARDS_FILE})" in line
    # Refusing touched nothing: with the right count every message is there, including
    # those in the shards 32 would have left out.
    stored = read_spool(spool, 64)
    assert len(stored) == 40 and max(shard_of(mid) for mid in stored) >= 32


def test_spool_from_before_the_record(tmp_path: Path) -> None:
    """A spool written by an older version has no record: it gets the configured count if its
    shard directories fit it, and a refusal if one of them would be left out."""
    old = tmp_path / "old"
    for n in range(64):
        shard_dir(old, n).mkdir(parents=True)
    with pytest.raises(ShardCountMismatch, match=r"is 32, but the spool .* \(shard directories "
                                                 r"up to shard-063\) was created with at least "
                                                 r"64 shards"):
        ensure_shard_count(old, 32)
    assert not (old / SHARDS_FILE).exists()
    ensure_shard_count(old, 64)
    assert (old / SHARDS_FILE).read_text() == "64\n"
    assert not [p for p in old.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ShardCountMismatch, match="was created with 64 shards"):
        ensure_shard_count(old, 128)  # more is refused as well: ids name their shard

    small = tmp_path / "small"
    for n in range(16):
        shard_dir(small, n).mkdir(parents=True)
    ensure_shard_count(small, 64)  # nothing left out
    assert (small / SHARDS_FILE).read_text() == "64\n"


def test_a_record_without_any_shard_is_replaced(tmp_path: Path) -> None:
    """A start refused before it opened a shard (by the cluster's count, say) must not leave
    a record that refuses the corrected config: that spool never held mail."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / SHARDS_FILE).write_text("32\n")
    ensure_shard_count(spool, 64)
    assert (spool / SHARDS_FILE).read_text() == "64\n"


def _cluster_node(work: Path, spool: Path, etcd: EtcdServer, name: str, node_id: str,
                  shards: int) -> dict[str, Any]:
    work.mkdir(exist_ok=True)
    return node_config(spool, node={"id": node_id}, spool={"shards": shards},
                       cluster={"etcd": [etcd.endpoint], "name": name, "lease_ttl": 3.0},
                       delivery={"accounting_log": str(work / "acct.jsonl")})


def test_cluster_member_with_another_count_is_refused(tmp_path: Path, etcd: EtcdServer
                                                      ) -> None:
    name = f"t{uuid.uuid4().hex[:8]}"
    a = NodeProcess(tmp_path / "a",
                    _cluster_node(tmp_path / "a", tmp_path / "spool-a", etcd, name, "a", 64))
    a.start(timeout=30)
    try:
        assert etcd.get_prefix(f"/mta/{name}/shards")[f"/mta/{name}/shards"][0] == b"64"
        # Its own (empty) spool: only the cluster's record can tell it is wrong.
        line = _refused(tmp_path / "b",
                        _cluster_node(tmp_path / "b", tmp_path / "spool-b", etcd, name, "b", 32))
        _expect_line(line, tmp_path / "b" / "node.toml", 32, 64)
        assert f"cluster '{name}' (etcd key /mta/{name}/shards;" in line
        assert f"/mta/{name}/nodes/b" not in etcd.get_prefix(f"/mta/{name}/nodes/")
        # Corrected, it joins: the refused start left nothing behind that blocks it.
        b = NodeProcess(tmp_path / "b",
                        _cluster_node(tmp_path / "b", tmp_path / "spool-b", etcd, name, "b", 64))
        b.start(timeout=30)
        b.kill()
        # Sharing the cluster's spool, the spool's own record refuses it first.
        line = _refused(tmp_path / "c",
                        _cluster_node(tmp_path / "c", tmp_path / "spool-a", etcd, name, "c", 32))
        _expect_line(line, tmp_path / "c" / "node.toml", 32, 64)
    finally:
        a.kill()


def test_cluster_from_before_the_record_keeps_its_assignment(tmp_path: Path,
                                                             etcd: EtcdServer) -> None:
    """No shards key yet, but the leader of an older version assigned shard 40: a node with
    32 shards must not become the one that records the count."""
    name = f"t{uuid.uuid4().hex[:8]}"
    etcd.put(f"/mta/{name}/assign/40", b"old-node")
    line = _refused(tmp_path / "n",
                    _cluster_node(tmp_path / "n", tmp_path / "spool", etcd, name, "n", 32))
    assert "was created with at least 41 shards" in line and "assigns shard 40" in line
    assert f"/mta/{name}/shards" not in etcd.get_prefix(f"/mta/{name}/")
