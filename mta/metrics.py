"""Prometheus metrics of one node, in a registry of its own (tests run several nodes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["SUBMIT_BUCKETS", "NodeMetrics"]

SUBMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class NodeMetrics:
    """Every metric the node exports; the admin API serves ``registry``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter("mta_received_messages", "Messages accepted (250 sent)",
                                registry=r)
        self.received_bytes = Counter("mta_received_bytes", "Bytes of accepted messages",
                                      registry=r)
        self.rejected = Counter("mta_smtp_rejections", "SMTP commands refused, by reply code",
                                ["code"], registry=r)
        self.spool_errors = Counter("mta_spool_write_errors",
                                    "Appends that failed (disk full, I/O error), by errno",
                                    ["errno"], registry=r)
        # Apart from spool_errors: a fencing refusal is not a disk problem, and the disk
        # alert must not fire (nor hide one) when a node loses its lease.
        self.fenced_refusals = Counter("mta_fenced_refusals",
                                       "Submissions refused because this node may not write "
                                       "the shard (fenced, or the shard taken over), by "
                                       "interface", ["via"], registry=r)
        self.connections = Gauge("mta_smtp_connections", "Open SMTP sessions", registry=r)
        self.connections_refused = Counter("mta_smtp_connections_refused",
                                           "Sessions refused at connect, by reason",
                                           ["reason"], registry=r)
        self.auth_failures = Counter("mta_smtp_auth_failures", "Failed AUTH attempts",
                                     registry=r)
        self.auth_lockouts = Counter("mta_smtp_auth_lockouts",
                                     "Client addresses locked out of AUTH after repeated "
                                     "failures", registry=r)
        self.auth_refused = Counter("mta_smtp_auth_refused",
                                    "AUTH commands refused during a lockout", registry=r)
        self.stressed = Gauge("mta_smtp_stress",
                              "1 while sessions exceed 80% of max_connections (short "
                              "timeouts)", registry=r)
        self.submit_latency = Histogram(
            "mta_submit_seconds", "End of DATA to durable, per message",
            buckets=SUBMIT_BUCKETS, registry=r)
        self.batch_records = Histogram(
            "mta_spool_batch_records", "Records per group-commit batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.fsync_seconds = Histogram(
            "mta_spool_fsync_seconds", "fdatasync time per group-commit batch",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r)
        self.queue_live = Gauge("mta_spool_live_messages", "Live messages in owned shards",
                                registry=r)
        self.spool_segments = Gauge("mta_spool_segments", "Segment files in owned shards",
                                    registry=r)
        self.shards_owned = Gauge("mta_shards_owned", "Spool shards this node owns", registry=r)
        self.corrupt_records = Counter("mta_spool_corrupt_records",
                                       "Corrupt regions skipped by recovery", registry=r)
        self.torn_tails = Counter("mta_spool_torn_tails", "Torn tails cut by recovery",
                                  registry=r)

        self.delivered = Counter("mta_delivered_recipients", "Recipients accepted remotely",
                                 registry=r)
        self.deferred = Counter("mta_deferred_recipients",
                                "Recipient attempts that failed temporarily", registry=r)
        self.bounced = Counter("mta_bounced_recipients", "Recipients bounced, by class",
                               ["bounce_class"], registry=r)
        self.expired = Counter("mta_expired_recipients", "Recipients expired (max_age)",
                               registry=r)
        self.not_owner_stops = Counter(
            "mta_delivery_not_owner_stops",
            "Delivery jobs stopped unsent because this node no longer provably held the "
            "message's shard (fenced, released, lease deadline passed), by stage",
            ["stage"], registry=r)
        self.stale_connections = Counter(
            "mta_outbound_stale_connections",
            "Pooled outbound connections dropped because the first command on reuse was not "
            "answered (the job moved to a fresh connection)", registry=r)
        self.stalled_commands = Counter(
            "mta_outbound_stalled_commands",
            "Outbound commands unanswered for stall_timeout (their connection stopped "
            "counting against max_connections)", registry=r)
        self.delivery_latency = Histogram(
            "mta_delivery_seconds", "Reception to remote acceptance, per recipient",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
            registry=r)
        self.scheduled = Gauge("mta_queue_scheduled", "Messages waiting for their next attempt",
                               registry=r)
        self.oldest_age = Gauge("mta_queue_oldest_message_age_seconds",
                                "Age of the oldest live message in owned shards", registry=r)
        self.site_queue = Gauge("mta_site_queue_depth",
                                "Jobs waiting in a site's ready queue (sites with mail only)",
                                ["site"], registry=r)
        self.site_connections = Gauge("mta_site_connections",
                                      "Outbound connections open to a site", ["site"],
                                      registry=r)
        self.site_breaker_open = Gauge("mta_site_breaker_open",
                                       "1 while a site's circuit breaker is open or half-open",
                                       ["site"], registry=r)
        self.outbound_connections = Gauge("mta_outbound_connections",
                                          "Outbound SMTP connections open, all sites",
                                          registry=r)
        self.spool_bytes = Gauge("mta_spool_bytes", "Bytes of segment files in owned shards",
                                 registry=r)
        self.disk_used = Gauge("mta_spool_disk_used_ratio",
                               "Used fraction of the filesystem holding the spool", registry=r)
        self.shards_total = Gauge("mta_cluster_shards",
                                  "Spool shards in the cluster (owned or not)", registry=r)
        self.lease_healthy = Gauge("mta_cluster_lease_healthy",
                                   "1 while the node holds its lease (always 1 standalone)",
                                   registry=r)
        self.is_leader = Gauge("mta_cluster_is_leader", "1 on the cluster leader", registry=r)
        self.ready = Gauge("mta_node_ready", "1 while /readyz answers 200", registry=r)
        self.admin_bounced = Counter("mta_admin_bounced_recipients",
                                     "Recipients bounced by an operator", registry=r)
        self.probe_success = Gauge("mta_probe_success",
                                   "1 if the last synthetic probe was delivered in time",
                                   registry=r)
        self.probe_latency = Gauge("mta_probe_latency_seconds",
                                   "End-to-end latency of the last successful probe",
                                   registry=r)
        self.probe_last_success = Gauge("mta_probe_last_success_timestamp_seconds",
                                        "When a probe last succeeded (epoch)", registry=r)
        self.probes = Counter("mta_probes", "Synthetic probes run, by result", ["result"],
                              registry=r)

    def observe_batch(self, records: int, nbytes: int, files: int, sync_seconds: float) -> None:
        """Called from the writer thread after each group commit."""
        self.batch_records.observe(records)
        if files:
            self.fsync_seconds.observe(sync_seconds / files)
