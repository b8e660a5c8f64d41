"""What a hostile review found in the admin API, the queue tools and mtactl, each checked
over real HTTP against a node process or by running mtactl as a subprocess:

- a filter field that is present but wrong-typed, empty or null is refused (400 naming it),
  never dropped (a dropped ``domain`` widened a delete to every message);
- NaN, Infinity and numbers too big for a float are not JSON numbers here (NaN matched every
  message), and no answer ever carries them;
- ``limit`` and ``max_bytes`` that are digits ``int()`` refuses ("²") or huge: 400, not 500;
- an absurd throttle rate is refused rather than stored as Infinity;
- aiohttp's own parser errors (long request line, method ``FOO``) answer JSON, echoing little;
- filters with control characters are refused with the doors' address grammar;
- mtactl takes options before a sub-action's positional arguments, and says one line (no
  traceback) on a bad URL, a password that is not UTF-8, or an unwritable stdout;
- ``[delivery.sites]`` keys: ``host:port`` matches a smarthost so written; empty, malformed,
  control-character and case-colliding keys are refused at load.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.config import ConfigError, config_from_dict
from mta.delivery.limits import site_limits
from mta.delivery.routes import Route
from tests.support import NodeProcess, free_port, node_config, submit

TOKEN = "secret"


def _strict(text: str | bytes) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are errors."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("hostile_admin")
    # Delivery to a port nobody listens on, retried in an hour: what is queued stays queued.
    raw = node_config(work / "spool", admin={"token": TOKEN}, delivery={
        "enabled": True, "smarthost": f"127.0.0.1:{free_port()}", "retry_initial": "1h",
        "retry_max": "2h", "accounting_log": str(work / "acct.jsonl")})
    proc = NodeProcess(work, raw).start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def queued(node: NodeProcess) -> str:
    """One live message for keep.example, on the node."""
    return submit(node, ["someone@keep.example"], 1)


def _http(node: NodeProcess, method: str, path: str, body: Any = None,
          raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}", method=method, data=data,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, _strict(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _strict(exc.read())


def _live(node: NodeProcess) -> list[str]:
    status, page = _http(node, "GET", "/api/v1/queue/messages?limit=1000")
    assert status == 200, page
    return [m["id"] for m in page["messages"]]


# --- 1. a present filter field is validated, never dropped --------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"domain": ["drop.example"], "newer_than": "1h"}, "domain"),
    ({"domain": 5, "newer_than": "1h"}, "domain"),
    ({"domain": "", "newer_than": "1h"}, "domain"),
    ({"domain": None, "newer_than": "1h"}, "domain"),
    ({"sender": 5, "newer_than": "1h"}, "sender"),
    ({"recipient": "", "newer_than": "1h"}, "recipient"),
    ({"state": ["held"], "newer_than": "1h"}, "state"),
    ({"newer_than": "1h", "older_than": None}, "older_than"),
])
def test_a_wrong_typed_filter_never_widens_a_delete(node: NodeProcess, queued: str,
                                                    body: dict[str, Any], field: str) -> None:
    status, answer = _http(node, "POST", "/api/v1/queue/delete", body)
    assert status == 400, answer
    assert field in answer["error"], answer
    assert queued in _live(node)


def test_flush_refuses_a_wrong_typed_domain(node: NodeProcess) -> None:
    for bad in (5, "", ["a.example"], None):
        status, answer = _http(node, "POST", "/api/v1/flush", {"domain": bad})
        assert status == 400 and "domain" in answer["error"], (bad, answer)
    assert _http(node, "POST", "/api/v1/flush", {"domain": "keep.example"})[0] == 200


# --- 2. NaN and Infinity are not numbers here ---------------------------------------------


@pytest.mark.parametrize("raw", [b'{"older_than": NaN}', b'{"newer_than": Infinity}',
                                 b'{"older_than": -Infinity}', b'{"older_than": 1e999}'])
def test_non_finite_numbers_are_refused(node: NodeProcess, queued: str, raw: bytes) -> None:
    status, answer = _http(node, "POST", "/api/v1/queue/delete", raw=raw)
    # Refused as the body is read, whatever field carries it.
    assert status == 400 and "not JSON" in answer["error"], answer
    assert queued in _live(node)


# --- 3. numbers int() cannot take ---------------------------------------------------------


@pytest.mark.parametrize("value", ["%C2%B2", "9" * 5000, "-1", "", "%EF%BC%91"])
def test_limit_and_max_bytes_are_checked(node: NodeProcess, queued: str, value: str) -> None:
    status, answer = _http(node, "GET", f"/api/v1/queue/messages?limit={value}")
    assert status == 400 and "limit" in answer["error"], answer
    status, answer = _http(node, "GET", f"/api/v1/messages/{queued}?max_bytes={value}")
    assert status == 400 and "max_bytes" in answer["error"], answer


# --- 4. an absurd rate is refused, and answers are strict JSON ----------------------------


def test_an_infinite_rate_is_refused(node: NodeProcess) -> None:
    for spec in ("9" * 5000 + "/s", "2000000/s"):
        status, answer = _http(node, "POST", "/api/v1/throttles",
                               {"key": "example.org", "spec": spec})
        assert status == 400, answer
        assert len(answer["error"]) < 200
    status, answer = _http(node, "GET", "/api/v1/throttles")  # strict parse: no Infinity
    assert status == 200 and "example.org" not in answer["runtime"]


# --- 5. aiohttp's own parser errors -------------------------------------------------------


def _raw_exchange(node: NodeProcess, request: bytes) -> tuple[str, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", node.admin_port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return status, headers, body


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"B" * 9000 + b"\r\n\r\n",
    b"FOO /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_http_parse_errors_answer_json(node: NodeProcess, request_bytes: bytes) -> None:
    status, headers, body = _raw_exchange(node, request_bytes)
    assert status.split()[1].startswith("4"), status
    assert headers["content-type"].startswith("application/json"), (headers, body[:200])
    answer = _strict(body)
    assert set(answer) == {"error", "hint"}
    assert len(body) < 600 and b"AAAAAAAAAA" not in body and b"BBBBBBBBBB" not in body


# --- 6. control characters in filters -----------------------------------------------------


@pytest.mark.parametrize(("query", "field"), [
    ("sender=%00", "sender"), ("sender=a%00b@x.example", "sender"),
    ("recipient=a%01@x.example", "recipient"), ("recipient=x%1b[2J@x.example", "recipient"),
    ("domain=x%00.example", "domain"), ("sender=not-an-address", "sender"),
])
def test_filters_refuse_control_characters(node: NodeProcess, query: str, field: str) -> None:
    status, answer = _http(node, "GET", f"/api/v1/queue/messages?{query}")
    assert status == 400 and field in answer["error"], answer
    status, answer = _http(node, "POST", "/api/v1/queue/hold",
                           {field: urllib.parse.unquote(query.split("=", 1)[1])})
    assert status == 400 and field in answer["error"], answer


# --- 7. and 8. mtactl ---------------------------------------------------------------------


def _mtactl(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
            stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run([sys.executable, "-m", "mta.cli.ctl", *args], input=stdin,
                         stdout=stdout, stderr=subprocess.PIPE, timeout=60,
                         env={**os.environ, **(env or {})})
    assert b"Traceback" not in res.stderr, res.stderr.decode(errors="replace")
    return res


def test_mtactl_options_before_positionals(node: NodeProcess, queued: str) -> None:
    url = f"http://127.0.0.1:{node.admin_port}"
    for args in (("message", "show", "--token", TOKEN, queued),
                 ("message", "show", "--headers", "--token", TOKEN, queued),
                 ("message", "--token", TOKEN, "show", queued)):
        res = _mtactl("--url", url, *args)
        assert res.returncode == 0, (args, res.stderr)
        assert queued in res.stdout.decode()
    res = _mtactl("--url", url, "message", "show", "--headers", "--token", TOKEN, queued)
    assert "Subject:" in res.stdout.decode() or "From:" in res.stdout.decode()
    res = _mtactl("--url", url, "throttle", "set", "--token", TOKEN, "example.org", "5/s")
    assert res.returncode == 0, res.stderr
    assert _http(node, "GET", "/api/v1/throttles")[1]["runtime"] == {"example.org": 5.0}
    res = _mtactl("--url", url, "throttle", "clear", "--token", TOKEN, "example.org")
    assert res.returncode == 0, res.stderr
    assert _http(node, "GET", "/api/v1/throttles")[1]["runtime"] == {}


def _one_line_failure(res: subprocess.CompletedProcess[bytes]) -> None:
    assert res.returncode in (1, 2), res
    err = res.stderr.decode(errors="replace").strip()
    assert err.startswith("mtactl: ") and "\n" not in err, err


def test_mtactl_says_one_line_instead_of_a_traceback(node: NodeProcess,
                                                      tmp_path: Path) -> None:
    _one_line_failure(_mtactl("--url", "http://[::1", "--token", "x", "status"))
    _one_line_failure(_mtactl("passwd", "alice", stdin=b"\xff\xfe\n"))
    _one_line_failure(_mtactl("passwd", "alice", stdin=b"\xff\xfe\n",
                              env={"PYTHONIOENCODING": "utf-8:strict"}))
    _one_line_failure(_mtactl("passwd", "bob", env={"MTA_PASSWORD": "\udcff"}))
    with open("/dev/full", "wb") as full:
        _one_line_failure(_mtactl("--url", f"http://127.0.0.1:{node.admin_port}", "--token",
                                  TOKEN, "status", stdout=full))


# --- 9. [delivery.sites] keys -------------------------------------------------------------


def _config(tmp_path: Path, sites: dict[str, Any], port: int = 32526) -> Any:
    return config_from_dict(node_config(tmp_path / "spool", delivery={
        "smarthost": f"127.0.0.1:{port}", "sites": sites}), "<test>")


def test_a_site_key_with_a_port_matches_the_smarthost(tmp_path: Path) -> None:
    route = Route("smarthost:127.0.0.1:32526", (("127.0.0.1", 32526, "127.0.0.1"),))
    cfg = _config(tmp_path, {"127.0.0.1:32526": {"max_connections": 3},
                             "127.0.0.1": {"max_connections": 5}})
    assert site_limits(cfg.delivery, route, "h").max_connections == 3
    # Another port is another site: the bare host applies.
    other = Route("smarthost:127.0.0.1:2525", (("127.0.0.1", 2525, "127.0.0.1"),))
    assert site_limits(cfg.delivery, other, "h").max_connections == 5
    v6 = _config(tmp_path, {"[::1]:2525": {"max_connections": 7}})
    route6 = Route("smarthost:::1:2525", (("::1", 2525, "::1"),))
    assert site_limits(v6.delivery, route6, "h").max_connections == 7


@pytest.mark.parametrize(("sites", "named"), [
    ({"": {}}, "''"),
    ({"**": {}}, "'**'"),
    ({"*.": {}}, "'*.'"),
    ({"*.x*.example": {}}, "'*.x*.example'"),
    ({"mx\u202e.example": {}}, "mx\\u202e.example"),
    ({"mx\x00.example": {}}, "mx\\x00.example"),
    ({"relay.example:99999": {}}, "relay.example:99999"),
    ({"relay.example:0": {}}, "relay.example:0"),
    ({"*.Google.COM": {}, "*.google.com": {}}, "'*.Google.COM' and '*.google.com'"),
])
def test_bad_site_keys_are_refused_at_load(tmp_path: Path, sites: dict[str, Any],
                                           named: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, sites)
    assert named in str(err.value), str(err.value)
