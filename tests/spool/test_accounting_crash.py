"""SIGKILL between a batch's spool write and its accounting write: recovery makes the log say
what the spool says (no final record without its Reception, no recipient without its final
record, no line twice, no torn line)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mta.accounting import AccountingLog
from mta.envelope import Envelope, new_message_id
from mta.spool import Spool, SpoolError, ownership
from mta.spool.record import encode_msg
from mta.spool.recovery import recover_shard
from mta.spool.sidelines import missing_lines
from tests.support import ROOT, NodeProcess, Sink, node_config

FINAL = ("Delivery", "Bounce", "Expiration", "AdminBounce")


def _records(acct: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in acct.read_bytes().split(b"\n") if line]


def _settled(recs: list[dict[str, Any]]) -> bool:
    finals = {(r["message_id"], r["recipient"]) for r in recs if r["type"] in FINAL}
    return all((r["message_id"], x) in finals
               for r in recs if r["type"] == "Reception" for x in r["recipients"])


@pytest.mark.parametrize("scenario", ["reception", "done", "done-torn"])
def test_kill_between_spool_and_accounting_writes(tmp_path: Path, scenario: str) -> None:
    spool, acct = tmp_path / "spool", tmp_path / "acct.jsonl"
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.support.crash_points", str(spool), str(acct), scenario],
        cwd=ROOT, capture_output=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    stored = next(json.loads(line[4:]) for line in crashed.stdout.decode().splitlines()
                  if line.startswith("IDS "))
    if scenario == "done-torn":
        assert not acct.read_bytes().endswith(b"\n"), "the kill was to leave a torn line"

    sink = Sink("127.0.0.1", 0)
    sink.start()
    raw = node_config(spool, delivery={
        "enabled": True, "smarthost": f"127.0.0.1:{sink.port}", "accounting_log": str(acct),
        "retry_initial": "200ms", "retry_max": "1s"})
    node = NodeProcess(tmp_path, raw).start()
    try:
        deadline = time.monotonic() + 30
        while not _settled(recs := _records(acct)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        node.kill()
        sink.stop()

    receptions = Counter(r["message_id"] for r in recs if r["type"] == "Reception")
    assert set(stored) <= set(receptions), "a stored message lost its Reception"
    assert max(receptions.values()) == 1, receptions
    expected = {(r["message_id"], x) for r in recs if r["type"] == "Reception"
                for x in r["recipients"]}
    finals = Counter((r["message_id"], r["recipient"]) for r in recs if r["type"] in FINAL)
    assert set(finals) == expected, (sorted(expected - set(finals)),
                                     sorted(set(finals) - expected))
    assert max(finals.values()) == 1, finals
    assert not any(r.get("replayed") for r in recs), "our own file is verifiable"
    delivered = [m.content.split(b"X-Test-Id: ")[1].split(b"\r\n")[0] for m in sink.messages]
    if scenario == "reception":
        # The fourth message reached the disk, so it is delivered and must be accounted for.
        assert sorted(set(delivered)) == [b"1", b"2", b"3", b"4"]
        assert len(receptions) == 4
    else:
        # The first was recorded delivered before the kill: never sent again.
        assert sorted(set(delivered)) == [b"2", b"3"]
        assert [r["type"] for r in recs if r["message_id"] == stored[0]] == [
            "Reception", "Delivery", "Delivery"]


async def test_lines_of_another_nodes_file_are_checked_at_their_offset_or_replayed(
        tmp_path: Path) -> None:
    """A new owner reads the old owner's file where the COMMIT says; if it cannot, the newest
    batch is written again, marked, rather than lost."""
    a = AccountingLog(tmp_path / "a.jsonl", "node-a")
    await a.start()
    l1 = b'{"type":"Reception","message_id":"m1"}\n'
    l2 = b'{"type":"Delivery","message_id":"m1","recipient":"r@x.test"}\n'
    at1 = a.side_at()
    a.advance(len(l1))
    a.write(l1)
    at2 = a.side_at()
    a.advance(len(l2))  # promised, then killed before the write
    b = AccountingLog(tmp_path / "b.jsonl", "node-b")
    await b.start()
    commits = [(at1, l1), (at2, l2)]
    assert missing_lines(commits, b) == l2
    a.write(l2)
    assert missing_lines(commits, b) == b""
    (tmp_path / "a.jsonl").rename(tmp_path / "a.jsonl.1")
    assert missing_lines(commits, b) == (
        b'{"type":"Delivery","message_id":"m1","recipient":"r@x.test","replayed":true}\n')
    await a.close()
    await b.close()


async def test_records_after_the_last_commit_are_dropped_by_recovery(tmp_path: Path) -> None:
    """A whole record with no COMMIT after it belongs to a batch that never completed (never
    acknowledged, its lines never written): recovery cuts it off instead of delivering it."""
    spool = Spool(tmp_path / "spool", "n1", shards=1)
    await spool.start()
    await spool.acquire_shard(0, 1)
    kept = await spool.submit(Envelope("a@x.test", ["b@y.test"]), b"Subject: kept\r\n\r\nx\r\n")
    await spool.close()
    seg = max((tmp_path / "spool" / "shard-000").glob("seg-*.log"))
    size = seg.stat().st_size
    with seg.open("ab") as fh:
        fh.write(encode_msg("01M8P6A0M20000C68WTX8G0000", {"from": "a@x.test",
                                                           "to": ["c@y.test"]}, b"orphan"))
    spool = Spool(tmp_path / "spool", "n1", shards=1)
    await spool.start()
    try:
        report = await spool.acquire_shard(0, 2)
        assert [ref.id for ref in spool.live_messages(0)] == [kept]
        assert report.uncommitted == 1
        assert seg.stat().st_size == size
    finally:
        await spool.close()


async def test_lines_an_earlier_process_promised_are_not_confused_with_ours(
        tmp_path: Path) -> None:
    """Past what the file held when this process opened it lie this process's own lines: an
    earlier process's promise at that offset is missing, not unknowable."""
    path = tmp_path / "acct.jsonl"
    path.write_bytes(b'{"type":"Reception","message_id":"m0"}\n')
    log_ = AccountingLog(path, "n1")
    await log_.start()
    opened = path.stat().st_size
    promised = b'{"type":"Delivery","message_id":"m0","recipient":"r@x.test"}\n'
    at = {**log_.side_at(), "e": "an-earlier-process"}
    ours = b'{"type":"Reception","message_id":"m1","recipient":"s@x.test"}\n'
    assert len(ours) >= len(promised) and at["o"] == opened
    log_.advance(len(ours))
    log_.write(ours)
    assert log_.verify(at, promised) == 0
    assert missing_lines([(at, promised)], log_) == promised
    await log_.close()


async def test_a_failed_append_moves_no_accounting_offset(tmp_path: Path) -> None:
    """Lines of a batch whose spool write failed are never written, so the next COMMIT's
    offset must be where its own lines really land."""
    acct = tmp_path / "acct.jsonl"
    side = AccountingLog(acct, "n1")
    spool = Spool(tmp_path / "spool", "n1", shards=2, side_log=side)
    await spool.start()
    await side.start()
    for n in range(2):
        await spool.acquire_shard(n, 1)
    # Another owner claims shard 0 under our feet: its next append is refused.
    ownership.claim(tmp_path / "spool" / "shard-000", 0, ownership.OwnerToken("n2", 5))
    env = Envelope("a@x.test", ["b@y.test"])
    with pytest.raises(SpoolError):
        await spool.submit(env, b"Subject: a\r\n\r\nx\r\n", new_message_id(0))
    await spool.submit(env, b"Subject: b\r\n\r\nx\r\n", new_message_id(1))
    await spool.close()
    await side.close()
    _, report = recover_shard(tmp_path / "spool" / "shard-001", 1)
    side_at, lines = report.commits[-1]
    assert lines and acct.read_bytes()[side_at["o"]:side_at["o"] + len(lines)] == lines
