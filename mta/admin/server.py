"""The admin HTTP API (aiohttp): health, readiness, metrics, and one endpoint per mtactl verb.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and Prometheus scrape them);
everything under ``/api/`` needs the bearer token from ``[admin] token``. Cluster-wide
questions (queue, flush, slo, a message on another node) are answered by asking the peers
(``local=1`` makes a node answer for itself only). The handlers live in
:mod:`mta.admin.routes`, one module per resource; every error is answered by
:func:`mta.admin.errors.error_middleware`.
"""

from __future__ import annotations

import hmac
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mta.admin.errors import ApiError, Handler, error_middleware
from mta.admin.peers import PeerClient
from mta.admin.routes import Api, register_all

if TYPE_CHECKING:
    from mta.admin.facade import NodeFacade

__all__ = ["AdminServer"]


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, answering its own parser's refusals (a request line or
    header over 8190 bytes, a method like ``FOO``) in the API's ``{"error", "hint"}`` JSON,
    echoing at most a short printable prefix of what the client sent (aiohttp's plain-text
    answer echoes the offending bytes)."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp logs, and refuses when part of an answer was already sent.
        super().handle_error(request, status, exc, message)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        # aiohttp's wording up to where it quotes the client's bytes.
        detail = re.split(r"\n|:?\s*b?['\"]", str(getattr(exc, "message", "") or ""),
                          maxsplit=1)[0]
        detail = "".join(c if c.isprintable() else "?" for c in detail[:60]).strip()
        error = f"bad HTTP request: {phrase}" if status < 500 else f"internal error: {phrase}"
        response = ApiError(status, error + (f" ({detail})" if detail else ""),
                            "request lines and headers are limited to 8190 bytes; see the "
                            "admin API in docs/operations.md").response()
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        kwargs: dict[str, Any] = self._kwargs  # type: ignore[attr-defined]
        return _Protocol(self, loop=self._loop, **kwargs)  # type: ignore[attr-defined]


class _Runner(web.AppRunner):
    """An AppRunner whose connections answer HTTP parse errors as JSON (aiohttp has no
    public hook for them: the handler class is fixed in ``web.Server``)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server


class AdminServer:
    """Serves the admin API of one node, through the node's facade."""

    def __init__(self, node: NodeFacade) -> None:
        cfg = node.cfg
        self._listen = cfg.admin.listen
        self._token = cfg.admin.token.encode()
        self._runner: web.AppRunner | None = None
        self.peers = PeerClient(cfg.admin.token)
        # JSON escaping makes a message up to several times its size (CRLF becomes 4
        # characters, a non-ASCII one up to 12): room for an injection of max_message_size,
        # and past it the JSON 413 of Api.json_body, not aiohttp's plain-text one.
        max_body = max(1024 * 1024, 4 * cfg.smtp.max_message_size + 64 * 1024)
        self.api = Api(node, self.peers, max_body)
        # The error middleware is the outer one: it answers the auth middleware's refusals too.
        self.app = web.Application(middlewares=[error_middleware, self._auth],
                                   client_max_size=max_body)
        register_all(self.app.router, self.api)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        if not self._token:
            raise ApiError(403, "admin API disabled: no token configured",
                           "set [admin] token in the node's config and restart")
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), self._token):
            raise ApiError(401, "missing or wrong token",
                           "pass --token or set MTACTL_TOKEN to the node's [admin] token")
        return await handler(request)

    async def start(self) -> None:
        """Listen on ``[admin] listen``."""
        host, port = self._listen
        self._runner = _Runner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()

    @property
    def port(self) -> int:
        """The port bound (``[admin] listen`` may ask for port 0)."""
        assert self._runner is not None
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and close the peer client."""
        await self.peers.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
