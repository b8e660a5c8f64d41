"""What the admin API may see and do of its node, and nothing else.

The node builds a :class:`NodeFacade` from its parts; the API never holds the node itself, so
it cannot start, stop, fence or reconfigure it. What a reload or startup replaces (the
config, the SMTP listener, the fenced flag) is read through getters, live.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from mta.ingress.submit import store_submission

if TYPE_CHECKING:
    from mta.config import Config
    from mta.coordinator import Coordinator
    from mta.delivery.engine import DeliveryEngine
    from mta.envelope import Envelope
    from mta.ingress import IngressServer
    from mta.ingress.trace import TraceFilter, TraceSubscription
    from mta.metrics import NodeMetrics
    from mta.probe import Prober
    from mta.slo import SloTracker
    from mta.spool import Spool

__all__ = ["NodeFacade"]


class NodeFacade:
    """The node as the admin API sees it.

    ``spool`` answers message lookups and counts, ``engine`` (None: delivery disabled) the
    operator's actions on the queue, ``coordinator`` the cluster questions and runtime
    settings; the rest are the few node-level facts and acts the API reports or triggers.
    """

    def __init__(self, *, node_id: str, spool: Spool, engine: DeliveryEngine | None,
                 coordinator: Coordinator, metrics: NodeMetrics, slo: SloTracker,
                 prober: Prober, config: Callable[[], Config],
                 readiness: Callable[[], dict[str, bool]],
                 ingress: Callable[[], IngressServer | None], fenced: Callable[[], bool],
                 replication: Callable[[], dict[int, dict[str, object]]] | None = None
                 ) -> None:
        self.node_id = node_id
        self.spool = spool
        self.engine = engine
        self.coordinator = coordinator
        self._metrics = metrics
        self._slo = slo
        self._prober = prober
        self._config = config
        self._readiness = readiness
        self._ingress = ingress
        self._fenced = fenced
        self._replication = replication

    @property
    def cfg(self) -> Config:
        """The node's configuration as last (re)loaded."""
        return self._config()

    @property
    def fenced(self) -> bool:
        """True while the node may not write: its cluster lease is in doubt."""
        return self._fenced()

    @property
    def replicated(self) -> bool:
        """True when this node replicates its spool ([spool] replicas > 1)."""
        return self._replication is not None

    def replication_status(self) -> dict[int, dict[str, object]]:
        """Per shard this node owns: in-sync members, and each follower's state, acked
        position and lag in bytes (empty when the node does not replicate)."""
        return self._replication() if self._replication is not None else {}

    def readiness(self) -> dict[str, bool]:
        """The checks behind /readyz."""
        return self._readiness()

    def ready(self) -> bool:
        """All readiness checks hold."""
        return all(self._readiness().values())

    def smtp_sessions(self) -> int:
        """SMTP sessions open now."""
        ingress = self._ingress()
        return len(ingress.sessions) if ingress is not None else 0

    def trace(self, flt: TraceFilter) -> TraceSubscription | None:
        """Watch this node's SMTP sessions that ``flt`` matches (None: the SMTP listener is
        not up). Raises TooManyTraces when the node serves as many traces as it may."""
        ingress = self._ingress()
        return ingress.trace.subscribe(flt) if ingress is not None else None

    def scrape(self) -> bytes:
        """The Prometheus exposition of the node's registry (its gauges are read now, by the
        collector registered on it)."""
        return generate_latest(self._metrics.registry)

    def accepting_mail(self) -> bool:
        """Whether a submission may be stored now; a refusal while fenced is counted."""
        if self._fenced():
            self._metrics.fenced_refusals.labels("http").inc()
            return False
        ingress = self._ingress()
        return ingress is not None and ingress.accepting_writes

    async def submit(self, env: Envelope, raw: bytes) -> str:
        """Store an HTTP submission through the one submission path; its message id.
        Raises SubmissionRefused (already counted and logged)."""
        smtp, ingress = self._config().smtp, self._ingress()
        mid, _size = await store_submission(self.spool, smtp.hostname, env, raw, "HTTP",
                                            max_hops=smtp.max_hops, metrics=self._metrics,
                                            via="http",
                                            signer=ingress.signer if ingress else None,
                                            tenants=self._config().tenants)
        return mid

    async def probe(self) -> dict[str, Any]:
        """Run one probe now. Raises ProbeError when the probe cannot run here."""
        return await self._prober.run()

    def slo_raw(self, window: float) -> dict[str, Any]:
        """This node's SLO counts over the last ``window`` seconds."""
        return self._slo.raw(window)
