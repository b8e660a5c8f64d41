"""Acting on delivery: flush, suspend and resume a domain or site, throttles, bounce a domain.

Flush and bounce act on the queues of every node; suspensions and throttles are runtime
settings the coordinator shares with the cluster. Their keys (see
:mod:`mta.delivery.runtime`): ``{"domain": "example.com" | "*.example.com"}`` or
``{"site": "mx1.example.net" | "*.suffix" | "host:port"}``, stored and shown as
``site:<host>``.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from mta.admin.errors import ApiError, json_response
from mta.admin.keys import PatternError, label_key
from mta.admin.routes.base import Resource
from mta.config import parse_rate
from mta.delivery.runtime import RuntimeIndex

__all__ = ["Delivery"]

log = structlog.get_logger("mta.admin")

_DOMAIN_SHAPE = "expected {\"domain\": \"example.com\"}"
_KEY_SHAPE = ("expected {\"domain\": \"example.com\" or \"*.example.com\"} or "
              "{\"site\": \"mx1.example.net\", \"*.suffix\" or \"host:port\"}")
_THROTTLE_SHAPE = ("expected {\"key\": domain or *.domain, \"spec\": \"100/s\"}, "
                   "{\"site\": host, *.suffix or host:port, \"spec\": \"100/s\"} or "
                   "{\"tenant\": name, \"spec\": \"100/s\"}")


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
        """Retry now what waits for one domain, tenant or campaign (or everything), on every
        node."""
        body = await self.api.optional_json_body(request)
        domain = self.api.domain_arg(body)
        label = self._label_key(body)
        if label and domain:
            raise ApiError.bad_request("give one of domain, tenant or campaign")
        engine = self.api.engine()

        async def local() -> dict[str, Any]:
            return {"rescheduled": engine.flush(domain, {label} if label else None)}

        forward = {"domain": domain} if domain else (
            {label.split(":", 1)[0]: label.split(":", 1)[1]} if label else {})
        answers = await self.api.fan_out(request, "/api/v1/flush", local, forward)
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
        body = await self.api.json_body(request)
        key = self._label_key(body) or self.api.runtime_key(body)
        if key is None:
            raise ApiError.bad_request(_KEY_SHAPE, "a site holds every domain routed to it")
        coordinator = self.api.node.coordinator
        now = coordinator.runtime()
        if not suspend and key not in now.suspended:
            # A resume that does nothing is usually a typo the operator wants to hear about;
            # resuming one subdomain of a suspended wildcard is not possible either.
            wider = RuntimeIndex(now).domain_hold(key)
            raise ApiError.conflict(f"{key} is not suspended",
                                    f"it is held by {wider}: resume that" if wider else
                                    "`mtactl throttle show` lists the suspended domains")
        after = await coordinator.change_runtime(suspended={key: suspend})
        log.info("admin.suspended" if suspend else "admin.resumed", key=key,
                 node_id=self.api.node.node_id)
        return json_response({"suspended": sorted(after.suspended)})

    @staticmethod
    def _label_key(body: dict[str, Any]) -> str | None:
        """``tenant:NAME`` / ``campaign:NAME`` when the body names one (and nothing else)."""
        given = [k for k in ("tenant", "campaign") if k in body]
        if not given:
            return None
        if len(given) > 1 or "domain" in body or "site" in body:
            raise ApiError.bad_request("give one of domain, site, tenant or campaign",
                                       "suspend them one at a time")
        try:
            return label_key(given[0], body[given[0]])
        except PatternError as exc:
            raise ApiError.bad_request(f"{given[0]}: {exc}, got "
                                       f"{str(body[given[0]])[:100]!r}") from None

    async def suspend(self, request: web.Request) -> web.Response:
        """Stop delivering to a domain, its subdomains (``*.domain``) or a site,
        cluster-wide, until resumed."""
        return await self._set_suspended(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        """Deliver to a suspended domain, wildcard or site again."""
        return await self._set_suspended(request, False)

    async def throttles(self, request: web.Request) -> web.Response:
        """Runtime and configured rates, and the suspended domains, wildcards and sites."""
        node = self.api.node
        rt = node.coordinator.runtime()
        delivery = node.cfg.delivery
        configured = {d: p.rate for d, p in delivery.domains.items() if p.rate}
        sites = {s: p.rate for s, p in delivery.sites.items() if p.rate is not None}
        tenants = {t: p.rate for t, p in node.cfg.tenants.names.items() if p.rate is not None}
        return json_response({"runtime": rt.throttles, "configured": configured,
                                  "configured_sites": sites, "configured_tenants": tenants,
                                  "default_site_rate": delivery.rate,
                                  "suspended": sorted(rt.suspended),
                                  "unit": "messages per second"})

    async def set_throttle(self, request: web.Request) -> web.Response:
        """Set (or with spec null remove) the runtime rate of a domain or site."""
        body = await self.api.json_body(request)
        spec = body.get("spec")
        coordinator = self.api.node.coordinator
        key = self._throttle_key(body, coordinator.runtime().throttles, clear=spec is None)
        try:
            rate = None if spec is None else parse_rate(spec)
        except ValueError as exc:
            raise ApiError.bad_request(f"spec: {exc}",
                                       "for example \"100/s\", \"20/m\", \"5000/h\"") from None
        if rate is None and key not in coordinator.runtime().throttles:
            raise ApiError.conflict(f"no runtime throttle on {key} to clear",
                                    "`mtactl throttle show` lists them; configured rates "
                                    "change in the config file")
        after = await coordinator.change_runtime(throttles={key: rate})
        log.info("admin.throttle_set", key=key, rate=rate, node_id=self.api.node.node_id)
        return json_response({"runtime": after.throttles})

    def _throttle_key(self, body: dict[str, Any], current: dict[str, float], *,
                      clear: bool) -> str:
        """The stored key a throttle request names (see :meth:`Api.runtime_key`)."""
        if "campaign" in body:
            raise ApiError.bad_request("a campaign has no throttle: throttle its tenant, or "
                                       "suspend the campaign")
        if "tenant" in body and "key" in body:
            raise ApiError.bad_request("give key, site or tenant, not several",
                                       "throttle them one at a time")
        if (tenant := self._label_key(body)) is not None:
            return tenant
        raw = body.get("key")
        if clear and isinstance(raw, str) and raw in current and "site" not in body:
            # A key stored before keys were checked (a site's MX list, say) can still go.
            return raw
        key = self.api.runtime_key(body, "key")
        if key is None:
            raise ApiError.bad_request(_THROTTLE_SHAPE, "spec null removes the override")
        return key
