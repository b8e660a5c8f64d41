"""What the handlers of every resource share: the node facade, the peers, and the few
request helpers (JSON bodies, the domain argument, cluster fan-out)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mta.admin.errors import ApiError
from mta.admin.keys import PatternError, domain_pattern, site_pattern
from mta.admin.peers import PeerAnswer, PeerClient
from mta.delivery.runtime import SITE_PREFIX
from mta.envelope import domain_key
from mta.ingress.policy import domain_problem

if TYPE_CHECKING:
    from mta.admin.facade import NodeFacade
    from mta.coordinator import Member
    from mta.delivery.engine import DeliveryEngine

__all__ = ["Api", "FanOut", "Resource", "is_local"]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this API accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError("number out of range")
    return value


def strict_loads(text: str) -> Any:
    """``json.loads`` refusing what is not JSON proper: NaN, Infinity, and numbers too big
    for a float (Python's json accepts the first two and makes the last infinite)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def is_local(request: web.Request) -> bool:
    """``local=1``: answer for this node only (how peers are asked, so fan-out never loops)."""
    return request.query.get("local") == "1"


def _unreachable(answers: list[PeerAnswer]) -> list[dict[str, str]]:
    return [{"node": a.node, "error": a.error or f"HTTP {a.status}: "
             f"{(a.body or {}).get('error', '') if isinstance(a.body, dict) else ''}"}
            for a in answers if a.status != 200]


@dataclass
class FanOut:
    """One question asked here and of every peer."""

    mine: dict[str, Any]
    theirs: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[dict[str, str]] = field(default_factory=list)

    @property
    def all(self) -> list[dict[str, Any]]:
        """This node's answer first, then the peers' that answered."""
        return [self.mine, *self.theirs]


class Api:
    """The node facade and what handlers need around it."""

    def __init__(self, node: NodeFacade, peers: PeerClient, max_body: int) -> None:
        self.node = node
        self.peers = peers
        self.max_body = max_body
        self.started = time.time()

    async def json_body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object; a 400 or 413 ApiError otherwise."""
        try:
            body = await request.json(loads=strict_loads)
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body larger than {self.max_body} bytes",
                           "the limit follows [smtp] max_message_size") from None
        except RecursionError:
            raise ApiError.bad_request("body is not JSON this API accepts: nested too deeply",
                                       "send a JSON object as documented") from None
        except ValueError as exc:
            raise ApiError.bad_request(f"body is not JSON this API accepts: {str(exc)[:100]}",
                                       "send a JSON object; NaN and Infinity are not numbers "
                                       "here") from None
        if not isinstance(body, dict):
            raise ApiError.bad_request("body must be a JSON object")
        return body

    async def optional_json_body(self, request: web.Request) -> dict[str, Any]:
        """As :meth:`json_body`, but no body at all is an empty object."""
        return await self.json_body(request) if request.can_read_body else {}

    @staticmethod
    def domain_arg(body: Mapping[str, Any], field: str = "domain") -> str | None:
        """The body's domain, lower-cased; None if absent. Present, it must be a non-empty
        string (a 400 naming the field otherwise: a wrong-typed filter must never widen an
        action). The grammar is the one recipient addresses pass at the doors (domains and
        address literals, no wildcards: flush and bounce match the domain of each recipient
        exactly; suspend and throttles take :meth:`runtime_key`), so nothing else can reach
        the operator's terminal."""
        if field not in body:
            return None
        domain = body[field]
        if not isinstance(domain, str) or not domain:
            raise ApiError.bad_request(f"{field}: expected a domain such as \"example.com\", "
                                       f"got {json.dumps(domain)[:100]}",
                                       "leave the field out rather than send it empty")
        if problem := domain_problem(domain):
            raise ApiError.bad_request(f"not a {field}: {domain[:300]!r} ({problem})",
                                       "one domain exactly as in recipient addresses, e.g. "
                                       "example.com or [192.0.2.1]; no wildcards")
        return domain_key(domain)

    @staticmethod
    def runtime_key(body: Mapping[str, Any], field: str = "domain") -> str | None:
        """The runtime key (as stored, see :mod:`mta.delivery.runtime`) that ``field`` (a
        domain or ``*.domain``) or ``site`` (a host, ``*.suffix``, ``host:port`` or
        ``[address]``, stored as ``site:...``) names; None if neither is present. A 400
        naming the problem for anything else, both at once included. ``field`` may hold a
        key as stored (``site:...``, as the answers show it): no domain has a colon."""
        if field in body and "site" in body:
            raise ApiError.bad_request(f"give {field} or site, not both",
                                       "a site holds every domain routed to it")
        name = "site" if "site" in body else field
        if name not in body:
            return None
        value = body[name]
        if not isinstance(value, str) or not value:
            raise ApiError.bad_request(f"{name}: expected a string such as "
                                       f"{'mx1.example.net' if name == 'site' else 'example.com'!r}"
                                       f", got {json.dumps(value)[:100]}",
                                       "leave the field out rather than send it empty")
        if value.startswith(SITE_PREFIX):
            name = "site"
        try:
            return site_pattern(value) if name == "site" else domain_pattern(value)
        except PatternError as exc:
            hint = ("an MX host or smarthost (host:port), or *.suffix of MX hosts, as "
                    "[delivery.sites] keys are written" if name == "site" else
                    "a domain as in recipient addresses (example.com, [192.0.2.1]), or "
                    "*.example.com for every subdomain; a site goes in the site field "
                    "(mtactl --site)")
            raise ApiError.bad_request(f"not a {name}: {value[:300]!r} ({exc})", hint) from None

    def engine(self) -> DeliveryEngine:
        """The delivery engine; a 409 when delivery is disabled on this node."""
        if self.node.engine is None:
            raise ApiError.conflict("delivery is disabled on this node",
                                    "set [delivery] enabled = true")
        return self.node.engine

    async def members(self, *, leases: bool = False) -> list[Member]:
        """Every live member of the cluster (this node alone when standalone); ``leases``
        marks those whose lease is running out (a store call per member)."""
        return await self.node.coordinator.members(leases=leases)

    async def peers_of(self) -> list[Member]:
        """The live members other than this node."""
        return [m for m in await self.members() if m.node != self.node.node_id]

    async def fan_out(self, request: web.Request, path: str,
                      local: Callable[[], Awaitable[dict[str, Any]]],
                      body: dict[str, Any] | None = None,
                      timeout: float | None = None) -> FanOut:
        """Run ``local`` here and, unless asked with local=1, the same request (method,
        query, ``body``) on every peer."""
        mine = await local()
        if is_local(request):
            return FanOut(mine)
        answers = await self.peers.ask_all(await self.peers_of(), request.method, path, body,
                                           dict(request.query), timeout)
        return FanOut(mine, [a.body for a in answers if a.status == 200], _unreachable(answers))


class Resource:
    """The handlers of one resource; ``register`` adds their routes."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def register(self, router: web.UrlDispatcher) -> None:
        """Add this resource's routes."""
        raise NotImplementedError
