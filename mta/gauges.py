"""Gauges read at scrape time: a Prometheus collector over the node's spool, coordinator and
delivery sites. Nothing has to refresh them, and a reaped site's series go with the site."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mta.logs import describe

if TYPE_CHECKING:
    from mta.coordinator import Coordinator
    from mta.delivery.engine import DeliveryEngine
    from mta.replication.owner import OwnerSide
    from mta.spool import Spool

__all__ = ["GaugeSource", "NodeGauges", "ReplicationGauges"]

log = structlog.get_logger("mta.gauges")


class GaugeSource(Protocol):
    """What the gauges read: the parts of a node they describe."""

    node_id: str
    spool: Spool
    coordinator: Coordinator
    engine: DeliveryEngine | None
    fenced: bool

    def ready(self) -> bool: ...


# Names, help texts and labels are what alert rules and dashboards use: keep them as they are.
_PLAIN: dict[str, str] = {
    "mta_spool_live_messages": "Live messages in owned shards",
    "mta_spool_segments": "Segment files in owned shards",
    "mta_spool_bytes": "Bytes of segment files in owned shards",
    "mta_queue_oldest_message_age_seconds": "Age of the oldest live message in owned shards",
    "mta_spool_disk_used_ratio": "Used fraction of the filesystem holding the spool",
    "mta_shards_owned": "Spool shards this node owns",
    "mta_cluster_shards": "Spool shards in the cluster (owned or not)",
    "mta_cluster_lease_healthy": "1 while the node holds its lease (always 1 standalone)",
    "mta_cluster_is_leader": "1 on the cluster leader",
    "mta_node_ready": "1 while /readyz answers 200",
    "mta_queue_scheduled": "Messages waiting for their next attempt",
    "mta_outbound_connections": "Outbound SMTP connections open, all sites",
}
_PER_SITE: dict[str, str] = {
    "mta_site_queue_depth": "Jobs waiting in a site's ready queue (sites with mail only)",
    "mta_site_connections": "Outbound connections open to a site",
    "mta_site_breaker_open": "1 while a site's circuit breaker is open or half-open",
}
_ERRORS = ("mta_gauge_read_errors",
           "Gauge families that raised when read for a scrape (that scrape went without "
           "them), by gauge")


def _disk_used(root: Any) -> float:
    usage = shutil.disk_usage(root)
    return usage.used / usage.total if usage.total else 0.0


class NodeGauges(Collector):
    """Reads the node's gauges on every ``collect()``; register it on the node's registry.

    Each family is read on its own: one that raises (a broken site, an unreadable spool
    directory) is logged, counted in ``mta_gauge_read_errors_total`` and left out, and the
    scrape still answers with the others.
    """

    def __init__(self, node: GaugeSource) -> None:
        self.node = node
        self.errors = dict.fromkeys((*_PLAIN, *_PER_SITE), 0)
        spool = node.spool
        self._plain: dict[str, Callable[[], float]] = {
            "mta_spool_live_messages": spool.live_count,
            "mta_spool_segments": spool.segment_count,
            "mta_spool_bytes": spool.disk_bytes,
            "mta_queue_oldest_message_age_seconds": self._oldest_age,
            "mta_spool_disk_used_ratio": lambda: _disk_used(spool.root),
            "mta_shards_owned": lambda: len(spool.owned),
            "mta_cluster_shards": lambda: spool.total_shards,
            "mta_cluster_lease_healthy":
                lambda: int(node.coordinator.healthy and not node.fenced),
            "mta_cluster_is_leader": lambda: int(node.coordinator.is_leader and not node.fenced),
            "mta_node_ready": lambda: int(node.ready()),
            "mta_queue_scheduled":
                lambda: len(node.engine.scheduler) if node.engine is not None else 0,
            "mta_outbound_connections":
                lambda: sum(site.connections for _, site in self._sites()),
        }
        self._per_site: dict[str, Callable[[Any], float]] = {
            "mta_site_queue_depth": lambda site: len(site.ready),
            "mta_site_connections": lambda site: site.connections,
            "mta_site_breaker_open": lambda site: int(site.breaker.state != "closed"),
        }

    def _oldest_age(self) -> float:
        oldest = self.node.spool.oldest_received()
        return max(0.0, time.time() - oldest) if oldest else 0.0

    def _sites(self) -> Iterable[tuple[str, Any]]:
        engine = self.node.engine
        return engine.sites.items() if engine is not None else ()

    def _read(self, name: str) -> Metric:
        if name in self._plain:
            return GaugeMetricFamily(name, _PLAIN[name], value=self._plain[name]())
        family = GaugeMetricFamily(name, _PER_SITE[name], labels=["site"])
        value = self._per_site[name]
        for key, site in self._sites():
            family.add_metric([key], value(site))
        return family

    def collect(self) -> Iterator[Metric]:
        """Every gauge family, read now; then the count of families that failed to read."""
        for name in self.errors:
            try:
                family = self._read(name)
            except Exception as exc:
                self.errors[name] += 1
                log.exception("metrics.gauge_failed", node_id=self.node.node_id, gauge=name,
                              error=describe(exc))
                continue
            yield family
        errors = CounterMetricFamily(*_ERRORS, labels=["gauge"])
        for name, count in self.errors.items():
            errors.add_metric([name], count)
        yield errors

    def describe(self) -> Iterator[Metric]:
        """The families without reading anything (the registry checks names with it)."""
        for name, doc in _PLAIN.items():
            yield GaugeMetricFamily(name, doc)
        for name, doc in _PER_SITE.items():
            yield GaugeMetricFamily(name, doc, labels=["site"])
        yield CounterMetricFamily(*_ERRORS, labels=["gauge"])


_REPLICATION: dict[str, tuple[str, list[str]]] = {
    "mta_replication_shards": (
        "Shards this node owns by replication state: in_sync (replicas copies in the in-sync "
        "set), under_replicated (fewer, at least min_insync), read_only (fewer than "
        "min_insync: new mail gets 451)", ["state"]),
    "mta_replication_follower_lag_bytes": (
        "Per follower node, the most bytes of any shard this node owns that it has not "
        "acknowledged (owner's log end minus its acked position, counted over the segment "
        "sizes between)", ["peer"]),
    "mta_replication_followers_connected": (
        "Follower nodes this node, as an owner, has a live replication connection to", []),
}


class ReplicationGauges(Collector):
    """The replicated spool's gauges, read on every ``collect()``; the node registers it
    only when it replicates ([spool] replicas > 1), so other nodes export none of them. A
    family that raises is logged and left out, like :class:`NodeGauges`'."""

    def __init__(self, node_id: str, owner: OwnerSide, replicas: int) -> None:
        self.node_id = node_id
        self.owner = owner
        self.replicas = replicas

    def _read(self, name: str) -> Metric:
        doc, labels = _REPLICATION[name]
        family = GaugeMetricFamily(name, doc, labels=labels)
        rep = self.owner
        if name == "mta_replication_shards":
            for state, count in rep.shard_states(self.replicas).items():
                family.add_metric([state], count)
        elif name == "mta_replication_follower_lag_bytes":
            for peer, lag in rep.follower_lag().items():
                family.add_metric([peer], lag)
        else:
            family.add_metric([], rep.connected_followers())
        return family

    def collect(self) -> Iterator[Metric]:
        for name in _REPLICATION:
            try:
                family = self._read(name)
            except Exception as exc:
                log.exception("metrics.gauge_failed", node_id=self.node_id, gauge=name,
                              error=describe(exc))
                continue
            yield family

    def describe(self) -> Iterator[Metric]:
        for name, (doc, labels) in _REPLICATION.items():
            yield GaugeMetricFamily(name, doc, labels=labels)
