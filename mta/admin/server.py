"""The admin HTTP API (aiohttp): health, readiness, metrics, status.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and Prometheus scrape them);
everything under ``/api/`` needs the bearer token from ``[admin] token``.
"""

from __future__ import annotations

import hmac
import json
import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import mta
from mta.config import parse_rate
from mta.coordinator import RuntimeSettings
from mta.envelope import Envelope
from mta.ingress.policy import address_problem
from mta.ingress.submit import store_submission
from mta.spool import SpoolError, SpoolWriteError

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
        app.router.add_post("/api/v1/messages", self.inject)
        app.router.add_post("/api/v1/flush", self.flush)
        app.router.add_post("/api/v1/suspend", self.suspend)
        app.router.add_post("/api/v1/resume", self.resume)
        app.router.add_get("/api/v1/throttles", self.throttles)
        app.router.add_post("/api/v1/throttles", self.set_throttle)
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

    # --- operations --------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "body is not JSON", "hint": "send a JSON object"}),
                content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "body must be a JSON object", "hint": ""}),
                content_type="application/json")
        return body

    async def inject(self, request: web.Request) -> web.Response:
        """HTTP submission: same checks as SMTP; 202 only once the message is fsynced."""
        node = self.node
        body = await self._json(request)
        sender, rcpts, content = body.get("from"), body.get("to"), body.get("content")
        if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts \
                or not all(isinstance(r, str) for r in rcpts) or not isinstance(content, str):
            return _error(400, "expected {\"from\": str, \"to\": [str, ...], "
                               "\"content\": str (RFC 5322 message)}",
                          "from may be \"\" for the null sender")
        smtputf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
        for addr in ([sender] if sender else []) + rcpts:
            if problem := address_problem(addr, smtputf8):
                return _error(400, f"bad address {addr!r}: {problem}", "use local@domain")
        cfg = node.cfg.smtp
        if len(rcpts) > cfg.max_recipients:
            return _error(400, f"too many recipients (at most {cfg.max_recipients})", "")
        raw = content.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        if len(raw) > cfg.max_message_size:
            return _error(413, f"message larger than {cfg.max_message_size} bytes", "")
        if node.fenced or node.ingress is None or not node.ingress.accepting_writes:
            return _error(503, "node not accepting mail right now", "retry, or use another node")
        env = Envelope(sender=sender, recipients=rcpts, smtputf8=smtputf8,
                       body_8bit=not raw.isascii(), client_ip=request.remote or "",
                       helo="http", auth_user="admin-api")
        try:
            mid, _size = await store_submission(node.spool, cfg.hostname, env, raw, "HTTP")
        except SpoolWriteError as exc:
            return _error(507, f"spool write failed: {exc}", "free disk space, then retry")
        except SpoolError as exc:
            return _error(503, f"spool unavailable: {exc}", "retry later")
        return web.json_response({"id": mid}, status=202)

    def _domain_arg(self, body: dict[str, Any]) -> str | None:
        domain = body.get("domain")
        return domain.lower() if isinstance(domain, str) and domain else None

    async def flush(self, request: web.Request) -> web.Response:
        body = await self._json(request) if request.can_read_body else {}
        engine = self.node.engine
        if engine is None:
            return _error(409, "delivery is disabled on this node", "[delivery] enabled = true")
        return web.json_response({"rescheduled": engine.flush(self._domain_arg(body))})

    async def _set_suspended(self, request: web.Request, suspend: bool) -> web.Response:
        domain = self._domain_arg(await self._json(request))
        if domain is None:
            return _error(400, "expected {\"domain\": \"example.com\"}", "")
        coord = self.node.coordinator
        current = coord.runtime()
        suspended = (current.suspended | {domain}) if suspend else (current.suspended - {domain})
        await coord.set_runtime(RuntimeSettings(dict(current.throttles), frozenset(suspended)))
        return web.json_response({"suspended": sorted(suspended)})

    async def suspend(self, request: web.Request) -> web.Response:
        return await self._set_suspended(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._set_suspended(request, False)

    async def throttles(self, request: web.Request) -> web.Response:
        rt = self.node.coordinator.runtime()
        configured = {d: p.rate for d, p in self.node.cfg.delivery.domains.items() if p.rate}
        return web.json_response({"runtime": rt.throttles, "configured": configured,
                                  "default_site_rate": self.node.cfg.delivery.rate,
                                  "suspended": sorted(rt.suspended),
                                  "unit": "messages per second"})

    async def set_throttle(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        key, spec = body.get("key"), body.get("spec")
        if not isinstance(key, str) or not key:
            return _error(400, "expected {\"key\": domain or site, \"spec\": \"100/s\"}",
                          "spec null removes the override")
        current = self.node.coordinator.runtime()
        throttles = dict(current.throttles)
        if spec is None:
            throttles.pop(key.lower(), None)
        else:
            try:
                throttles[key.lower()] = parse_rate(spec)
            except ValueError as exc:
                return _error(400, str(exc), "for example \"100/s\", \"20/m\", \"5000/h\"")
        await self.node.coordinator.set_runtime(RuntimeSettings(throttles, current.suspended))
        return web.json_response({"runtime": throttles})
