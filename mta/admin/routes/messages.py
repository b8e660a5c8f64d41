"""The queue and single messages: summary, HTTP injection, and by id: show (with its
content), bounce, hold, release, delete (no DSN) and retry now.

A message lives on the node owning its shard: the requests by id are forwarded there unless
asked with ``local=1``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mta.admin.errors import ApiError, json_response
from mta.admin.routes.base import Resource, is_local
from mta.admin.views import merge_queues, message_view, queue_view
from mta.envelope import Envelope, shard_of
from mta.ingress.policy import address_problem
from mta.spool import MessageNotFound

if TYPE_CHECKING:
    from mta.config import SmtpConfig
    from mta.coordinator import Member

__all__ = ["Messages", "parse_injection"]

_PARTS = ("headers", "body", "all")
DEFAULT_MAX_BYTES = 65536
_TIMED_OUT = "it applies once the attempt in flight ends; check with `mtactl message show`"

_INJECTION_SHAPE = ("expected {\"from\": str, \"to\": [str, ...], \"content\": str "
                    "(RFC 5322 message)}")


def _check_shape(body: dict[str, Any]) -> tuple[str, list[str], str]:
    sender, rcpts, content = body.get("from"), body.get("to"), body.get("content")
    if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts \
            or not all(isinstance(r, str) for r in rcpts) or not isinstance(content, str):
        raise ApiError.bad_request(_INJECTION_SHAPE, "from may be \"\" for the null sender")
    return sender, rcpts, content


def parse_injection(body: dict[str, Any], cfg: SmtpConfig,
                    client_ip: str) -> tuple[Envelope, bytes]:
    """The envelope and CRLF message of an injection request, checked as the SMTP door
    checks them; a 400 or 413 ApiError otherwise."""
    sender, rcpts, content = _check_shape(body)
    smtputf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
    for addr in ([sender] if sender else []) + rcpts:
        if problem := address_problem(addr, smtputf8):
            raise ApiError.bad_request(f"bad address {addr!r}: {problem}", "use local@domain")
    if len(rcpts) > cfg.max_recipients:
        raise ApiError.bad_request(f"too many recipients (at most {cfg.max_recipients})")
    try:
        raw = content.replace("\r\n", "\n").replace("\n", "\r\n").encode()
    except UnicodeEncodeError:  # JSON may carry lone surrogates; no message can
        raise ApiError.bad_request("content is not valid Unicode (a lone surrogate)",
                                   "send the message as UTF-8 text") from None
    if len(raw) > cfg.max_message_size:
        raise ApiError(413, f"message larger than {cfg.max_message_size} bytes")
    env = Envelope(sender=sender, recipients=rcpts, smtputf8=smtputf8,
                   body_8bit=not raw.isascii(), client_ip=client_ip, helo="http",
                   auth_user="admin-api")
    return env, raw


def _message_id(request: web.Request) -> str:
    mid = request.match_info["id"].upper()
    shard_of(mid)  # raises InvalidMessageId, answered as a 400
    return mid


def _content_args(query: Any) -> tuple[str | None, int]:
    """``part`` (headers, body, all; None: no content) and ``max_bytes`` of a show."""
    part = query.get("part")
    if part is not None and part not in _PARTS:
        raise ApiError.bad_request(f"part: expected one of {', '.join(_PARTS)}")
    raw = query.get("max_bytes", str(DEFAULT_MAX_BYTES))
    # isascii: "²" is a digit int() refuses; the length keeps int() off huge strings.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or int(raw) < 1:
        raise ApiError.bad_request(f"max_bytes: expected a positive number, got {raw[:20]!r}")
    return part, int(raw)


class Messages(Resource):
    """``/api/v1/queue``, ``/api/v1/messages`` and ``/api/v1/messages/{id}[/bounce]``."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/queue", self.queue)
        router.add_post("/api/v1/messages", self.inject)
        router.add_get("/api/v1/messages/{id}", self.show)
        router.add_post("/api/v1/messages/{id}/bounce", self.bounce)
        router.add_post("/api/v1/messages/{id}/hold", self.hold)
        router.add_post("/api/v1/messages/{id}/release", self.release)
        router.add_post("/api/v1/messages/{id}/delete", self.delete)
        router.add_post("/api/v1/messages/{id}/retry", self.retry)

    async def queue(self, request: web.Request) -> web.Response:
        """Live messages by recipient domain, and delivery sites, cluster-wide."""
        node = self.api.node

        async def local() -> dict[str, Any]:
            # views reads node_id, spool, engine and coordinator: the facade has them.
            return queue_view(node)

        answers = await self.api.fan_out(request, "/api/v1/queue", local)
        merged = merge_queues(answers.all)
        merged["unreachable"] += answers.unreachable
        return json_response(merged)

    async def inject(self, request: web.Request) -> web.Response:
        """HTTP submission: same checks as SMTP; 202 only once the message is fsynced."""
        node = self.api.node
        env, raw = parse_injection(await self.api.json_body(request), node.cfg.smtp,
                                   request.remote or "")
        if not node.accepting_mail():
            raise ApiError.unavailable("node not accepting mail right now",
                                       "retry, or use another node")
        return json_response({"id": await node.submit(env, raw)}, status=202)

    async def _owner_of(self, mid: str) -> Member | None:
        """The peer owning the message's shard, or None when it is this node."""
        shard = shard_of(mid)
        if shard in self.api.node.spool.owned:
            return None
        table = {s.shard: s for s in await self.api.node.coordinator.shards()}
        info = table.get(shard)
        if info is None:
            raise ApiError.not_found(f"no live message {mid}: its shard {shard} does not exist",
                                     "check the id")
        if info.owner is None:
            raise ApiError.unavailable(f"shard {shard} of {mid} has no owner right now "
                                       "(a failover in progress?)", "retry in a few seconds")
        for member in await self.api.members():
            if member.node == info.owner:
                return member
        raise ApiError.unavailable(f"shard {shard} is owned by {info.owner}, which is not a "
                                   "live member", "retry in a few seconds")

    async def _forward(self, request: web.Request, member: Member, method: str,
                       body: dict[str, Any] | None = None) -> web.Response:
        params = {k: v for k, v in request.query.items() if k != "local"}
        answer = await self.api.peers.ask(member, method, request.path, body, params,
                                          timeout=60.0)
        if answer.status == 0:
            raise ApiError(502, f"{member.node} owns the message but did not answer: "
                                f"{answer.error}", f"check that {member.admin} is reachable")
        return json_response(answer.body, status=answer.status)

    async def show(self, request: web.Request) -> web.Response:
        """Envelope, per-recipient state and headers of one live message."""
        mid = _message_id(request)
        if not is_local(request) and (owner := await self._owner_of(mid)) is not None:
            return await self._forward(request, owner, "GET")
        part, max_bytes = _content_args(request.query)
        node = self.api.node
        if node.spool.live_ref(mid) is None:
            raise MessageNotFound(mid)
        stored = await node.spool.load(mid)
        return json_response(message_view(node, stored, part, max_bytes))

    async def bounce(self, request: web.Request) -> web.Response:
        """Bounce every pending recipient of one message now (a DSN goes to the sender)."""
        mid = _message_id(request)
        if not is_local(request) and (owner := await self._owner_of(mid)) is not None:
            return await self._forward(request, owner, "POST", {})
        engine = self.api.engine()
        try:
            count = await engine.bounce(mid, None)
        except TimeoutError:
            raise ApiError.timeout(f"bounce of {mid} requested but not applied within 30s",
                                   "it applies at the message's next attempt; check with "
                                   "`mtactl message show`") from None
        return json_response({"id": mid, "bounced_recipients": count,
                                  "node": self.api.node.node_id})

    async def _on_owner(self, request: web.Request,
                        act: Callable[[str], Awaitable[dict[str, Any]]]) -> web.Response:
        """Run ``act`` (message id -> answer) on the node owning the message."""
        mid = _message_id(request)
        if not is_local(request) and (owner := await self._owner_of(mid)) is not None:
            return await self._forward(request, owner, "POST", {})
        try:
            answer = await act(mid)
        except TimeoutError:
            raise ApiError.timeout(f"{mid}: its attempt in flight did not end within 30s",
                                   _TIMED_OUT) from None
        return json_response({"id": mid, "node": self.api.node.node_id, **answer})

    async def _set_held(self, request: web.Request, held: bool) -> web.Response:
        async def act(mid: str) -> dict[str, Any]:
            return {"held": held, "changed": await self.api.engine().set_held(mid, held)}

        return await self._on_owner(request, act)

    async def hold(self, request: web.Request) -> web.Response:
        """Hold one message: not attempted (nor expired) until released; survives restarts."""
        return await self._set_held(request, True)

    async def release(self, request: web.Request) -> web.Response:
        """Release a held message: it is scheduled again."""
        return await self._set_held(request, False)

    async def delete(self, request: web.Request) -> web.Response:
        """Delete one message without a DSN (AdminDelete accounting records)."""
        async def act(mid: str) -> dict[str, Any]:
            return {"deleted_recipients": await self.api.engine().delete(mid)}

        return await self._on_owner(request, act)

    async def retry(self, request: web.Request) -> web.Response:
        """Try one message now (a 409 when it is held)."""
        async def act(mid: str) -> dict[str, Any]:
            result = self.api.engine().retry(mid)
            if result == "held":
                raise ApiError.conflict(f"{mid} is held", "release it first: "
                                                          "`mtactl message release ID`")
            return {"result": result}

        return await self._on_owner(request, act)
