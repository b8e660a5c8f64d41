"""The admin API's one error style: ``{"error": ..., "hint": ...}`` JSON with an HTTP status.

Handlers raise :class:`ApiError` (or let a domain exception of :data:`DOMAIN_ERRORS` rise);
:func:`error_middleware` answers every one of them, aiohttp's own HTTP errors (unknown path,
wrong method) alike, and turns anything unexpected into a 500 that names no internals: the
traceback goes to the node's log, never to the client.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from mta.coordinator import ClusterOpError
from mta.envelope import InvalidMessageId
from mta.ingress.submit import SubmissionRefused, TooManyHops
from mta.probe import ProbeError
from mta.spool import MessageNotFound, SpoolError

__all__ = ["DOMAIN_ERRORS", "ApiError", "Handler", "error_middleware", "json_response",
           "translate"]

log = structlog.get_logger("mta.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# JSON has no NaN or Infinity: a value that would need them is a bug answered as a 500 (the
# error middleware), never a body clients cannot parse.
_dumps = functools.partial(json.dumps, allow_nan=False)


def json_response(data: Any, *, status: int = 200) -> web.Response:
    """Every JSON answer of the admin API: strict JSON only."""
    return web.json_response(data, status=status, dumps=_dumps)


class ApiError(Exception):
    """A clear refusal, answered as ``{"error": error, "hint": hint}`` with ``status``."""

    def __init__(self, status: int, error: str, hint: str = "") -> None:
        super().__init__(error)
        self.status, self.error, self.hint = status, error, hint

    def response(self) -> web.Response:
        """The JSON answer."""
        return json_response({"error": self.error, "hint": self.hint}, status=self.status)

    @classmethod
    def bad_request(cls, error: str, hint: str = "") -> ApiError:
        """400: the request is wrong; the hint says how to write it."""
        return cls(400, error, hint)

    @classmethod
    def not_found(cls, error: str, hint: str = "") -> ApiError:
        """404: no such thing here."""
        return cls(404, error, hint)

    @classmethod
    def conflict(cls, error: str, hint: str = "") -> ApiError:
        """409: cannot be done in this node's present setup (say, delivery disabled)."""
        return cls(409, error, hint)

    @classmethod
    def unavailable(cls, error: str, hint: str = "") -> ApiError:
        """503: not now; retrying (here or on another node) may work."""
        return cls(503, error, hint)

    @classmethod
    def timeout(cls, error: str, hint: str = "") -> ApiError:
        """504: asked for, but not done in the time allowed."""
        return cls(504, error, hint)


# How each way store_submission refuses a message is answered (status, error, hint).
_REFUSALS = {
    "too_many_hops": (422, TooManyHops.reply, "the message is looping between mail servers; "
                                              "do not resubmit it"),
    "no_shards": (503, "no spool shard on this node", "retry, or use another node"),
    # Not a disk problem: this node may not write the shard now, a peer may.
    "fenced": (503, "not serving this shard now", "retry on another node"),
    "disk": (507, "spool write failed", "free disk space, then retry"),
    "unavailable": (503, "spool unavailable", "retry later"),
    "unsigned": (422, "DKIM signing is required and the message cannot be signed",
                 "send it From: a domain with a key in [dkim.domains]"),
    "sign_failed": (503, "DKIM signing failed", "retry later"),
    "bad_label": (422, "bad tenant or campaign header", "use 1-64 letters, digits, '.', '_' "
                                                        "or '-'"),
}


def _refused(exc: SubmissionRefused) -> ApiError:
    status, error, hint = _REFUSALS[exc.kind]
    return ApiError(status, f"{error}: {exc}", hint)


def _cluster_op(exc: ClusterOpError) -> ApiError:
    return ApiError(exc.status, str(exc), exc.hint)


def _bad_id(exc: InvalidMessageId) -> ApiError:
    return ApiError.bad_request(str(exc), "message ids are 26 characters, as in the 250 reply "
                                          "(queued as ...) or the accounting log")


def _not_found(exc: MessageNotFound) -> ApiError:
    return ApiError.not_found(f"no live message {exc}",
                              "it was delivered, bounced or expired (see the accounting log), "
                              "or never accepted")


def _spool(exc: SpoolError) -> ApiError:
    return ApiError(500, f"cannot read from the spool: {exc}", "check the node's log and disk")


def _probe(exc: ProbeError) -> ApiError:
    return ApiError.conflict(str(exc), "see [probe] in docs/operations.md")


# The one place where the exceptions of the node's parts become HTTP answers. First match
# wins, so a subclass comes before its base (MessageNotFound is a SpoolError).
DOMAIN_ERRORS: tuple[tuple[type[Exception], Callable[[Any], ApiError]], ...] = (
    (ClusterOpError, _cluster_op),
    (InvalidMessageId, _bad_id),
    (MessageNotFound, _not_found),
    (SubmissionRefused, _refused),
    (SpoolError, _spool),
    (ProbeError, _probe),
)


def translate(exc: Exception) -> ApiError | None:
    """The answer to a domain exception, or None when it is not one the API expects."""
    if isinstance(exc, ApiError):
        return exc
    for kind, answer in DOMAIN_ERRORS:
        if isinstance(exc, kind):
            return answer(exc)
    return None


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404 unknown path, 405 wrong method...) in the same JSON shape."""
    hint = "see the admin API in docs/operations.md" if exc.status in (404, 405) else ""
    response = ApiError(exc.status, exc.reason, hint).response()
    if "Allow" in exc.headers:  # a 405 says which methods the path takes
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def _internal_error(request: web.Request, exc: Exception) -> web.Response:
    log.error("admin.internal_error", method=request.method, path=request.path,
              error_type=type(exc).__name__, exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}) answering {request.method} "
                         "request", "the node's log has the details (event "
                                    "admin.internal_error); please report it").response()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error a handler raises as ``{"error", "hint"}`` JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are answers, not errors
            raise
        return _http_error(exc)
    except Exception as exc:
        answer = translate(exc)
        if answer is None:
            return _internal_error(request, exc)
        return answer.response()
