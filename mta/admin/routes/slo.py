"""The SLO report (cluster-wide) and the synthetic probe (this node)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mta.admin.errors import ApiError, json_response
from mta.admin.routes.base import Resource, is_local
from mta.config import parse_duration
from mta.slo import merge_reports

__all__ = ["Slo"]

_MAX_WINDOW = 24 * 3600  # the history each node keeps


def _window(request: web.Request) -> float:
    try:
        window = parse_duration(request.query.get("window", "1h"))
    except ValueError as exc:
        raise ApiError.bad_request(f"window: {exc}", "for example 15m, 1h, 24h") from None
    if window > _MAX_WINDOW:
        raise ApiError.bad_request("window: at most 24h of history is kept", "use 24h or less")
    return window


class Slo(Resource):
    """``/api/v1/slo`` and ``/api/v1/probe``."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/slo", self.slo)
        router.add_post("/api/v1/probe", self.probe)

    async def probe(self, request: web.Request) -> web.Response:
        """Run one probe now and answer its result."""
        return json_response(await self.api.node.probe())

    async def slo(self, request: web.Request) -> web.Response:
        """Availability, submission latency and delivery success against the objectives,
        over ``window`` (default 1h), merged from every node's counts."""
        window = _window(request)
        node = self.api.node

        async def local() -> dict[str, Any]:
            return {"node": node.node_id, "raw": node.slo_raw(window)}

        answers = await self.api.fan_out(request, "/api/v1/slo", local)
        if is_local(request):
            return json_response(answers.mine)
        cfg = node.cfg.slo
        objectives = {"availability": cfg.availability, "submit_p99": cfg.submit_p99,
                      "delivery_success": cfg.delivery_success}
        report = merge_reports([a["raw"] for a in answers.all], objectives, window)
        report["nodes_answered"] = [a["node"] for a in answers.all]
        report["unreachable"] = answers.unreachable
        return json_response(report)
