"""The SLO history: its counts are the accounting log's, across SIGTERM and SIGKILL, and a node
that was ready all along reads availability 1.0 from its first second.

Unit tests drive the line scanner, the log reader (partial lines, rotation, truncation) and
the tracker with a hand-moved clock; the end-to-end tests run real node processes delivering
to a real SMTP sink and reconcile ``mtactl slo`` against the accounting log line by line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mta.accounting import AccountingLog
from mta.slo import (
    DELIVERED,
    SUBMITTED,
    LogPosition,
    LogScanner,
    SloTracker,
    count_lines,
    merge_reports,
)
from tests.support import (
    AnyAddress,
    NodeProcess,
    Sink,
    SinkScript,
    ctl_json,
    node_config,
    read_accounting,
    submit,
    wait_until_sync,
)

OBJECTIVES = {"availability": 0.999, "submit_p99": 1.0, "delivery_success": 0.999}
T0 = 1_800_000_000.0  # a minute boundary
_ACCT = AccountingLog("/nonexistent", "n1")  # only its encoder: the lines a node writes


def _line(kind: str, at: float, **fields: Any) -> bytes:
    line = _ACCT.line(kind, "m1", recipient="r@x.test", sender="s@y.test", **fields)
    record = json.loads(line)
    record["time"] = at
    # Re-encode as the node does, with the time we want.
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# --- the line scanner ---------------------------------------------------------------------


def test_each_kind_counts_where_the_slo_says() -> None:
    data = b"".join([
        _line("Reception", T0 + 1),
        _line("Delivery", T0 + 2),
        _line("TransientFailure", T0 + 3),
        _line("Expiration", T0 + 4, bounce_class="other"),
        _line("Bounce", T0 + 5, bounce_class="policy"),
        # The recipient's fault, and the operator's: not our failures.
        _line("Bounce", T0 + 6, bounce_class="bad-mailbox"),
        _line("Bounce", T0 + 7, bounce_class="inactive-mailbox"),
        _line("AdminBounce", T0 + 8),
        # A reply quoting the key cannot pass for it: the quotes are escaped in a string.
        _line("Bounce", T0 + 9, response='550 "bounce_class":"policy"',
              bounce_class="bad-mailbox"),
        # Lines recovery wrote again after a kill were never in the file: they count.
        _ACCT.replayed(_line("Delivery", T0 + 61)),
        b"not json at all\n",
        b'{"time":1,"type":"Delivery"}\n',  # not our encoder's key order
    ])
    counts: dict[int, list[int]] = {}
    assert count_lines(data, counts) == 6
    minute = int(T0 // 60)
    assert counts == {minute: [1, 1, 1, 2], minute + 1: [0, 1, 0, 0]}


def test_a_line_in_utf8_with_odd_times_is_counted() -> None:
    data = (_line("Reception", T0 + 59.999999, size=5).replace(b"s@y.test", "é@ü.test".encode())
            + _line("Delivery", T0 + 60))
    counts: dict[int, list[int]] = {}
    count_lines(data, counts)
    assert counts == {int(T0 // 60): [1, 0, 0, 0], int(T0 // 60) + 1: [0, 1, 0, 0]}


# --- reading the file ---------------------------------------------------------------------


def _total(counts: dict[int, list[int]]) -> list[int]:
    return [sum(c[i] for c in counts.values()) for i in range(4)]


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_scanner_reads_whole_lines_from_where_it_was(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    scanner = LogScanner(str(path))
    counts, pos = scanner.scan(LogPosition())
    assert counts == {} and pos == LogPosition()  # no file yet: nothing, and no position
    line = _line("Delivery", T0)
    _append(path, line + line[:20])  # the second line still being written
    counts, pos = scanner.scan(pos)
    assert _total(counts)[DELIVERED] == 1 and pos.offset == len(line)
    _append(path, line[20:])
    counts, pos = scanner.scan(pos)
    assert _total(counts)[DELIVERED] == 1 and pos.offset == 2 * len(line)
    assert scanner.scan(pos) == ({}, pos)
    scanner.close()
    # A restarted node reads on from the saved position, not from the start.
    _append(path, line)
    counts, pos = LogScanner(str(path)).scan(pos)
    assert _total(counts)[DELIVERED] == 1 and pos.offset == 3 * len(line)


def test_scanner_reads_a_line_longer_than_its_chunk(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mta.slo._CHUNK", 64)
    path = tmp_path / "acct.jsonl"
    big = _line("Reception", T0, recipients=[f"r{i}@x.test" for i in range(50)])
    _append(path, big + _line("Delivery", T0))
    counts, pos = LogScanner(str(path)).scan(LogPosition())
    assert _total(counts) == [1, 1, 0, 0] and pos.offset == path.stat().st_size


def test_renamed_log_is_read_to_its_end_before_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    _append(path, _line("Reception", T0))
    scanner = LogScanner(str(path))
    counts, pos = scanner.scan(LogPosition())
    assert _total(counts)[SUBMITTED] == 1
    # Rotation by renaming: the node keeps writing to the renamed file (it keeps it open).
    os.rename(path, tmp_path / "acct.jsonl.1")
    _append(tmp_path / "acct.jsonl.1", _line("Reception", T0))
    counts, pos = scanner.scan(pos)
    assert _total(counts)[SUBMITTED] == 1
    path.touch()  # an empty new file (logrotate's "create"): the writer has not moved yet
    _append(tmp_path / "acct.jsonl.1", _line("Reception", T0))
    counts, pos = scanner.scan(pos)
    assert _total(counts)[SUBMITTED] == 1
    # The writer moved on: its last lines in the old file, then those in the new one.
    _append(tmp_path / "acct.jsonl.1", _line("Reception", T0))
    _append(path, _line("Delivery", T0) * 2)
    counts, pos = scanner.scan(pos)
    assert _total(counts) == [1, 2, 0, 0]
    assert pos.ident == f"{path.stat().st_dev}:{path.stat().st_ino}"
    assert pos.offset == path.stat().st_size


def test_another_file_or_a_shorter_one_starts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    _append(path, _line("Delivery", T0) * 3)
    _, pos = LogScanner(str(path)).scan(LogPosition())
    # Restarted after a rotation: the position is in a file that is no longer there.
    os.rename(path, tmp_path / "old")
    _append(path, _line("Delivery", T0))
    counts, new = LogScanner(str(path)).scan(pos)
    assert _total(counts)[DELIVERED] == 1 and new.ident != pos.ident
    # Copy-and-truncate: the same file, shorter than the position.
    os.truncate(path, 0)
    _append(path, _line("Reception", T0))
    counts, _ = LogScanner(str(path)).scan(new)
    assert _total(counts) == [1, 0, 0, 0]


def test_same_inode_with_other_bytes_before_the_offset_starts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    _append(path, _line("Delivery", T0))
    _, pos = LogScanner(str(path)).scan(LogPosition())
    # Truncated and written again past the old offset between two reads (or an inode
    # number reused by a new file): the offset means nothing there any more.
    os.truncate(path, 0)
    _append(path, _line("Reception", T0 + 1) * 3)
    counts, _ = LogScanner(str(path)).scan(pos)
    assert _total(counts) == [3, 0, 0, 0]


# --- the tracker, on a hand-moved clock -----------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tracker(tmp_path: Path, clock: Clock, ready: Any = lambda: True,
             tick: float = 5.0) -> SloTracker:
    tracker = SloTracker(str(tmp_path / "slo.json"), CollectorRegistry(), ready,
                         str(tmp_path / "acct.jsonl"), tick=tick, clock=clock)
    tracker.load()
    return tracker


def _report(*trackers: SloTracker, window: float = 86400) -> dict[str, Any]:
    # Through JSON, as peers' answers travel.
    raws = [json.loads(json.dumps(t.raw(window))) for t in trackers]
    return merge_reports(raws, OBJECTIVES, window)


def _run(tracker: SloTracker, clock: Clock, seconds: float, first: bool = True) -> None:
    """What the loop does for ``seconds``: a sample when it starts (``first``), then one
    every tick."""
    end = clock.now + seconds
    if first:
        tracker.sample()
    for _ in range(int(seconds / tracker.tick)):
        clock.now += tracker.tick
        tracker.sample()
    clock.now = end


def test_a_fresh_node_reads_full_availability_from_its_first_second(tmp_path: Path) -> None:
    clock = Clock(T0 + 50)  # ten seconds before a minute ends
    tracker = _tracker(tmp_path, clock)
    report = _report(tracker)  # before its first sample: its readiness now is known
    assert report["checks"]["availability"]["value"] == 1.0
    assert report["node_availability"] == 1.0
    for seconds in (0.5, 9.9, 10.1, 90, 300):
        clock.now = T0 + 50
        tracker = _tracker(tmp_path / str(seconds), clock)
        _run(tracker, clock, seconds)
        report = _report(tracker)
        assert report["checks"]["availability"]["value"] == 1.0, seconds
        assert report["node_availability"] == 1.0, seconds
        assert _report(tracker, window=3600)["checks"]["availability"]["value"] == 1.0


def test_time_down_counts_pro_rata(tmp_path: Path) -> None:
    clock = Clock(T0)
    state = {"ready": True}
    first = _tracker(tmp_path, clock, ready=lambda: state["ready"])
    _run(first, clock, 120)
    clock.now += 1
    state["ready"] = False  # a stopping node drains: not ready
    asyncio.run(first.stop())
    clock.now += 119
    state["ready"] = True
    second = _tracker(tmp_path, clock, ready=lambda: state["ready"])
    _run(second, clock, 120)
    report = _report(second)
    # Up from T0 to T0+121 and from T0+240 to now, T0+360. Minute 3 alone had no ready
    # sample; minute 6 has just begun.
    assert report["checks"]["availability"]["value"] == pytest.approx(300 / 360, abs=1e-6)
    assert report["node_availability"] == pytest.approx(241 / 360, abs=1 / 72)


def test_an_unready_node_is_unavailable(tmp_path: Path) -> None:
    clock = Clock(T0 + 30)
    state = {"ready": True}
    tracker = _tracker(tmp_path, clock, ready=lambda: state["ready"])
    _run(tracker, clock, 60)
    state["ready"] = False
    _run(tracker, clock, 180, first=False)
    report = _report(tracker)
    # Ready until T0+90 (in minutes 0 and 1), then not: minutes 2, 3 and the current one
    # (the 30 s of minute 4) had no ready sample.
    assert report["checks"]["availability"]["value"] == pytest.approx(90 / 240)
    assert report["node_availability"] == pytest.approx(60 / 240, abs=2 / 48)


def test_counts_survive_a_kill_between_saves(tmp_path: Path) -> None:
    acct = tmp_path / "acct.jsonl"
    clock = Clock(T0 + 5)
    tracker = _tracker(tmp_path, clock)
    _append(acct, _line("Reception", clock.now) + _line("Delivery", clock.now))
    tracker.sample()
    asyncio.run(tracker.save())
    clock.now += 30
    _append(acct, _line("Reception", clock.now) + _line("Bounce", clock.now,
                                                          bounce_class="policy"))
    tracker.sample()  # counted, never saved: then kill -9
    assert _report(tracker)["submitted"] == 2
    tracker.scanner.close()
    clock.now += 40
    again = _tracker(tmp_path, clock)
    again.sample()
    report = _report(again)
    assert (report["submitted"], report["delivered"], report["failed"]) == (2, 1, 1)
    # A second tracker racing the first over the same position counts nothing twice.
    _append(acct, _line("Delivery", clock.now))
    start = again.position
    late = again.scanner.scan(start)
    again.sample()
    again._apply(start, *late)
    assert _report(again)["delivered"] == 2


def test_history_from_before_the_log_counts_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    # A file of the counter-sampling version: minutes in "first", counts, no log position.
    minute = int(T0 // 60)
    old = {"first": minute, "minutes": {str(minute): [7, 7, 7, 7, 12, 12, [0] * 13]}}
    (tmp_path / "slo.json").write_text(json.dumps(old))
    _append(tmp_path / "acct.jsonl", _line("Reception", T0 + 3) + _line("Delivery", T0 + 4))
    clock = Clock(T0 + 61)
    tracker = _tracker(tmp_path, clock)
    tracker.sample()
    report = _report(tracker)
    assert (report["submitted"], report["delivered"], report["deferred"]) == (1, 1, 0)
    assert report["checks"]["availability"]["value"] == 1.0


def test_lines_older_than_the_history_are_left_out(tmp_path: Path) -> None:
    _append(tmp_path / "acct.jsonl", _line("Delivery", T0 - 86400 - 60) + _line("Delivery", T0))
    clock = Clock(T0 + 1)
    tracker = _tracker(tmp_path, clock)
    tracker.sample()
    assert _report(tracker)["delivered"] == 1


def test_service_availability_is_any_node_ready_by_the_clock() -> None:
    base = {"delivered": 0, "deferred": 0, "failed": 0, "submits": 0,
            "submit_buckets": [0] * 13}
    a = {**base, "samples": 12, "ready": 12, "expected": 12, "ready_minutes": [100],
         "minutes": 1, "begin": 6000.0, "now": 6060.0}
    b = {**base, "samples": 24, "ready": 12, "expected": 24, "ready_minutes": [101],
         "minutes": 2, "begin": 6000.0, "now": 6090.0}
    report = merge_reports([a, b], OBJECTIVES, 3600)
    assert report["checks"]["availability"]["value"] == 1.0
    assert report["node_availability"] == pytest.approx(24 / 36)
    # Without b, the half minute since a's last sample in minute 101 had no ready node.
    a_late = {**a, "ready_minutes": [100], "now": 6090.0}
    assert merge_reports([a_late], OBJECTIVES, 3600)["checks"]["availability"]["value"] == (
        pytest.approx(60 / 90))
    # A peer of the previous version (no begin/now) still merges, by whole minutes.
    old = {k: v for k, v in b.items() if k not in ("begin", "now")}
    assert merge_reports([old], OBJECTIVES, 3600)["checks"]["availability"]["value"] == 0.5


# --- real node processes ------------------------------------------------------------------


def _reply(address: str, attempt: int) -> str | None:
    domain = address.lower().rpartition("@")[2]
    return {"held.test": "451 4.7.1 Greylisted, come back later",
            "gone.test": "550 5.1.1 No such user",
            "inactive.test": "550 5.2.1 Mailbox disabled",
            "policy.test": "554 5.7.1 Rejected by policy"}.get(domain)


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink("127.0.0.1", 0, SinkScript(rcpt=AnyAddress(_reply)))
    s.start()
    yield s
    s.stop()


def _raw(work: Path, sink: Sink, **slo: Any) -> dict[str, Any]:
    # held.test is deferred every second until it expires after 4 s; no probe (its mail
    # would keep adding lines).
    return node_config(
        work / "spool", spool={"shards": 4}, slo=slo,
        delivery={"enabled": True, "smarthost": f"127.0.0.1:{sink.port}",
                  "retry_initial": "1s", "retry_max": "1s", "max_age": "4s",
                  "idle_timeout": "1s", "accounting_log": str(work / "acct.jsonl")})


def _log(work: Path) -> list[dict[str, Any]]:
    return read_accounting(work / "acct.jsonl")


def _log_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """The SLO's figures, counted from the accounting log by parsing it."""
    kinds = [r["type"] for r in records]
    ours = [r for r in records if r["type"] == "Bounce"
            and r["bounce_class"] not in ("bad-mailbox", "inactive-mailbox")]
    return {"submitted": kinds.count("Reception"), "delivered": kinds.count("Delivery"),
            "deferred": kinds.count("TransientFailure"),
            "failed": kinds.count("Expiration") + len(ours)}


def _all_final(work: Path) -> bool:
    records = _log(work)
    wanted = {(r["message_id"], rcpt) for r in records if r["type"] == "Reception"
              for rcpt in r["recipients"]}
    final = {(r["message_id"], r["recipient"]) for r in records
             if r["type"] in ("Delivery", "Bounce", "Expiration", "AdminBounce")}
    return bool(wanted) and wanted == final


def _slo(node: NodeProcess) -> dict[str, int]:
    data = ctl_json(node, "slo", "--window", "24h")
    return {k: data[k] for k in ("submitted", "delivered", "deferred", "failed")}


def _submit_batch(node: NodeProcess, tag: str) -> None:
    submit(node, [f"{tag}1@ok.test", f"{tag}2@ok.test", f"{tag}@held.test"], 1)
    submit(node, [f"{tag}@gone.test", f"{tag}@inactive.test", f"{tag}3@ok.test"], 2)
    submit(node, [f"{tag}@policy.test"], 3)
    submit(node, [f"{tag}4@ok.test"], 4)


def _saved_offset(work: Path) -> int:
    try:
        return int(json.loads((work / "spool" / "slo-test-node.json").read_text())
                   ["log"]["offset"])
    except (OSError, ValueError, KeyError):
        return -1


def test_counts_reconcile_with_the_accounting_log_across_sigterm_and_sigkill(
        tmp_path: Path, sink: Sink) -> None:
    raw = _raw(tmp_path, sink, sample_interval="200ms")
    node = NodeProcess(tmp_path, raw).start()
    try:
        _submit_batch(node, "a")
        # Graceful: lines of attempts settling during the stop are counted too.
        node.signal(signal.SIGTERM)
        assert node.wait() == 0
        # The final save came after the last line: the history covers the whole log.
        assert _saved_offset(tmp_path) == (tmp_path / "acct.jsonl").stat().st_size
        node = NodeProcess(tmp_path, raw).start()
        _submit_batch(node, "b")
        size = (tmp_path / "acct.jsonl").stat().st_size
        # Counted live, and saved within a few ticks (not at the next minute).
        wait_until_sync(lambda: _slo(node)["submitted"] == _log_counts(_log(tmp_path))[
            "submitted"], 20, "the tracker to count batch b")
        wait_until_sync(lambda: _saved_offset(tmp_path) >= size, 8,
                        "a periodic save to cover batch b")
        _submit_batch(node, "c")
        wait_until_sync(lambda: _slo(node)["submitted"] == _log_counts(_log(tmp_path))[
            "submitted"], 20, "the tracker to count batch c")
        node.kill()  # kill -9: whatever was counted since the last save is not in the file
        node = NodeProcess(tmp_path, raw).start()
        _submit_batch(node, "d")
        wait_until_sync(lambda: _all_final(tmp_path), 60, "every recipient's final record")
        want = _log_counts(_log(tmp_path))
        assert want["submitted"] >= 16 + 4  # four batches, and the DSNs of their bounces
        assert min(want.values()) > 0, want
        seen: list[dict[str, int]] = []
        try:
            wait_until_sync(lambda: seen.append(_slo(node)) or seen[-1] == want, 20)
        except AssertionError:
            raise AssertionError(f"SLO counts {seen[-1]}, the log's {want}") from None
    finally:
        node.kill()


def _readyz(node: NodeProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/readyz",
                                    timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_a_fresh_node_reports_full_availability_once_ready(tmp_path: Path, sink: Sink) -> None:
    # The default 5 s sample interval: asked right away, before the loop's second sample.
    node = NodeProcess(tmp_path, _raw(tmp_path, sink)).start()
    try:
        wait_until_sync(lambda: _readyz(node), 20, "the node to be ready")
        data = ctl_json(node, "slo", "--window", "24h")
        assert data["checks"]["availability"]["value"] == 1.0, data
        assert data["node_availability"] == 1.0, data
        assert data["checks"]["availability"]["met"] and data["objectives_met"], data
    finally:
        node.kill()


def test_a_restart_after_a_rotation_reads_the_renamed_log_on_from_its_position(
        tmp_path: Path) -> None:
    acct = tmp_path / "acct.jsonl"
    clock = Clock(T0 + 5)
    tracker = _tracker(tmp_path, clock)
    _append(acct, _line("Reception", clock.now))
    tracker.sample()
    asyncio.run(tracker.save())
    tracker.scanner.close()  # then the node stops (or is killed)
    # Rotated while it was down: the old file renamed within the log's directory, the
    # writer's last lines still in it, a new file at the path.
    os.rename(acct, tmp_path / "acct.jsonl.1")
    _append(tmp_path / "acct.jsonl.1", _line("Reception", clock.now) * 2)
    _append(acct, _line("Delivery", clock.now))
    clock.now += 10
    again = _tracker(tmp_path, clock)
    again.sample()
    report = _report(again)
    assert (report["submitted"], report["delivered"]) == (3, 1), report
    clock.now += 5
    again.sample()  # and none of them again
    report = _report(again)
    assert (report["submitted"], report["delivered"]) == (3, 1), report
    # The scanner alone, from the same saved position: the renamed file's new lines once.
    saved = LogPosition.from_json({k: v for k, v in json.loads(
        (tmp_path / "slo.json").read_text())["log"].items() if k != "path"})
    counts, pos = LogScanner(str(acct)).scan(saved)
    assert _total(counts) == [2, 1, 0, 0]
    assert pos.offset == acct.stat().st_size


def test_a_trailing_partial_line_is_counted_once_it_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "acct.jsonl"
    # The partial line already has its type and time: only the newline says it is whole.
    _append(path, _line("Reception", T0) + b'{"type":"Delivery","time":1.0,')
    scanner = LogScanner(str(path))
    counts, pos = scanner.scan(LogPosition())
    assert _total(counts) == [1, 0, 0, 0]
    total = _total(counts)
    _append(path, b'"message_id":"m1"}\n')
    counts, pos = scanner.scan(pos)
    total = [a + b for a, b in zip(total, _total(counts), strict=True)]
    assert total == [1, 1, 0, 0]
    assert pos.offset == path.stat().st_size
