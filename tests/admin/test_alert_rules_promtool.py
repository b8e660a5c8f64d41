"""configs/alerts.yml under Prometheus's own tool: ``promtool check rules`` and the unit tests
in configs/alerts.test.yml, where every alert fires when it should and stays silent on
healthy nodes; plus a case built from what a real fresh node exports.

promtool comes from harness.promtool (fetched from Debian's package on first use)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness.promtool import PromtoolUnavailable, promtool
from tests.support import ROOT
from tests.support.metrics import fresh_node_metrics

ALERTS = ROOT / "configs" / "alerts.yml"
UNIT_TESTS = ROOT / "configs" / "alerts.test.yml"
HEALTHY = "healthy:"  # the name prefix of the unit-test groups where nothing may fire
_DURATION = re.compile(r"(\d+)([smh])")
_SECONDS = {"s": 1, "m": 60, "h": 3600}


@pytest.fixture(scope="module")
def tool() -> str:
    return promtool()


def _run(tool: str, *args: str) -> str:
    result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def _alert_names() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in doc["groups"] for rule in group["rules"]
            if "alert" in rule]


def _unit_tests() -> list[dict[str, Any]]:
    return yaml.safe_load(UNIT_TESTS.read_text())["tests"]


def _seconds(duration: str) -> int:
    return sum(int(n) * _SECONDS[unit] for n, unit in _DURATION.findall(duration))


def _samples(values: str) -> int:
    """How many samples promtool's expanding notation (``1x5``, ``0+10x3``, ``1 _ 2``) makes."""
    count = 0
    for token in values.split():
        times = re.fullmatch(r"[^x]+x(\d+)", token)
        count += int(times.group(1)) + 1 if times else 1
    return count


def test_promtool_check_rules_accepts_the_rules(tool: str) -> None:
    output = _run(tool, "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(_alert_names())} rules found" in output, output


def test_promtool_unit_tests_pass(tool: str) -> None:
    output = _run(tool, "test", "rules", str(UNIT_TESTS))
    assert "SUCCESS" in output, output


def test_the_unit_tests_point_at_the_rules() -> None:
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    assert [UNIT_TESTS.parent / f for f in doc["rule_files"]] == [ALERTS]


def test_every_alert_has_a_firing_case_and_is_silent_on_every_healthy_set() -> None:
    """A new alert without unit tests fails here."""
    tests = _unit_tests()
    healthy = [t for t in tests if t["name"].startswith(HEALTHY)]
    assert len(healthy) >= 2, "want a fresh node and a busy cluster"
    firing = {case["alertname"] for t in tests for case in t["alert_rule_test"]
              if case.get("exp_alerts")}
    missing = {name: [t["name"] for t in healthy
                      if not any(c["alertname"] == name and c.get("exp_alerts") == []
                                 for c in t["alert_rule_test"])]
               for name in _alert_names()}
    assert not set(_alert_names()) - firing, f"no firing case: {set(_alert_names()) - firing}"
    unchecked = {name: sets for name, sets in missing.items() if sets}
    assert not unchecked, f"not evaluated silent on these healthy sets: {unchecked}"
    assert firing <= set(_alert_names()), "unit tests for alerts that do not exist"


def test_healthy_series_last_until_the_alerts_are_evaluated() -> None:
    """A series that ends early goes stale and would make 'silent' hold trivially."""
    for test in _unit_tests():
        if not test["name"].startswith(HEALTHY):
            continue
        step = _seconds(test["interval"])
        until = max(_seconds(c["eval_time"]) for c in test["alert_rule_test"])
        for series in test["input_series"]:
            assert (_samples(series["values"]) - 1) * step >= until, (
                test["name"], series["series"])


def test_sample_counting() -> None:
    assert _samples("1x240") == 241
    assert _samples("0 1 0+10x3 _ stale") == 8


@pytest.fixture(scope="module")
def fresh_scrape(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real fresh node (no probe configured, nothing sent yet)."""
    return fresh_node_metrics(tmp_path_factory.mktemp("promtool"))


def _series(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _fresh_node_case(scrape: str) -> dict[str, Any]:
    """A promtool test: every series of the scrape held for 4h, every alert silent."""
    target = {"job": "mta", "instance": "fresh:8025"}
    series = [{"series": _series("up", target), "values": "1x240"}]
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            # Plain decimals: the series notation reads "1e+09x240" as an expression.
            value = format(sample.value, "f")
            series.append({"series": _series(sample.name, {**sample.labels, **target}),
                           "values": f"{value}x240"})
    return {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "15s",
        "tests": [{
            "name": "healthy: a live fresh node's /metrics",
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": "4h", "alertname": name, "exp_alerts": []}
                                for name in _alert_names()],
        }],
    }


def test_a_live_fresh_node_fires_no_alert(tool: str, fresh_scrape: str,
                                          tmp_path: Path) -> None:
    case = _fresh_node_case(fresh_scrape)
    names = {s["series"].split("{")[0] for s in case["tests"][0]["input_series"]}
    assert {"mta_node_ready", "mta_cluster_shards", "mta_delivered_recipients_total"} <= names
    path = tmp_path / "fresh.test.yml"
    path.write_text(yaml.safe_dump(case, sort_keys=False))
    _run(tool, "test", "rules", str(path))


def test_promtool_fails_on_a_broken_expectation(tool: str, tmp_path: Path) -> None:
    """The runner reports failure (and we see it): an expectation no rule can meet."""
    doc = yaml.safe_load(UNIT_TESTS.read_text())
    doc["rule_files"] = [str(ALERTS)]
    doc["tests"] = [t for t in doc["tests"] if t["name"].startswith(HEALTHY)][:1]
    doc["tests"][0]["alert_rule_test"] = [
        {"eval_time": "4h", "alertname": "MtaNodeDown",
         "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]
    path = tmp_path / "broken.test.yml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AssertionError, match="FAILED"):
        _run(tool, "test", "rules", str(path))


def test_a_bad_promtool_setting_says_how_to_fix_it(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMTOOL", str(tmp_path / "nowhere"))
    with pytest.raises(PromtoolUnavailable, match="install Debian's `prometheus` package"):
        promtool()
