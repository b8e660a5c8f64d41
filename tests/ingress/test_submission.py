"""One submission path (issue 15): SMTP DATA and HTTP injection get the same checks and the
same accounting — received counters, the submit latency histogram, the SLO's submissions,
spool write errors."""

from __future__ import annotations

import errno
import json
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from mta.node import Node
from mta.spool import segment
from tests.support import message, port, stored

_AUTH = {"Authorization": "Bearer t0ken"}


def _url(node: Node, path: str) -> str:
    assert node.admin is not None
    return f"http://127.0.0.1:{node.admin.port}{path}"


def _metric(node: Node, name: str, **labels: str) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


async def _smtp(node: Node, n: int) -> tuple[int, str]:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node))
    await smtp.connect()
    try:
        await smtp.sendmail("app@sender.test", ["r@dest.test"], message(n, 1000))
        return 250, ""
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        smtp.close()


async def _http(node: Node, n: int) -> tuple[int, Any]:
    body = {"from": "app@sender.test", "to": ["r@dest.test"],
            "content": message(n, 1000).decode()}
    async with aiohttp.ClientSession() as http, http.post(
            _url(node, "/api/v1/messages"), data=json.dumps(body).encode(),
            headers={**_AUTH, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return resp.status, await resp.json()


async def _slo(node: Node) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            _url(node, "/api/v1/slo?window=1h"), headers=_AUTH,
            timeout=aiohttp.ClientTimeout(total=30)) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def test_smtp_and_http_submissions_are_counted_alike(start_node: Any) -> None:
    node = await start_node()
    assert (await _smtp(node, 1))[0] == 250
    status, body = await _http(node, 2)
    assert status == 202, body
    sizes = [len(m.body) for m in (await stored(node)).values()]
    assert len(sizes) == 2

    assert _metric(node, "mta_received_messages_total") == 2
    assert _metric(node, "mta_received_bytes_total") == sum(sizes)
    assert _metric(node, "mta_submit_seconds_count") == 2
    node.slo.sample()  # what the tracker's own loop does every sample_interval
    report = await _slo(node)
    assert report["submitted"] == 2, report
    assert report["checks"]["submit_p99_seconds"]["value"] is not None, report


async def test_a_full_disk_is_counted_alike_at_both_doors(
        start_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    node = await start_node()

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.os, "write", full)
    code, text = await _smtp(node, 1)
    assert code == 452 and text.startswith("4.3.1"), (code, text)
    status, body = await _http(node, 2)
    assert status == 507, body
    assert set(body) == {"error", "hint"}, body
    monkeypatch.undo()

    assert _metric(node, "mta_spool_write_errors_total", errno=str(errno.ENOSPC)) == 2
    assert _metric(node, "mta_received_messages_total") == 0
    assert _metric(node, "mta_submit_seconds_count") == 0
