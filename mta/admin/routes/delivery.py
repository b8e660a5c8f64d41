"""Acting on delivery: flush, suspend and resume a domain, throttles, bounce a domain.

Flush and bounce act on the queues of every node; suspensions and throttles are runtime
settings the coordinator shares with the cluster.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from mta.admin.errors import ApiError, json_response
from mta.admin.routes.base import Resource
from mta.config import parse_rate

__all__ = ["Delivery"]

_DOMAIN_SHAPE = "expected {\"domain\": \"example.com\"}"


class Delivery(Resource):
    """``/api/v1/flush``, ``/suspend``, ``/resume``, ``/throttles`` and ``/bounce``."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/v1/flush", self.flush)
        router.add_post("/api/v1/suspend", self.suspend)
        router.add_post("/api/v1/resume", self.resume)
        router.add_get("/api/v1/throttles", self.throttles)
        router.add_post("/api/v1/throttles", self.set_throttle)
        router.add_post("/api/v1/bounce", self.bounce_domain)

    async def _required_domain(self, request: web.Request, hint: str = "") -> str:
        body = await self.api.json_body(request)
        domain = self.api.domain_arg(body)
        if domain is None:
            raise ApiError.bad_request(_DOMAIN_SHAPE, hint)
        return domain

    async def flush(self, request: web.Request) -> web.Response:
        """Retry now what waits for one domain (or everything), on every node."""
        domain = self.api.domain_arg(await self.api.optional_json_body(request))
        engine = self.api.engine()

        async def local() -> dict[str, Any]:
            return {"rescheduled": engine.flush(domain)}

        answers = await self.api.fan_out(request, "/api/v1/flush", local,
                                         {"domain": domain} if domain else {})
        return json_response({"rescheduled": sum(a["rescheduled"] for a in answers.all),
                                  "nodes": len(answers.all),
                                  "unreachable": answers.unreachable})

    async def bounce_domain(self, request: web.Request) -> web.Response:
        """Bounce every pending recipient at one domain, on every node."""
        domain = await self._required_domain(request)
        engine = self.api.engine()

        async def local() -> dict[str, Any]:
            try:
                messages, recipients = await engine.bounce_domain(domain)
            except TimeoutError:
                raise ApiError.timeout(f"bouncing {domain} did not finish within 60s",
                                       "run it again; what is done stays done") from None
            return {"messages": messages, "bounced_recipients": recipients}

        answers = await self.api.fan_out(request, "/api/v1/bounce", local, {"domain": domain},
                                         timeout=90.0)
        return json_response({
            "domain": domain,
            "messages": sum(a["messages"] for a in answers.all),
            "bounced_recipients": sum(a["bounced_recipients"] for a in answers.all),
            "unreachable": answers.unreachable})

    async def _set_suspended(self, request: web.Request, suspend: bool) -> web.Response:
        domain = await self._required_domain(request)
        coordinator = self.api.node.coordinator
        if not suspend and domain not in coordinator.runtime().suspended:
            # A resume that does nothing is usually a typo the operator wants to hear about.
            raise ApiError.conflict(f"{domain} is not suspended",
                                    "`mtactl throttle show` lists the suspended domains")
        after = await coordinator.change_runtime(suspended={domain: suspend})
        return json_response({"suspended": sorted(after.suspended)})

    async def suspend(self, request: web.Request) -> web.Response:
        """Stop delivering to a domain, cluster-wide, until resumed."""
        return await self._set_suspended(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        """Deliver to a suspended domain again."""
        return await self._set_suspended(request, False)

    async def throttles(self, request: web.Request) -> web.Response:
        """Runtime and configured rates, and the suspended domains."""
        node = self.api.node
        rt = node.coordinator.runtime()
        delivery = node.cfg.delivery
        configured = {d: p.rate for d, p in delivery.domains.items() if p.rate}
        return json_response({"runtime": rt.throttles, "configured": configured,
                                  "default_site_rate": delivery.rate,
                                  "suspended": sorted(rt.suspended),
                                  "unit": "messages per second"})

    async def set_throttle(self, request: web.Request) -> web.Response:
        """Set (or with spec null remove) the runtime rate of a domain or site."""
        body = await self.api.json_body(request)
        key, spec = body.get("key"), body.get("spec")
        if not isinstance(key, str) or not key:
            raise ApiError.bad_request("expected {\"key\": domain or site, \"spec\": \"100/s\"}",
                                       "spec null removes the override")
        if not key.isprintable():  # runtime keys end up in etcd and on terminals
            raise ApiError.bad_request(f"not a domain or site: {key[:300]!r}",
                                       "a domain, or a site as mtactl queue shows it")
        try:
            rate = None if spec is None else parse_rate(spec)
        except ValueError as exc:
            raise ApiError.bad_request(f"spec: {exc}",
                                       "for example \"100/s\", \"20/m\", \"5000/h\"") from None
        key = key.lower()
        coordinator = self.api.node.coordinator
        if rate is None and key not in coordinator.runtime().throttles:
            raise ApiError.conflict(f"no runtime throttle on {key} to clear",
                                    "`mtactl throttle show` lists them; configured rates "
                                    "change in the config file")
        after = await coordinator.change_runtime(throttles={key: rate})
        return json_response({"runtime": after.throttles})
