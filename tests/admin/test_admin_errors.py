"""The admin API's one error style: every refusal is ``{"error", "hint"}`` JSON with its
status, domain exceptions are answered from one table, and an unexpected exception is a 500
with a clear body and a log line, never a traceback or the exception's text."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mta.admin.errors import ApiError, error_middleware
from mta.coordinator import ClusterOpError
from mta.envelope import InvalidMessageId
from mta.ingress.submit import SubmissionRefused, TooManyHops
from mta.probe import ProbeError
from mta.spool import MessageNotFound, SpoolError

# Each domain exception a handler may let rise, and the status it is answered with.
DOMAIN_CASES: list[tuple[Exception, int, str]] = [
    (ClusterOpError("drain needs a cluster", "run with [cluster] etcd"), 409, "needs a cluster"),
    (ClusterOpError("etcd unreachable", "retry", status=503), 503, "etcd unreachable"),
    (InvalidMessageId("not a message id"), 400, "not a message id"),
    (MessageNotFound("01KAQZZZZZ0000000000000000"), 404,
     "no live message 01KAQZZZZZ0000000000000000"),
    (SpoolError("EIO: shard-001"), 500, "EIO: shard-001"),
    (SubmissionRefused("disk", "ENOSPC"), 507, "spool write failed: ENOSPC"),
    (SubmissionRefused("fenced", "shard 3"), 503, "not serving this shard now"),
    (TooManyHops(31, 30), 422, "554 5.4.6 Too many hops"),
    (ProbeError("no [probe] recipient configured"), 409, "no [probe] recipient"),
]

SECRET = "secret-detail-of-the-bug"
RAISES = web.AppKey("raises", BaseException)


async def _raise(request: web.Request) -> web.Response:
    raise request.app[RAISES]


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    """``url = await serve(exc)``: an app whose /x raises ``exc``, behind the middleware."""
    runners: list[web.AppRunner] = []

    async def start(exc: BaseException) -> str:
        app = web.Application(middlewares=[error_middleware])
        app[RAISES] = exc
        app.router.add_get("/x", _raise)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _get(url: str, method: str = "GET",
               headers: dict[str, str] | None = None) -> tuple[int, str, str, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, url,
                                                             headers=headers) as resp:
        text = await resp.text()
        return resp.status, resp.content_type, text, resp.headers


def _error_body(ctype: str, text: str) -> dict[str, str]:
    assert ctype == "application/json", text
    body = json.loads(text)
    assert set(body) == {"error", "hint"}, body
    assert "Traceback" not in text and 'File "' not in text, text
    return body


async def test_an_api_error_is_answered_with_its_status(serve: Any) -> None:
    url = await serve(ApiError(418, "short and stout", "tip it over"))
    status, ctype, text, _ = await _get(url + "/x")
    assert status == 418
    assert _error_body(ctype, text) == {"error": "short and stout", "hint": "tip it over"}


@pytest.mark.parametrize(("exc", "status", "error"), DOMAIN_CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}" for c in DOMAIN_CASES])
async def test_domain_exceptions_are_answered_from_one_table(
        serve: Any, exc: Exception, status: int, error: str) -> None:
    got, ctype, text, _ = await _get(await serve(exc) + "/x")
    assert got == status, text
    assert error in _error_body(ctype, text)["error"]


async def test_an_unexpected_exception_is_a_500_with_a_clear_body_and_a_log_line(
        serve: Any) -> None:
    url = await serve(KeyError(SECRET))
    with capture_logs() as logs:
        status, ctype, text, _ = await _get(url + "/x")
    assert status == 500
    body = _error_body(ctype, text)
    assert "internal error (KeyError)" in body["error"] and "admin.internal_error" in body["hint"]
    assert SECRET not in text  # the exception's text stays in the node's log
    [line] = [e for e in logs if e["event"] == "admin.internal_error"]
    assert line["log_level"] == "error" and line["path"] == "/x" and line["method"] == "GET"
    assert line["error_type"] == "KeyError" and isinstance(line["exc_info"], KeyError)


async def test_aiohttp_errors_take_the_same_shape(serve: Any) -> None:
    url = await serve(ApiError(400, "unused"))
    status, ctype, text, _ = await _get(url + "/no/such/path")
    assert status == 404 and _error_body(ctype, text)["error"] == "Not Found"
    status, ctype, text, headers = await _get(url + "/x", method="DELETE")
    assert status == 405 and _error_body(ctype, text)["error"] == "Method Not Allowed"
    assert "GET" in headers["Allow"]


async def test_a_real_node_answers_every_error_as_json(start_node: Any) -> None:
    node = await start_node()
    base = f"http://127.0.0.1:{node.admin.port}"
    auth = {"Authorization": "Bearer t0ken"}
    cases = [("GET", "/api/v1/status", {}, 401), ("GET", "/api/v1/nope", auth, 404),
             ("GET", "/api/v1/messages/nonsense", auth, 400),
             ("GET", "/api/v1/messages/01KAQZZZZZ0000000000000000", auth, 404),
             ("POST", "/api/v1/flush", auth, 409),  # delivery disabled on test nodes
             ("POST", "/api/v1/nodes/x/drain", auth, 409)]  # standalone
    for method, path, headers, expected in cases:
        status, ctype, text, _ = await _get(base + path, method, headers)
        assert status == expected, (path, text)
        assert _error_body(ctype, text)["hint"], (path, text)

    # A bug behind a handler (planted: the probe raises) is a 500, and the node serves on.
    async def broken() -> dict[str, Any]:
        raise RuntimeError(SECRET)

    node.prober.run = broken
    status, ctype, text, _ = await _get(base + "/api/v1/probe", "POST", auth)
    assert status == 500 and SECRET not in text
    assert "RuntimeError" in _error_body(ctype, text)["error"]
    status, _, text, _ = await _get(base + "/api/v1/status", "GET", auth)
    assert status == 200 and json.loads(text)["node"] == node.node_id
