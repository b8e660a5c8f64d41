"""Prometheus metrics of one node, in a registry of its own (tests run several nodes)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

__all__ = ["SUBMIT_BUCKETS", "LoopCounter", "LoopHistogram", "NodeMetrics",
           "ReplicationCounters"]

SUBMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class NodeMetrics:
    """The node's counters, histograms and set-by-event gauges; the admin API serves
    ``registry``, on which the node also registers the gauges read at scrape time
    (:class:`mta.gauges.NodeGauges`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # Counted once per accepted message, on the loop (store_submission): lock-free.
        self.received = LoopCounter("mta_received_messages", "Messages accepted (250 sent)",
                                    registry=r)
        self.received_bytes = LoopCounter("mta_received_bytes", "Bytes of accepted messages",
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
        self.submit_latency = LoopHistogram(
            "mta_submit_seconds", "End of DATA to durable, per message",
            buckets=SUBMIT_BUCKETS, registry=r)
        self.batch_records = Histogram(
            "mta_spool_batch_records", "Records per group-commit batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r)
        self.fsync_seconds = Histogram(
            "mta_spool_fsync_seconds", "fdatasync time per group-commit batch",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r)
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
        self.outbound_tls = Counter(
            "mta_outbound_tls_connections",
            "Outbound connections by TLS outcome: verified (chain and host name), unverified "
            "(TLS with a certificate that did not verify or was not checked), none (clear)",
            ["outcome"], registry=r)
        self.outbound_tls_policy_failures = Counter(
            "mta_outbound_tls_policy_failures",
            "Transactions deferred because the connection did not meet the TLS policy "
            "(required: no TLS; verify: no verified certificate)",
            ["policy"], registry=r)
        self.outbound_mta_sts = Counter(
            "mta_outbound_mta_sts_transactions",
            "Transactions to domains with an MTA-STS policy, by mode and result: ok (a "
            "matching MX host, a verified certificate), failed (enforce: deferred; testing: "
            "sent, and logged as delivery.mta_sts_testing_failure)",
            ["mode", "result"], registry=r)
        self.egress_transactions = Counter(
            "mta_egress_transactions",
            "Messages handed to each egress source (the default address: source=\"\")",
            ["source"], registry=r)
        self.egress_blocks = Counter(
            "mta_egress_source_blocks",
            "Times a source was found blocked at a site (a reply matched [egress] "
            "block_patterns); it backs off there on its own",
            ["source"], registry=r)
        self.egress_deferrals = Counter(
            "mta_egress_deferrals",
            "Deliveries deferred for want of a source: warmup (every usable source at its "
            "warm-up cap), blocked (every source blocked at the site)",
            ["reason"], registry=r)
        self.mta_sts_fetches = Counter(
            "mta_mta_sts_policy_fetches",
            "MTA-STS policy fetches over HTTPS, by result (fetched, failed)",
            ["result"], registry=r)
        # Per destination: target="all" ([events] url), "tenant:<name>" (its events_url).
        self.events_sent = Counter("mta_events_sent",
                                   "Accounting records the events webhook acknowledged",
                                   ["target"], registry=r)
        self.events_failures = Counter("mta_events_post_failures",
                                       "Webhook POSTs that failed (retried, backing off)",
                                       ["target"], registry=r)
        self.events_backlog = Gauge("mta_events_backlog_bytes",
                                    "Bytes of the accounting log not yet acknowledged (nor "
                                    "passed over: other tenants' records) by the events "
                                    "webhook", ["target"], registry=r)
        self.events_last_success = Gauge("mta_events_last_success_timestamp_seconds",
                                         "When the events webhook last acknowledged a batch",
                                         ["target"], registry=r)
        self.stalled_commands = Counter(
            "mta_outbound_stalled_commands",
            "Outbound commands unanswered for stall_timeout (their connection stopped "
            "counting against max_connections)", registry=r)
        self.delivery_latency = Histogram(
            "mta_delivery_seconds", "Reception to remote acceptance, per recipient",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
            registry=r)
        self.admin_bounced = Counter("mta_admin_bounced_recipients",
                                     "Recipients bounced by an operator", registry=r)
        self.probes = Counter("mta_probes", "Synthetic probes run, by result", ["result"],
                              registry=r)
        # The probe's gauges exist only once a probe has run: a node without a probe (or one
        # only run on demand) must not export a 0 that pages as "probe failing".
        self._probe_gauges: tuple[Gauge, Gauge, Gauge] | None = None
        self._replication: ReplicationCounters | None = None
        self._zero_known_labels()

    def _zero_known_labels(self) -> None:
        """Export every known label value from the start, at 0: ``increase()`` then sees the
        first event, and a fresh node already has every documented series."""
        from mta.bounce.classify import CLASSES

        known: list[tuple[Counter, tuple[str, ...]]] = [
            # Numeric errno, as the label is written: ENOSPC, EFBIG, EIO, EDQUOT, EROFS.
            (self.spool_errors, ("28", "27", "5", "122", "30")),
            (self.bounced, CLASSES),
            (self.connections_refused, ("shutdown", "fenced", "total", "per_ip")),
            (self.fenced_refusals, ("smtp", "http")),
            (self.not_owner_stops, ("queued", "before connecting", "before MAIL",
                                    "before RCPT", "before DATA")),
            (self.probes, ("success", "failure")),
        ]
        for counter, values in known:
            for value in values:
                counter.labels(value)

    def replication(self) -> ReplicationCounters:
        """The replicated spool's counters, made on first call: a node that does not
        replicate ([spool] replicas = 1) exports none of them."""
        if self._replication is None:
            self._replication = ReplicationCounters(self.registry)
        return self._replication

    def probe_result(self, ok: bool, latency: float | None, at: float) -> None:
        """Record a finished probe: success (1/0), its latency and when, if it succeeded."""
        if self._probe_gauges is None:
            r = self.registry
            self._probe_gauges = (
                Gauge("mta_probe_success", "1 if the last synthetic probe was delivered in time",
                      registry=r),
                Gauge("mta_probe_latency_seconds",
                      "End-to-end latency of the last successful probe", registry=r),
                Gauge("mta_probe_last_success_timestamp_seconds",
                      "When a probe last succeeded (epoch)", registry=r))
        success, latency_gauge, last = self._probe_gauges
        self.probes.labels("success" if ok else "failure").inc()
        success.set(1 if ok else 0)
        if ok and latency is not None:
            latency_gauge.set(latency)
            last.set(at)

    def observe_batch(self, records: int, nbytes: int, files: int, sync_seconds: float) -> None:
        """Called from the writer thread after each group commit."""
        self.batch_records.observe(records)
        if files:
            self.fsync_seconds.observe(sync_seconds / files)


class ReplicationCounters:
    """What the owner side of the replicated spool counts as it happens (it is the
    :class:`mta.replication.owner.OwnerEvents` the node hands it); every known label is
    exported at 0 from the start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from mta.replication.owner import NACK_REASONS

        self.insync_changes = Counter(
            "mta_replication_insync_changes", "In-sync set changes committed for shards this "
            "node owns: grow (a follower caught up and joined), shrink (a member was dropped)",
            ["change"], registry=registry)
        self.refusals = Counter(
            "mta_replication_refused", "Nacks from followers of shards this node owns, by "
            "reason (stale: a newer owner exists; position: the copy ends elsewhere, the "
            "stream restarts; owner: the follower owns the shard; broken: its copy failed)",
            ["reason"], registry=registry)
        for change in ("grow", "shrink"):
            self.insync_changes.labels(change)
        for reason in NACK_REASONS:
            self.refusals.labels(reason)

    def insync_changed(self, change: str) -> None:
        self.insync_changes.labels(change).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()


class LoopCounter(Collector):
    """A counter without labels that only the event loop's thread adds to: ``inc()`` is a
    plain ``+=`` where prometheus_client's Counter takes a lock (store_submission's three
    updates per accepted message cost the loop 1.2 us with locks, 0.2 us without). Not for a
    counter another thread touches: two threads' ``+=`` can lose a count.

    Scraped as prometheus_client's Counter of that name and help: one such Counter, never
    incremented and in no registry, renders the family (``_created`` too, unless the library
    is told to leave it out) and this value is put in its ``_total``."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.value = 0.0
        self._shape = Counter(name, documentation, registry=None)
        [family] = self._shape.describe()
        self._total = f"{family.name}_total"
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def describe(self) -> Iterable[Metric]:
        return self._shape.describe()

    def collect(self) -> Iterator[Metric]:
        for family in self._shape.collect():
            family.samples = [s._replace(value=self.value) if s.name == self._total else s
                              for s in family.samples]
            yield family


class LoopHistogram(Collector):
    """A histogram without labels that only the event loop's thread observes (see
    :class:`LoopCounter`): a bucket count and the sum added to without a lock; scraped as
    prometheus_client's Histogram of that name, help and buckets."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: CollectorRegistry) -> None:
        bounds = [float(b) for b in buckets]
        if bounds[-1] != math.inf:
            bounds.append(math.inf)  # as prometheus_client adds it
        self._bounds = tuple(bounds)
        self._counts = [0] * len(bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._shape = Histogram(name, documentation, buckets=bounds, registry=None)
        [family] = self._shape.describe()
        self._names = (f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum")
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._sum += amount
        # prometheus_client's bucket: the first whose bound is at least the amount; none for
        # NaN (bisect would put it first, with the fastest), which only the sum takes there.
        if amount <= math.inf:
            self._counts[bisect_left(self._bounds, amount)] += 1

    def describe(self) -> Iterable[Metric]:
        return self._shape.describe()

    def collect(self) -> Iterator[Metric]:
        bucket, count, total = self._names
        cumulative = [float(n) for n in accumulate(self._counts)]
        values = {count: cumulative[-1], total: self._sum}
        for family in self._shape.collect():
            buckets = iter(cumulative)
            family.samples = [
                s._replace(value=next(buckets)) if s.name == bucket else
                s._replace(value=values[s.name]) if s.name in values else s
                for s in family.samples]
            yield family
