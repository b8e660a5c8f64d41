"""The live SMTP trace: ``GET /api/v1/trace``, a stream of NDJSON events until the client
hangs up (``mtactl trace``).

Without ``local=1`` the node also opens the same trace on every peer (with ``local=1``) and
merges their lines as they come: a client's sessions land on whichever node it connected
to. Each line carries its node; a peer that cannot be reached, refuses, or ends its stream
is one ``peer_unreachable`` line, never the end of the whole stream.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from mta.admin.errors import ApiError
from mta.admin.peers import PeerStreamError
from mta.admin.routes.base import Resource, is_local
from mta.ingress.trace import (
    TooManyTraces,
    TraceClosed,
    TraceFilter,
    TraceFilterError,
    TraceSubscription,
)

if TYPE_CHECKING:
    from mta.coordinator import Member

__all__ = ["Trace"]

log = structlog.get_logger("mta.admin")

_PATH = "/api/v1/trace"
_FILTERS = ("client", "user", "session")
_KNOWN = frozenset({*_FILTERS, "local"})
# Lines waiting for the client: past this the sources wait, so a slow client makes the
# node's subscription (not its memory) lose events, and it is told how many.
_MERGED = 256
# How often a quiet stream checks that its client is still there (aiohttp does not cancel a
# handler whose client left, and nothing is written to notice it while no session runs).
_CLIENT_CHECK = 0.25
# Once the node ends the trace (it is stopping), how long its last lines may take to go out:
# a client that reads nothing must not hold the node's shutdown.
_END_GRACE = 1.0

_dumps = functools.partial(json.dumps, allow_nan=False, separators=(",", ":"))


def _line(data: dict[str, Any]) -> bytes:
    return _dumps(data).encode() + b"\n"


def _note(node: str, event: str, **fields: Any) -> bytes:
    """A line about the stream itself (not a session's): its start, a peer's loss."""
    return _line({"time": round(time.time(), 6), "node": node, "session": None,
                  "event": event, "fields": fields})


def from_peer(node: str, line: bytes) -> bytes | None:
    """A peer's line as we pass it on: an event object re-encoded (so no raw byte of it
    reaches the client's terminal) under the node id we know the peer by; anything else
    is dropped."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    event["node"] = node
    try:
        return _line(event)
    except ValueError:  # NaN and the like: not from a real node
        return None


def _filter(request: web.Request) -> TraceFilter:
    unknown = sorted(set(request.query) - _KNOWN)
    if unknown:
        # A misspelt filter must not widen the trace to every session.
        raise ApiError.bad_request(f"unknown query parameter {unknown[0][:40]!r}",
                                   "filters are client (address or CIDR), user, session; "
                                   "local=1 for this node only")
    repeated = sorted(k for k in _KNOWN if len(request.query.getall(k, [])) > 1)
    if repeated:
        # Which one would count? Neither: a filter is said once.
        raise ApiError.bad_request(f"query parameter {repeated[0]!r} given more than once",
                                   "give each filter once")
    try:
        return TraceFilter.parse(request.query.get("client"), request.query.get("user"),
                                 request.query.get("session"))
    except TraceFilterError as exc:
        raise ApiError.bad_request(str(exc), "leave a filter out rather than send it empty"
                                   ) from None


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Trace(Resource):
    """``/api/v1/trace``."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get(_PATH, self.trace)

    async def trace(self, request: web.Request) -> web.StreamResponse:
        """Stream the events of the SMTP sessions the filter matches, here and (unless
        local=1) on every peer, one JSON object a line, until the client hangs up."""
        flt = _filter(request)
        node = self.api.node
        try:
            sub = node.trace(flt)
        except TooManyTraces as exc:
            raise ApiError(429, f"{exc}", "close a trace (mtactl trace) and retry") from None
        if sub is None:
            raise ApiError.unavailable("the SMTP listener is not up on this node",
                                       "retry once the node has started")
        with sub:
            peers = [] if is_local(request) else await self.api.peers_of()
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               "Cache-Control": "no-store"})
            await resp.prepare(request)
            log.info("admin.trace_opened", filter=flt.describe(), peers=len(peers))
            merged: asyncio.Queue[bytes] = asyncio.Queue(_MERGED)
            merged.put_nowait(_note(node.node_id, "trace_started", filter=flt.describe()))
            local = asyncio.create_task(self._local(sub, merged))
            sources = [local, *(asyncio.create_task(self._peer(m, flt, merged)) for m in peers)]
            serve = asyncio.create_task(self._serve(request, resp, merged, local))
            ended = asyncio.create_task(sub.ended.wait())
            tasks = [serve, ended, *sources]
            try:
                await asyncio.wait({serve, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not serve.done():
                    await asyncio.wait({serve}, timeout=_END_GRACE)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            log.info("admin.trace_closed", filter=flt.describe(), dropped=sub.dropped_total)
        return resp

    async def _serve(self, request: web.Request, resp: web.StreamResponse,
                     merged: asyncio.Queue[bytes], local: asyncio.Task[None]) -> None:
        """Write merged lines until the client is gone, or this node ended the trace (it is
        stopping) and its last line was written."""
        while not _client_gone(request):
            if local.done() and merged.empty():
                return
            try:
                line = await asyncio.wait_for(merged.get(), _CLIENT_CHECK)
            except TimeoutError:
                continue
            try:
                await resp.write(line)
            except (ConnectionError, RuntimeError):
                return  # the client left mid-write (RuntimeError: aiohttp's closed payload)

    async def _local(self, sub: TraceSubscription, merged: asyncio.Queue[bytes]) -> None:
        node_id = self.api.node.node_id
        while True:
            try:
                event = await sub.get()
            except TraceClosed:
                return
            await merged.put(_line(event.as_dict(node_id)))

    async def _peer(self, member: Member, flt: TraceFilter,
                    merged: asyncio.Queue[bytes]) -> None:
        error = "the peer ended its trace (stopping?)"
        try:
            async for line in self.api.peers.stream(member, _PATH, flt.describe()):
                if (clean := from_peer(member.node, line)) is not None:
                    await merged.put(clean)
        except PeerStreamError as exc:
            error = str(exc)
        log.warning("admin.trace_peer_lost", peer=member.node, error=error)
        await merged.put(_note(member.node, "peer_unreachable", error=error))
