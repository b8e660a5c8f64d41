"""``/healthz``, ``/readyz`` and ``/metrics``: open to probes and Prometheus (no token)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mta.admin.errors import json_response
from mta.admin.routes.base import Resource

__all__ = ["Health"]


class Health(Resource):
    """Liveness, readiness and the metrics scrape."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        router.add_get("/metrics", self.metrics)

    async def healthz(self, request: web.Request) -> web.Response:
        """The process answers."""
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when every readiness check holds, 503 with the checks otherwise."""
        checks = self.api.node.readiness()
        ready = all(checks.values())
        return json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus exposition."""
        return web.Response(body=self.api.node.scrape(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
