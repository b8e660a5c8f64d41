"""Hostile configuration and SLO state: what a node refuses to start with, and what it starts
despite.

A config value that would break the node once running (``nan``/``inf`` or absurdly long
durations, TOML nested past the parser's recursion) is a one-line error from ``mta --check``
(exit 2) and from a SIGHUP reload (``node.reload_failed``, no traceback). The SLO history in
the spool is the node's own file, but whatever is in it the node starts: what is malformed is
dropped with a warning. And a log renamed away before a ``kill -9`` is read on from the saved
position before the new file."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mta.accounting import AccountingLog
from mta.config import ConfigError, config_from_dict, load_config
from mta.metrics import SUBMIT_BUCKETS
from mta.slo import LogPosition, LogScanner, SloTracker, merge_reports
from tests.support import NodeProcess, ctl_json, node_config, wait_until_sync
from tests.support.ctl import mta, one_line_error

T0 = 1_800_000_000.0  # a minute boundary
MINUTE = int(T0 // 60)
OBJECTIVES = {"availability": 0.999, "submit_p99": 1.0, "delivery_success": 0.999}
DEEP_TOML = "a=" + "[" * 2000 + "]" * 2000 + "\n"
_ACCT = AccountingLog("/nonexistent", "n1")  # only its encoder: the lines a node writes




# --- durations, ratios, sizes ------------------------------------------------------------


@pytest.mark.parametrize(("section", "key", "value"), [
    ("smtp", "command_timeout", math.nan),
    ("smtp", "data_timeout", math.inf),
    ("slo", "sample_interval", math.nan),
    ("delivery", "retry_initial", math.nan),
    ("delivery", "retry_max", math.inf),
    ("delivery", "keepalive", math.nan),  # a duration or 0 for off
    ("probe", "interval", math.inf),
    ("cluster", "lease_ttl", 1e12),  # finite, but no timer should be set that far
    pytest.param("delivery", "max_age", 10**400, id="int-no-float-holds"),
    pytest.param("delivery", "connect_timeout", "9" * 400 + "s", id="string-parsing-to-inf"),
    ("delivery", "max_age", "3651d"),
    ("slo", "availability", math.nan),
    ("spool", "compact_live_ratio", math.inf),
    ("smtp", "max_message_size", math.nan),
    ("spool", "segment_size", math.inf),
])
def test_non_finite_and_absurd_numbers_are_refused_naming_the_key(
        section: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({section: {key: value}})
    assert exc.value.key == f"[{section}] {key}"
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 300


def test_ten_years_is_the_longest_duration() -> None:
    cfg = config_from_dict({"delivery": {"max_age": "3650d", "keepalive": 0},
                            "probe": {"interval": "0s"}})
    assert cfg.delivery.max_age == 3650 * 86400.0
    assert cfg.delivery.keepalive == 0.0 and cfg.probe.interval == 0.0  # still "off"


@pytest.mark.parametrize(("toml", "key"), [
    ("[smtp]\ncommand_timeout = nan\n", "[smtp] command_timeout"),
    ("[slo]\nsample_interval = nan\n", "[slo] sample_interval"),
    ("[delivery]\nretry_initial = inf\n", "[delivery] retry_initial"),
    ("[delivery]\nkeepalive = -nan\n", "[delivery] keepalive"),
])
def test_mta_check_refuses_non_finite_durations_in_one_line(tmp_path: Path, toml: str,
                                                            key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    line = one_line_error(mta("--config", str(path), "--check", cwd=tmp_path))
    assert f"{path}: {key}: expected a finite duration" in line


# --- TOML nested past the parser's recursion ----------------------------------------------


def test_deeply_nested_toml_is_a_one_line_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(DEEP_TOML)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
    line = one_line_error(mta("--config", str(path), "--check", cwd=tmp_path))
    assert "nested too deeply" in line


def test_sighup_with_deeply_nested_toml_keeps_the_node_and_logs_reload_failed(
        tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, node_config(tmp_path / "spool")).start()
    try:
        node.config_path.write_text(DEEP_TOML)
        node.signal(signal.SIGHUP)
        wait_until_sync(lambda: "node.reload_failed" in node.log(), 20,
                        "node.reload_failed in the log")
        assert "Traceback" not in node.log()
        assert ctl_json(node, "slo")["nodes"] == 1  # still serving
    finally:
        node.kill()


# --- the SLO history file -------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tracker(tmp_path: Path, clock: Clock) -> SloTracker:
    tracker = SloTracker(str(tmp_path / "slo.json"), CollectorRegistry(), lambda: True,
                         str(tmp_path / "acct.jsonl"), tick=5.0, clock=clock)
    tracker.load()
    return tracker


def _report(tracker: SloTracker) -> dict[str, Any]:
    raw = json.loads(json.dumps(tracker.raw(86400)))  # through JSON, as peers' answers travel
    return merge_reports([raw], OBJECTIVES, 86400)


def _minute(samples: int = 12, ready: int = 12) -> list[Any]:
    return [0, 0, 0, 0, samples, ready, [0] * (len(SUBMIT_BUCKETS) + 1)]


@pytest.mark.parametrize("content", [
    "", "not json", "[]", "null", '"text"', "[" * 100_000,
    '{"minutes": []}', '{"minutes": "abc"}', "{}",
    '{"minutes": {}, "starts": "abc", "log": 5, "first_at": "x"}',
    '{"minutes": {}, "starts": [NaN, Infinity, -1, "x", null], "first": "x"}',
    '{"minutes": {}, "log": {"ident": 1, "offset": -5, "tail": null}}',
    '{"minutes": {}, "log": {"ident": "1:2", "offset": 1e400, "tail": ""}}',
    '{"minutes": {"1" : 1, "x": [], "NaN": "abcdefg"}}',
])
def test_whatever_the_history_file_holds_the_tracker_starts(tmp_path: Path,
                                                            content: str) -> None:
    (tmp_path / "slo.json").write_text(content)
    clock = Clock(T0 + 30)
    tracker = _tracker(tmp_path, clock)
    tracker.sample()
    clock.now += 5
    tracker.sample()
    report = _report(tracker)
    assert report["checks"]["availability"]["value"] == 1.0
    assert report["node_availability"] == 1.0


def _bad_minutes() -> dict[str, Any]:
    buckets = [0] * (len(SUBMIT_BUCKETS) + 1)
    return {
        str(MINUTE): "abcdefg",
        str(MINUTE - 1): [0, 0, 0, 0, 12, 12, [0] * 3],  # buckets of the wrong length
        str(MINUTE - 2): [math.nan, 0, 0, 0, 12, 12, buckets],
        str(MINUTE - 3): [0, 0, -1, 0, 12, 12, buckets],
        str(MINUTE - 4): [0, 0, 0, 0, 12, 13, buckets],  # more ready than samples
        str(MINUTE - 5): [0, 0, 0, 0, 12, 12, [*buckets[:-1], math.inf]],
        str(MINUTE - 6): [0, 0, 0, 0, 12, 12],
        str(MINUTE - 7): [True, 0, 0, 0, 12, 12, buckets],
        "abc": _minute(),
    }


def test_malformed_minutes_are_dropped_and_the_well_formed_kept(tmp_path: Path) -> None:
    good = MINUTE - 8
    state = {"first_at": good * 60.0, "starts": [good * 60.0],
             "minutes": {**_bad_minutes(), str(good): _minute(12, 12)}}
    (tmp_path / "slo.json").write_text(json.dumps(state))
    clock = Clock(T0 + 30)
    tracker = _tracker(tmp_path, clock)
    assert set(tracker.minutes) == {good}
    tracker.sample()  # every tick failed on the "abcdefg" minute
    clock.now += 5
    tracker.sample()
    raw = tracker.raw(86400)
    assert raw["samples"] == 12 + 2 + 1 and raw["ready"] == 12 + 2 + 1
    report = _report(tracker)
    # Ready in minute "good" and the current one only: 60 + 35 s of the 8.5 minutes since.
    assert report["checks"]["availability"]["value"] == pytest.approx(95 / 515, abs=1e-6)


@pytest.mark.parametrize("first_at", ["NaN", "Infinity", "-Infinity", "-5", "1e300",
                                      str(T0 + 3600), '"x"', "true"])
def test_a_first_sample_time_not_finite_or_in_the_future_is_dropped(tmp_path: Path,
                                                                      first_at: str) -> None:
    (tmp_path / "slo.json").write_text(
        f'{{"first_at": {first_at}, "starts": [], "minutes": {{}}}}')
    clock = Clock(T0 + 30)
    tracker = _tracker(tmp_path, clock)
    assert tracker.first is None
    tracker.sample()
    assert tracker.first == T0 + 30
    clock.now += 60
    tracker.sample()
    report = _report(tracker)
    assert report["checks"]["availability"]["value"] == 1.0


def test_a_node_starts_whatever_its_slo_file_holds(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    # The node's own history file, named for its id, in its spool directory.
    (spool / "slo-test-node.json").write_text('{"minutes": []}')
    node = NodeProcess(tmp_path, node_config(spool)).start()
    try:
        report = ctl_json(node, "slo")
        assert report["nodes"] == 1 and report["checks"]["availability"]["value"] == 1.0
        assert "Traceback" not in node.log()
        assert "slo.history_ignored" in node.log()
    finally:
        node.kill()


# --- a log renamed away, then kill -9 -------------------------------------------------------


def _line(kind: str, at: float) -> bytes:
    record = json.loads(_ACCT.line(kind, "m1", recipient="r@x.test", sender="s@y.test"))
    record["time"] = at
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def _counts(report: dict[str, Any]) -> tuple[int, int]:
    return report["submitted"], report["delivered"]


def test_lines_written_to_a_renamed_log_after_the_last_save_survive_a_kill(
        tmp_path: Path) -> None:
    acct, rotated = tmp_path / "acct.jsonl", tmp_path / "acct.rot"
    clock = Clock(T0 + 5)
    tracker = _tracker(tmp_path, clock)
    _append(acct, _line("Reception", clock.now))
    tracker.sample()
    asyncio.run(tracker.save())
    # mv acct.jsonl acct.rot: the node writes on to the file it holds open ...
    os.rename(acct, rotated)
    _append(rotated, _line("Reception", clock.now) + _line("Delivery", clock.now))
    tracker.scanner.close()  # ... and is killed before the tracker reads or saves them.
    clock.now += 30
    # Restarted, before it writes anything: the new file is not there yet.
    again = _tracker(tmp_path, clock)
    again.sample()
    assert _counts(_report(again)) == (2, 1)
    _append(rotated, _line("Delivery", clock.now))  # still writing to what it had open
    _append(acct, _line("Delivery", clock.now))  # then moved on to the new file
    again.sample()
    assert _counts(_report(again)) == (2, 3)
    asyncio.run(again.save())
    again.scanner.close()
    # Once more from the save: nothing counted twice, whichever file the position names.
    third = _tracker(tmp_path, clock)
    third.sample()
    assert _counts(_report(third)) == (2, 3)


def test_a_new_file_at_the_path_is_read_after_the_rest_of_the_renamed_one(
        tmp_path: Path) -> None:
    acct, rotated = tmp_path / "acct.jsonl", tmp_path / "acct.rot"
    _append(acct, _line("Reception", T0))
    _, pos = LogScanner(str(acct)).scan(LogPosition())
    os.rename(acct, rotated)
    _append(rotated, _line("Reception", T0))
    _append(acct, _line("Delivery", T0))
    scanner = LogScanner(str(acct))  # a restarted node's
    counts, end = scanner.scan(pos)
    assert [sum(c[i] for c in counts.values()) for i in range(2)] == [1, 1]
    assert end.ident == f"{acct.stat().st_dev}:{acct.stat().st_ino}"
    scanner.close()


def test_a_renamed_file_with_other_bytes_before_the_offset_is_not_resumed(
        tmp_path: Path) -> None:
    acct, rotated = tmp_path / "acct.jsonl", tmp_path / "acct.rot"
    _append(acct, _line("Reception", T0) * 2)
    _, pos = LogScanner(str(acct)).scan(LogPosition())
    os.rename(acct, rotated)
    # The same inode, rewritten (or reused): the saved offset means nothing in it.
    os.truncate(rotated, 0)
    _append(rotated, _line("Delivery", T0) * 3)
    _append(acct, _line("Delivery", T0))
    scanner = LogScanner(str(acct))
    counts, _ = scanner.scan(pos)
    assert [sum(c[i] for c in counts.values()) for i in range(2)] == [0, 1]
    scanner.close()
