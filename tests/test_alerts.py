"""configs/alerts.yml: valid Prometheus rule structure, valid PromQL, and every metric it
uses is one a real node exports (or Prometheus's own ``up``)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.helpers import ROOT, NodeProcess, node_config

ALERTS = ROOT / "configs" / "alerts.yml"
_DURATION = re.compile(r"^\d+[smhd]$")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
_METRIC = re.compile(r"\b(mta_[a-z0-9_]+|up)\b")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    work = tmp_path_factory.mktemp("alerts")
    node = NodeProcess(work, node_config(work / "spool")).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
            text = resp.read().decode()
    finally:
        node.kill()
    # Families from the HELP lines: labelled metrics with no series yet still have one.
    yield {_family(line.split()[2]) for line in text.splitlines() if line.startswith("# HELP ")}


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    rules = []
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        rules += group["rules"]
    return rules


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_rule_is_well_formed_and_parses() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Mta[A-Z][A-Za-z]+", rule["alert"])
        assert _DURATION.match(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        promql_parser.parse(rule["expr"])  # raises ValueError on bad PromQL


def test_every_metric_used_is_exported_by_a_node(exported: set[str]) -> None:
    for rule in _rules():
        for name in _METRIC.findall(rule["expr"]):
            assert name == "up" or _family(name) in exported, (rule["alert"], name)


def test_the_alerts_an_operator_needs_are_there() -> None:
    used = {_family(n) for r in _rules() for n in _METRIC.findall(r["expr"])}
    severities = {r["alert"]: r["labels"]["severity"] for r in _rules()}
    for needed in ("up", "mta_cluster_is_leader", "mta_shards_owned",
                   "mta_cluster_lease_healthy", "mta_queue_oldest_message_age_seconds",
                   "mta_deferred_recipients", "mta_bounced_recipients",
                   "mta_spool_disk_used_ratio", "mta_spool_fsync_seconds", "mta_probe_success"):
        assert needed in used, needed
    for critical in ("MtaNodeDown", "MtaNoLeader", "MtaShardUnowned", "MtaEtcdUnreachable",
                     "MtaProbeFailing"):
        assert severities[critical] == "critical"


def test_a_bad_rule_would_be_caught(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(mta_received_messages_total[5m]) >")
