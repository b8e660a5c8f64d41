"""The queue tools of a Postfix or KumoMTA admin, over many messages at once: list the
queue with filters (``mailq``), and hold, release, delete (no DSN) or bounce what a filter
matches, on every node. Acting on one message by id is in :mod:`mta.admin.routes.messages`.

Each node answers for the shards it owns; the answers are merged here, so the list is in id
(arrival) order across the cluster and paged with the last id of a page as the cursor.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from mta.admin.errors import ApiError, json_response
from mta.admin.routes.base import Api, Resource
from mta.admin.views import QUEUE_STATES, QueueFilter, list_view, matching_ids, merge_lists
from mta.config import TENANT_NAME, parse_duration
from mta.ingress.policy import address_problem
from mta.spool import MessageNotFound

__all__ = ["QueueTools", "parse_filter"]

_FILTER_KEYS = ("sender", "recipient", "domain", "older_than", "newer_than", "state",
                "next_before", "tenant", "campaign")
_LIST_KEYS = frozenset({*_FILTER_KEYS, "limit", "cursor", "local"})
_ACTION_KEYS = frozenset({*_FILTER_KEYS, "dry_run"})
_CURSOR = re.compile(r"[0-9A-Za-z]{1,26}")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_ACTIONS = ("hold", "release", "delete", "bounce")
_AT_ONCE = 32  # messages acted on concurrently by one node


def _duration(key: str, value: Any, zero_ok: bool = False) -> float:
    if zero_ok and str(value).strip() in ("0", "0s", "0.0"):
        return 0.0
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):  # NaN would match every message
        raise ApiError.bad_request(f"{key}: expected a duration such as 90, \"30m\" or "
                                   f"\"2d\", got {str(value)[:100]!r}")
    return seconds


def _address(key: str, value: Any) -> str:
    """A sender or recipient filter: an address as the doors accept it (``<>`` is the null
    sender), so no control character reaches the match or the operator's terminal."""
    if key == "sender" and value == "<>":
        return ""
    text = value.strip() if isinstance(value, str) else ""
    problem = "expected an address" if not text or len(text) > 512 else \
        address_problem(text, True)
    if problem:
        raise ApiError.bad_request(f"{key}: {problem}, got {str(value)[:100]!r}",
                                   "local@domain exactly as in the envelope; the null sender "
                                   "is <>")
    return text


def _label(key: str, value: Any) -> str:
    """A tenant or campaign filter: a name as [tenants] allows, or "" (mail without one)."""
    if value == "" or (isinstance(value, str) and TENANT_NAME.fullmatch(value)):
        return value
    raise ApiError.bad_request(f"{key}: expected 1-64 letters, digits, '.', '_' or '-' (or "
                               f"\"\" for none), got {str(value)[:100]!r}")


def parse_filter(api: Api, args: Mapping[str, Any], allowed: frozenset[str]) -> QueueFilter:
    """The filter in a query string or JSON body; a 400 on an unknown key or on a present
    key with a bad value (wrong type, empty, null: a filter that is dropped would widen an
    action to more messages than asked for)."""
    if unknown := sorted(set(args) - allowed):
        raise ApiError.bad_request(f"unknown parameter(s): {', '.join(unknown)}",
                                   f"filters are {', '.join(_FILTER_KEYS)}")
    state = args.get("state")
    if "state" in args and (not isinstance(state, str) or state not in QUEUE_STATES):
        raise ApiError.bad_request(f"state: expected one of {', '.join(QUEUE_STATES)}, got "
                                   f"{str(state)[:50]!r}")

    def given(key: str, parse: Callable[[str, Any], Any]) -> Any:
        return parse(key, args[key]) if key in args else None

    nxt = given("next_before", lambda k, v: time.time() + _duration(k, v, zero_ok=True))
    return QueueFilter(
        sender=given("sender", _address), recipient=given("recipient", _address),
        domain=api.domain_arg(args), older_than=given("older_than", _duration),
        newer_than=given("newer_than", _duration), state=state, next_before=nxt,
        tenant=given("tenant", _label), campaign=given("campaign", _label))


def _limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit", str(DEFAULT_LIMIT))
    # isascii: "²" is a digit int() refuses; the length keeps int() off huge strings.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) \
            or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError.bad_request(f"limit: expected 1 to {MAX_LIMIT}, got {raw[:20]!r}")
    return int(raw)


def _cursor(query: Mapping[str, str]) -> str:
    cursor = query.get("cursor", "")
    if cursor and not _CURSOR.fullmatch(cursor):
        raise ApiError.bad_request("cursor: expected the next_cursor of the previous page")
    return cursor.upper()


class QueueTools(Resource):
    """``GET /api/v1/queue/messages`` and ``POST /api/v1/queue/{hold,release,delete,bounce}``."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/queue/messages", self.list)
        for action in _ACTIONS:
            router.add_post(f"/api/v1/queue/{action}", self.act)

    async def list(self, request: web.Request) -> web.Response:
        """One page of the live messages matching the filter, cluster-wide, oldest first."""
        query = request.query
        filt = parse_filter(self.api, query, _LIST_KEYS)
        limit, cursor = _limit(query), _cursor(query)

        async def local() -> dict[str, Any]:
            return await list_view(self.api.node, filt, cursor, limit)

        answers = await self.api.fan_out(request, "/api/v1/queue/messages", local)
        merged = merge_lists(answers.all, limit)
        merged["unreachable"] = answers.unreachable
        return json_response(merged)

    def _act_one(self, action: str) -> Callable[[str], Awaitable[tuple[int, int]]]:
        """(messages, recipients) changed by ``action`` on one message of this node."""
        engine = self.api.engine()

        async def hold(mid: str) -> tuple[int, int]:
            return int(await engine.set_held(mid, action == "hold")), 0

        async def delete(mid: str) -> tuple[int, int]:
            return 1, await engine.delete(mid)

        async def bounce(mid: str) -> tuple[int, int]:
            count = await engine.bounce(mid, None)
            return int(count > 0), count

        return {"hold": hold, "release": hold, "delete": delete, "bounce": bounce}[action]

    async def _act_here(self, action: str, filt: QueueFilter, dry_run: bool) -> dict[str, Any]:
        ids = await matching_ids(self.api.node, filt)
        out = {"matched": len(ids), "messages": 0, "recipients": 0, "failed": 0}
        if dry_run:
            return out
        act = self._act_one(action)
        # A few at a time: a bounce waits for the message's attempt, a hold or delete for the
        # attempt in flight; one by one, a big filter would take minutes.
        for start in range(0, len(ids), _AT_ONCE):
            results = await asyncio.gather(*(act(mid) for mid in ids[start:start + _AT_ONCE]),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, TimeoutError):
                    out["failed"] += 1
                elif isinstance(result, MessageNotFound):
                    continue  # finished meanwhile
                elif isinstance(result, BaseException):
                    raise result
                else:
                    out["messages"] += result[0]
                    out["recipients"] += result[1]
        return out

    async def act(self, request: web.Request) -> web.Response:
        """Hold, release, delete (no DSN) or bounce (DSN) every live message the filter
        matches, on every node; ``dry_run`` only counts them. An empty filter is refused."""
        action = request.path.rsplit("/", 1)[1]
        body = await self.api.json_body(request)
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError.bad_request("dry_run: expected true or false")
        filt = parse_filter(self.api, body, _ACTION_KEYS)
        if filt.empty():
            raise ApiError.bad_request(f"{action} by filter needs at least one filter",
                                       f"filters are {', '.join(_FILTER_KEYS)}; to act on "
                                       "one message use /api/v1/messages/ID/" + action)
        self.api.engine()  # a 409 here, before peers are asked, when delivery is off

        async def local() -> dict[str, Any]:
            return await self._act_here(action, filt, dry_run)

        answers = await self.api.fan_out(request, request.path, local, body, timeout=120.0)
        total = {key: sum(a[key] for a in answers.all)
                 for key in ("matched", "messages", "recipients", "failed")}
        return json_response({"action": action, "dry_run": dry_run, **total,
                                  "nodes": len(answers.all),
                                  "unreachable": answers.unreachable})
