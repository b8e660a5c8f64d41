"""The admin HTTP API (aiohttp): health, readiness, metrics, status.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and Prometheus scrape them);
everything under ``/api/`` needs the bearer token from ``[admin] token``.
"""

from __future__ import annotations

import hmac
import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import mta

if TYPE_CHECKING:
    from mta.node import Node

__all__ = ["AdminServer"]


def _error(status: int, error: str, hint: str) -> web.Response:
    return web.json_response({"error": error, "hint": hint}, status=status)


class AdminServer:
    """Serves the admin API of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.started = time.time()
        self._token = node.cfg.admin.token.encode()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/status", self.status)
        self.app = app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        if not self._token:
            return _error(403, "admin API disabled: no token configured",
                          "set [admin] token in the node's config and restart")
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), self._token):
            return _error(401, "missing or wrong token",
                          "pass --token or set MTACTL_TOKEN to the node's [admin] token")
        return await handler(request)

    async def start(self) -> None:
        host, port = self.node.cfg.admin.listen
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await self._site.start()

    @property
    def port(self) -> int:
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _readiness(self) -> dict[str, Any]:
        node = self.node
        spool_ok = os.access(node.spool.root, os.W_OK)
        checks = {
            "spool_writable": spool_ok,
            "lease_held": node.coordinator.healthy and not node.fenced,
            "shards_owned": len(node.spool.owned) > 0,
            "accepting": node.ingress is not None and not node.ingress.draining,
        }
        return checks

    async def readyz(self, request: web.Request) -> web.Response:
        checks = self._readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        node = self.node
        node.metrics.queue_live.set(node.spool.live_count())
        body = generate_latest(node.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        node = self.node
        return web.json_response({
            "node": node.node_id,
            "version": mta.__version__,
            "uptime": round(time.time() - self.started, 1),
            "mode": "standalone" if node.cfg.standalone else "cluster",
            "shards_owned": len(node.spool.owned),
            "shards_total": node.spool.total_shards,
            "live_messages": node.spool.live_count(),
            "segments": node.spool.segment_count(),
            "smtp_sessions": len(node.ingress.sessions) if node.ingress else 0,
            "fenced": node.fenced,
            "ready": all(self._readiness().values()),
        })
