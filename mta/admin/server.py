"""The admin HTTP API (aiohttp): health, readiness, metrics, and one endpoint per mtactl verb.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and Prometheus scrape them);
everything under ``/api/`` needs the bearer token from ``[admin] token``. Cluster-wide
questions (queue, flush, slo, a message on another node) are answered by asking the peers
(``local=1`` makes a node answer for itself only).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import mta
from mta.admin.peers import PeerAnswer, PeerClient
from mta.admin.views import merge_queues, message_view, queue_view
from mta.config import parse_duration, parse_rate
from mta.coordinator import ClusterOpError, Member
from mta.envelope import Envelope, InvalidMessageId, domain_key, shard_of
from mta.ingress.policy import address_problem, domain_problem
from mta.ingress.submit import SubmissionRefused, TooManyHops, store_submission
from mta.probe import ProbeError
from mta.slo import merge_reports
from mta.spool import MessageNotFound, SpoolError

if TYPE_CHECKING:
    from mta.node import Node

__all__ = ["AdminServer"]


def _error(status: int, error: str, hint: str) -> web.Response:
    return web.json_response({"error": error, "hint": hint}, status=status)


# The HTTP answer (status, error, hint) to each way store_submission can refuse a message.
_REFUSAL_ANSWERS = {
    "too_many_hops": (422, TooManyHops.reply, "the message is looping between mail servers; "
                                              "do not resubmit it"),
    "no_shards": (503, "no spool shard on this node", "retry, or use another node"),
    # Not a disk problem: this node may not write the shard now, a peer may.
    "fenced": (503, "not serving this shard now", "retry on another node"),
    "disk": (507, "spool write failed", "free disk space, then retry"),
    "unavailable": (503, "spool unavailable", "retry later"),
}


class _Refused(Exception):
    """A handler's clear refusal, answered as ``{"error", "hint"}`` with ``status``."""

    def __init__(self, status: int, error: str, hint: str = "") -> None:
        super().__init__(error)
        self.status, self.error, self.hint = status, error, hint


def _local(request: web.Request) -> bool:
    return request.query.get("local") == "1"


def _unreachable(answers: list[PeerAnswer]) -> list[dict[str, str]]:
    return [{"node": a.node, "error": a.error or f"HTTP {a.status}: "
             f"{(a.body or {}).get('error', '') if isinstance(a.body, dict) else ''}"}
            for a in answers if a.status != 200]


class AdminServer:
    """Serves the admin API of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.started = time.time()
        self._token = node.cfg.admin.token.encode()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.peers = PeerClient(node.cfg.admin.token)
        # JSON escaping makes a message up to several times its size (CRLF becomes 4
        # characters, a non-ASCII one up to 12): room for an injection of max_message_size,
        # and past it the JSON 413 of _json, not aiohttp's plain-text one.
        self._max_body = max(1024 * 1024, 4 * node.cfg.smtp.max_message_size + 64 * 1024)
        app = web.Application(middlewares=[self._auth, self._refusals],
                              client_max_size=self._max_body)
        add = app.router
        add.add_get("/healthz", self.healthz)
        add.add_get("/readyz", self.readyz)
        add.add_get("/metrics", self.metrics)
        add.add_get("/api/v1/status", self.status)
        add.add_get("/api/v1/nodes", self.nodes)
        add.add_post("/api/v1/nodes/{node}/drain", self.drain)
        add.add_post("/api/v1/nodes/{node}/undrain", self.undrain)
        add.add_get("/api/v1/shards", self.shards)
        add.add_post("/api/v1/rebalance", self.rebalance)
        add.add_get("/api/v1/queue", self.queue)
        add.add_post("/api/v1/messages", self.inject)
        add.add_get("/api/v1/messages/{id}", self.message_show)
        add.add_post("/api/v1/messages/{id}/bounce", self.message_bounce)
        add.add_post("/api/v1/bounce", self.bounce_domain)
        add.add_post("/api/v1/flush", self.flush)
        add.add_post("/api/v1/suspend", self.suspend)
        add.add_post("/api/v1/resume", self.resume)
        add.add_get("/api/v1/throttles", self.throttles)
        add.add_post("/api/v1/throttles", self.set_throttle)
        add.add_post("/api/v1/probe", self.probe)
        add.add_get("/api/v1/slo", self.slo)
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

    @web.middleware
    async def _refusals(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Refused as exc:
            return _error(exc.status, exc.error, exc.hint)
        except ClusterOpError as exc:
            return _error(exc.status, str(exc), exc.hint)

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
        await self.peers.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = self.node.readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        node = self.node
        node.update_gauges()
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
            "leader": node.coordinator.is_leader,
            "ready": node.ready(),
        })

    # --- cluster ---------------------------------------------------------------------------

    async def _members(self) -> list[Member]:
        return await self.node.coordinator.members()

    async def _peers(self) -> list[Member]:
        return [m for m in await self._members() if m.node != self.node.node_id]

    async def nodes(self, request: web.Request) -> web.Response:
        now = time.time()
        members = await self._members()
        return web.json_response({"nodes": [
            {"node": m.node, "leader": m.leader, "draining": m.draining, "shards": m.shards,
             "smtp": m.smtp, "admin": m.admin, "version": m.version,
             "uptime": round(now - m.started, 1) if m.started else None}
            for m in members]})

    async def shards(self, request: web.Request) -> web.Response:
        table = await self.node.coordinator.shards()
        return web.json_response({"shards": [
            {"shard": s.shard, "assigned": s.assigned, "owner": s.owner, "token": s.token}
            for s in table], "total": self.node.spool.total_shards,
            "unowned": sum(1 for s in table if s.owner is None)})

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        node = request.match_info["node"]
        await self.node.coordinator.set_draining(node, draining)
        return web.json_response({"node": node, "draining": draining})

    async def drain(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, True)

    async def undrain(self, request: web.Request) -> web.Response:
        return await self._set_draining(request, False)

    async def rebalance(self, request: web.Request) -> web.Response:
        body = await self._json(request) if request.can_read_body else {}
        timeout = body.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise _Refused(400, "timeout must be a positive number of seconds")
        return web.json_response(await self.node.coordinator.rebalance(float(timeout)))

    async def _fan_out(self, request: web.Request, method: str, path: str,
                       local: Callable[[], Awaitable[dict[str, Any]]],
                       body: dict[str, Any] | None = None,
                       timeout: float | None = None
                       ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, str]]]:
        """Run ``local`` here and, unless asked with local=1, the same call on every peer:
        (this node's answer, the peers' answers, the peers that did not answer)."""
        mine = await local()
        if _local(request):
            return mine, [], []
        answers = await self.peers.ask_all(await self._peers(), method, path, body,
                                           dict(request.query), timeout)
        return mine, [a.body for a in answers if a.status == 200], _unreachable(answers)

    # --- queue and messages ----------------------------------------------------------------

    async def queue(self, request: web.Request) -> web.Response:
        async def local() -> dict[str, Any]:
            return queue_view(self.node)

        mine, theirs, unreachable = await self._fan_out(request, "GET", "/api/v1/queue", local)
        merged = merge_queues([mine, *theirs])
        merged["unreachable"] += unreachable
        return web.json_response(merged)

    def _message_id(self, request: web.Request) -> str:
        mid = request.match_info["id"].upper()
        try:
            shard_of(mid)
        except InvalidMessageId as exc:
            raise _Refused(400, str(exc), "message ids are 26 characters, as in the 250 "
                                          "reply (queued as ...) or the accounting log") from None
        return mid

    async def _owner_of(self, mid: str) -> Member | None:
        """The peer owning the message's shard, or None when it is this node."""
        shard = shard_of(mid)
        if shard in self.node.spool.owned:
            return None
        table = {s.shard: s for s in await self.node.coordinator.shards()}
        info = table.get(shard)
        if info is None:
            raise _Refused(404, f"no live message {mid}: its shard {shard} does not exist",
                           "check the id")
        if info.owner is None:
            raise _Refused(503, f"shard {shard} of {mid} has no owner right now "
                                "(a failover in progress?)", "retry in a few seconds")
        for member in await self._members():
            if member.node == info.owner:
                return member
        raise _Refused(503, f"shard {shard} is owned by {info.owner}, which is not a live "
                            "member", "retry in a few seconds")

    async def _forward(self, request: web.Request, member: Member, method: str,
                       body: dict[str, Any] | None = None) -> web.Response:
        answer = await self.peers.ask(member, method, request.path, body, timeout=60.0)
        if answer.status == 0:
            raise _Refused(502, f"{member.node} owns the message but did not answer: "
                                f"{answer.error}", f"check that {member.admin} is reachable")
        return web.json_response(answer.body, status=answer.status)

    def _not_found(self, mid: str) -> _Refused:
        return _Refused(404, f"no live message {mid}",
                        "it was delivered, bounced or expired (see the accounting log), or "
                        "never accepted")

    async def message_show(self, request: web.Request) -> web.Response:
        mid = self._message_id(request)
        if not _local(request) and (owner := await self._owner_of(mid)) is not None:
            return await self._forward(request, owner, "GET")
        if self.node.spool.live_ref(mid) is None:
            raise self._not_found(mid)
        try:
            stored = await self.node.spool.load(mid)
        except MessageNotFound:
            raise self._not_found(mid) from None
        except SpoolError as exc:
            raise _Refused(500, f"cannot read {mid} from the spool: {exc}",
                           "check the node's log and disk") from None
        return web.json_response(message_view(self.node, stored))

    def _engine(self) -> Any:
        if self.node.engine is None:
            raise _Refused(409, "delivery is disabled on this node",
                           "set [delivery] enabled = true")
        return self.node.engine

    async def message_bounce(self, request: web.Request) -> web.Response:
        mid = self._message_id(request)
        if not _local(request) and (owner := await self._owner_of(mid)) is not None:
            return await self._forward(request, owner, "POST", {})
        engine = self._engine()
        try:
            count = await engine.bounce(mid, None)
        except MessageNotFound:
            raise self._not_found(mid) from None
        except TimeoutError:
            raise _Refused(504, f"bounce of {mid} requested but not applied within 30s",
                           "it applies at the message's next attempt; check with "
                           "`mtactl message show`") from None
        return web.json_response({"id": mid, "bounced_recipients": count,
                                  "node": self.node.node_id})

    async def bounce_domain(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        domain = self._domain_arg(body)
        if domain is None:
            raise _Refused(400, "expected {\"domain\": \"example.com\"}")
        engine = self._engine()

        async def local() -> dict[str, Any]:
            try:
                messages, recipients = await engine.bounce_domain(domain)
            except TimeoutError:
                raise _Refused(504, f"bouncing {domain} did not finish within 60s",
                               "run it again; what is done stays done") from None
            return {"messages": messages, "bounced_recipients": recipients}

        mine, theirs, unreachable = await self._fan_out(
            request, "POST", "/api/v1/bounce", local, {"domain": domain}, timeout=90.0)
        return web.json_response({
            "domain": domain,
            "messages": sum(a["messages"] for a in [mine, *theirs]),
            "bounced_recipients": sum(a["bounced_recipients"] for a in [mine, *theirs]),
            "unreachable": unreachable})

    # --- operations --------------------------------------------------------------------------

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(413, f"request body larger than {self._max_body} bytes",
                           "the limit follows [smtp] max_message_size") from None
        except RecursionError:
            raise _Refused(400, "body is not JSON this API accepts: nested too deeply",
                           "send a JSON object as documented") from None
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
        try:
            raw = content.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        except UnicodeEncodeError:  # JSON may carry lone surrogates; no message can
            return _error(400, "content is not valid Unicode (a lone surrogate)",
                          "send the message as UTF-8 text")
        if len(raw) > cfg.max_message_size:
            return _error(413, f"message larger than {cfg.max_message_size} bytes", "")
        if node.fenced or node.ingress is None or not node.ingress.accepting_writes:
            if node.fenced:
                node.metrics.fenced_refusals.labels("http").inc()
            return _error(503, "node not accepting mail right now", "retry, or use another node")
        env = Envelope(sender=sender, recipients=rcpts, smtputf8=smtputf8,
                       body_8bit=not raw.isascii(), client_ip=request.remote or "",
                       helo="http", auth_user="admin-api")
        try:
            mid, _size = await store_submission(node.spool, cfg.hostname, env, raw, "HTTP",
                                                max_hops=cfg.max_hops, metrics=node.metrics,
                                                via="http")
        except SubmissionRefused as exc:  # counted and logged by store_submission
            status, error, hint = _REFUSAL_ANSWERS[exc.kind]
            return _error(status, f"{error}: {exc}", hint)
        return web.json_response({"id": mid}, status=202)

    def _domain_arg(self, body: dict[str, Any]) -> str | None:
        """The body's domain, lower-cased; None if absent. The grammar is the one recipient
        addresses pass at the doors (domains and address literals, no wildcards: suspend,
        flush and bounce match the domain of each recipient exactly), so nothing else can
        reach the runtime settings (etcd keys) or the operator's terminal."""
        domain = body.get("domain")
        if not isinstance(domain, str) or not domain:
            return None
        if problem := domain_problem(domain):
            raise _Refused(400, f"not a domain: {domain[:300]!r} ({problem})",
                           "one domain exactly as in recipient addresses, e.g. example.com "
                           "or [192.0.2.1]; no wildcards")
        return domain_key(domain)

    async def flush(self, request: web.Request) -> web.Response:
        body = await self._json(request) if request.can_read_body else {}
        domain = self._domain_arg(body)
        engine = self._engine()

        async def local() -> dict[str, Any]:
            return {"rescheduled": engine.flush(domain)}

        mine, theirs, unreachable = await self._fan_out(
            request, "POST", "/api/v1/flush", local, {"domain": domain} if domain else {})
        return web.json_response({"rescheduled": sum(a["rescheduled"] for a in [mine, *theirs]),
                                  "nodes": 1 + len(theirs), "unreachable": unreachable})

    # --- probe and SLO ---------------------------------------------------------------------

    async def probe(self, request: web.Request) -> web.Response:
        try:
            result = await self.node.prober.run()
        except ProbeError as exc:
            raise _Refused(409, str(exc), "see [probe] in docs/operations.md") from None
        return web.json_response(result)

    async def slo(self, request: web.Request) -> web.Response:
        try:
            window = parse_duration(request.query.get("window", "1h"))
        except ValueError as exc:
            raise _Refused(400, f"window: {exc}", "for example 15m, 1h, 24h") from None
        if window > 24 * 3600:
            raise _Refused(400, "window: at most 24h of history is kept", "use 24h or less")

        async def local() -> dict[str, Any]:
            return {"node": self.node.node_id, "raw": self.node.slo.raw(window)}

        mine, theirs, unreachable = await self._fan_out(request, "GET", "/api/v1/slo", local)
        if _local(request):
            return web.json_response(mine)
        cfg = self.node.cfg.slo
        objectives = {"availability": cfg.availability, "submit_p99": cfg.submit_p99,
                      "delivery_success": cfg.delivery_success}
        report = merge_reports([a["raw"] for a in [mine, *theirs]], objectives, window)
        report["nodes_answered"] = [a["node"] for a in [mine, *theirs]]
        report["unreachable"] = unreachable
        return web.json_response(report)

    async def _set_suspended(self, request: web.Request, suspend: bool) -> web.Response:
        domain = self._domain_arg(await self._json(request))
        if domain is None:
            return _error(400, "expected {\"domain\": \"example.com\"}", "")
        after = await self.node.coordinator.change_runtime(suspended={domain: suspend})
        return web.json_response({"suspended": sorted(after.suspended)})

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
        if not key.isprintable():  # runtime keys end up in etcd and on terminals
            return _error(400, f"not a domain or site: {key[:300]!r}",
                          "a domain, or a site as mtactl queue shows it")
        try:
            rate = None if spec is None else parse_rate(spec)
        except ValueError as exc:
            return _error(400, str(exc), "for example \"100/s\", \"20/m\", \"5000/h\"")
        after = await self.node.coordinator.change_runtime(throttles={key.lower(): rate})
        return web.json_response({"runtime": after.throttles})
