"""configs/alerts.yml: valid Prometheus rule structure, valid PromQL, and every metric it
uses is one a real node exports (or Prometheus's own ``up``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from tests.support import ROOT
from tests.support.metrics import fresh_node_metrics

ALERTS = ROOT / "configs" / "alerts.yml"
_DURATION = re.compile(r"^\d+[smhd]$")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")
_METRIC = re.compile(r"\b(mta_[a-z0-9_]+|up)\b")


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a fresh node (no probe configured, nothing sent yet)."""
    return fresh_node_metrics(tmp_path_factory.mktemp("alerts"))


@pytest.fixture(scope="module")
def exported(scrape: str) -> set[str]:
    # Families from the HELP lines: labelled metrics with no series yet still have one.
    return {_family(line.split()[2]) for line in scrape.splitlines()
            if line.startswith("# HELP ")}


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


# Exported only once they have a value: a probe's result, after the first probe.
_AFTER_FIRST_EVENT = {"mta_probe_success", "mta_probe_latency_seconds",
                      "mta_probe_last_success_timestamp_seconds"}
# Exported only by a node that replicates ([spool] replicas > 1); the node under test does
# not (tests/replication/test_replication_ops.py checks a replicating node exports them).
_WHEN_REPLICATED = {"mta_replication_shards", "mta_replication_follower_lag_bytes",
                    "mta_replication_followers_connected", "mta_replication_insync_changes",
                    "mta_replication_refused"}


def test_every_metric_used_is_exported_by_a_node(exported: set[str]) -> None:
    for rule in _rules():
        for name in _METRIC.findall(rule["expr"]):
            assert name == "up" or _family(name) in (
                exported | _AFTER_FIRST_EVENT | _WHEN_REPLICATED), (rule["alert"], name)


def test_a_fresh_node_without_a_probe_exports_no_probe_result(exported: set[str]) -> None:
    """A 0 there would page MtaProbeFailing on every node that has no probe."""
    assert not exported & _AFTER_FIRST_EVENT


@pytest.mark.parametrize("series", [
    'mta_spool_write_errors_total{errno="28"} 0.0',
    'mta_bounced_recipients_total{bounce_class="bad-mailbox"} 0.0',
    'mta_bounced_recipients_total{bounce_class="other"} 0.0',
    'mta_smtp_connections_refused_total{reason="per_ip"} 0.0',
    'mta_fenced_refusals_total{via="http"} 0.0',
    'mta_delivery_not_owner_stops_total{stage="before MAIL"} 0.0',
    'mta_probes_total{result="failure"} 0.0',
])
def test_known_label_values_are_exported_at_zero_from_the_start(scrape: str,
                                                                 series: str) -> None:
    """So that increase() sees the first event and a fresh node has every documented series."""
    assert series in scrape.splitlines()


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
