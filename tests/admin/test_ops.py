"""Operator verbs end to end: mtactl against a real node process, and HTTP injection."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import NodeProcess, ctl, free_port, node_config, read_spool


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("ops")
    proc = NodeProcess(work, node_config(work / "spool")).start()
    yield proc
    proc.kill()


def post(node: NodeProcess, path: str, body: Any, token: str = "t0ken") -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}{path}",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_suspend_resume_and_throttles_in_both_output_modes(node: NodeProcess) -> None:
    res = ctl(node, "suspend", "example.org")
    assert res.returncode == 0 and "suspended domains: example.org" in res.stdout
    res = ctl(node, "--json", "resume", "example.org")
    assert res.returncode == 0 and json.loads(res.stdout) == {"suspended": []}
    assert ctl(node, "throttle", "set", "gmail.com", "100/s").returncode == 0
    res = ctl(node, "--json", "throttle", "show")
    assert json.loads(res.stdout)["runtime"] == {"gmail.com": 100.0}
    res = ctl(node, "throttle", "show")
    assert "gmail.com" in res.stdout and "100.000  runtime" in res.stdout
    assert ctl(node, "throttle", "clear", "gmail.com").returncode == 0
    assert json.loads(ctl(node, "--json", "throttle", "show").stdout)["runtime"] == {}


def test_bad_input_gets_a_clear_answer_and_exit_code(node: NodeProcess) -> None:
    res = ctl(node, "throttle", "set", "gmail.com", "fast")
    assert res.returncode == 1 and "expected a rate" in res.stderr and "Traceback" not in res.stderr
    res = ctl(node, "throttle", "set", "gmail.com")
    assert res.returncode == 2 and "needs KEY and SPEC" in res.stderr
    res = ctl(node, "status", token="wrong")
    assert res.returncode == 1 and "token rejected" in res.stderr
    gone = subprocess.run([sys.executable, "-m", "mta.cli.ctl", "--url",
                           f"http://127.0.0.1:{free_port()}", "status"],
                          capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "node not reachable" in gone.stderr
    res = subprocess.run([sys.executable, "-m", "mta.cli.ctl", "frobnicate"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2


def test_http_injection_is_durable_and_validated(node: NodeProcess, tmp_path: Path) -> None:
    status, body = post(node, "/api/v1/messages", {
        "from": "app@example.com", "to": ["a@example.org"],
        "content": "Subject: via http\n\nhello\n"})
    assert status == 202
    mid = body["id"]
    status, body = post(node, "/api/v1/messages", {"from": "x", "to": ["a@example.org"],
                                                   "content": "x"})
    assert status == 400 and "bad address" in body["error"]
    status, body = post(node, "/api/v1/messages", {"to": []})
    assert status == 400 and body["hint"]
    status, _ = post(node, "/api/v1/messages", {"from": "", "to": ["a@example.org"],
                                                "content": "x"}, token="nope")
    assert status == 401
    res = ctl(node, "--json", "flush")
    assert res.returncode == 1 and "delivery is disabled" in res.stderr  # test nodes: off
    node.signal(15)
    assert node.wait() == 0
    stored = read_spool(node.workdir / "spool", 4)
    # LF line ends became CRLF; Message-ID and Date were added after the client's headers.
    assert b"Subject: via http\r\nMessage-ID: <" in stored[mid].body
    assert stored[mid].body.endswith(b"\r\n\r\nhello\r\n")
    assert stored[mid].envelope.recipients == ["a@example.org"]
    node.start()  # the module fixture's node keeps serving later tests
