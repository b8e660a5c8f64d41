"""The line of every accepted message, ``smtp.received`` / ``http.received``
(mta/ingress/submit.py through mta/logs.py ``HotEvent``): when the node writes JSON lines it
is rendered from a template, and it must be the line structlog makes of the same call,
byte for byte (keys, order, quoting, the tenant and campaign, node id, level, timestamp);
below the level it is not written; on the console and under capture_logs structlog
renders it; on the loop it waits for the end of the turn like any info line; and a real
submission at both doors logs it with the message's own values."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import aiosmtplib
import pytest
import structlog
from structlog.testing import capture_logs

from mta.envelope import Envelope
from mta.ingress.submit import _received
from mta.logs import structlog_settings
from tests.support import message, port, stored

_MID = "01KBC4Z5R8000G2X6Y5N3P7QAB"
_NOW = 1764590000.123456


@contextlib.contextmanager
def _logging(fmt: str, level: str = "info", node_id: str = "n1") -> Iterator[io.StringIO]:
    """The daemon's structlog configuration (configure_logging's) writing to a buffer, with
    no logger cached (a cached one would keep writing here after the test); then the
    configuration before it again."""
    out = io.StringIO()
    before = structlog.get_config()
    structlog.configure(**{**structlog_settings(fmt, level, node_id, out),
                           "cache_logger_on_first_use": False})
    try:
        yield out
    finally:
        structlog.configure(**before)


def _by_structlog(via: str, env: Envelope, size: int, tls: bool) -> None:
    """The call store_submission made before the template: the reference."""
    structlog.get_logger("mta.ingress").info(
        f"{via}.received", message_id=_MID, sender=env.sender, recipients=len(env.recipients),
        size=size, client_ip=env.client_ip, auth_user=env.auth_user or None, tls=tls,
        **env.labels())


def _taken(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


_ENVELOPES = [
    Envelope("app@sender.test", ["r@dest.test"], client_ip="127.0.0.1"),
    Envelope("", ["a@dest.test", "b@dest.test", "c@dest.test"], client_ip="",
             auth_user="user\"1\\"),
    Envelope("jörg@bücher.example", ["用户@例子.广告"], smtputf8=True, client_ip="2001:db8::7",
             auth_user="jörg"),
    Envelope("ctl\x01\t\u2028😀@x.test", ["r@dest.test"], client_ip="192.0.2.1"),
    Envelope("a@b.test", ["r@dest.test"], client_ip="127.0.0.1", tenant="acme"),
    Envelope("a@b.test", ["r@dest.test"], client_ip="127.0.0.1", campaign="spring-sale"),
    Envelope("a@b.test", ["r@dest.test"], client_ip="127.0.0.1", auth_user="acme-app",
             tenant="acme", campaign="spring.2026_a-b"),
]


@pytest.mark.parametrize("env", _ENVELOPES)
@pytest.mark.parametrize(("via", "tls", "size"), [("smtp", False, 5321), ("http", True, 0),
                                                  ("smtp", True, 2**40)])
@pytest.mark.parametrize("node_id", ["n1", "", "nöde\"2"])
def test_the_json_line_is_the_one_structlog_makes(
        monkeypatch: pytest.MonkeyPatch, env: Envelope, via: str, tls: bool, size: int,
        node_id: str) -> None:
    monkeypatch.setattr("time.time", lambda: _NOW)
    with _logging("json", node_id=node_id) as out:
        hot = _received(via)
        hot(_MID, env, size, tls)
        assert hot._writer is not None  # the template wrote it, not structlog
        ours = _taken(out)
        _by_structlog(via, env, size, tls)
        assert ours == _taken(out)
    line = json.loads(ours)
    assert (line["event"], line["level"], line["timestamp"]) == (
        f"{via}.received", "info", "2025-12-01T11:53:20.123456Z")
    assert {k: line[k] for k in ("tenant", "campaign") if k in line} == env.labels()
    assert ("node_id" in line) == bool(node_id)


@pytest.mark.parametrize(("level", "written"), [("debug", True), ("info", True),
                                                ("warning", False), ("error", False)])
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_level_holds(fmt: str, level: str, written: bool) -> None:
    with _logging(fmt, level) as out:
        _received("smtp")(_MID, _ENVELOPES[0], 100, False)
        assert bool(out.getvalue()) == written, out.getvalue()
        _by_structlog("smtp", _ENVELOPES[0], 100, False)
        assert bool(out.getvalue()) == written, out.getvalue()


def test_the_console_line_is_the_one_structlog_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.time", lambda: _NOW)
    env = _ENVELOPES[-1]
    with _logging("console") as out:
        _received("smtp")(_MID, env, 5321, True)
        ours = _taken(out)
        _by_structlog("smtp", env, 5321, True)
        assert ours == _taken(out)
    assert "smtp.received" in ours and "tenant=acme" in ours and "campaign=spring" in ours


@pytest.mark.parametrize("configured", [False, True])
def test_capture_logs_sees_the_event(configured: bool) -> None:
    env = _ENVELOPES[-1]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_logging("json")) if configured else None
        with capture_logs() as logs:
            _received("http")(_MID, env, 77, False)
    assert logs == [{"message_id": _MID, "sender": "a@b.test", "recipients": 1, "size": 77,
                     "client_ip": "127.0.0.1", "auth_user": "acme-app", "tls": False,
                     "tenant": "acme", "campaign": "spring.2026_a-b",
                     "event": "http.received", "log_level": "info"}]
    assert out is None or out.getvalue() == ""


async def test_on_the_loop_it_waits_for_the_end_of_the_turn_as_info_lines_do() -> None:
    with _logging("json") as out:
        _received("smtp")(_MID, _ENVELOPES[0], 100, False)
        _by_structlog("smtp", _ENVELOPES[0], 100, False)
        assert out.getvalue() == ""  # gathered by LineWriter: one write for the turn
        await asyncio.sleep(0)
        assert [json.loads(x)["event"] for x in out.getvalue().splitlines()] == [
            "smtp.received", "smtp.received"]


async def _lines(out: io.StringIO, event: str) -> list[dict[str, Any]]:
    await asyncio.sleep(0)  # info lines go out at the end of the loop's turn
    return [line for line in map(json.loads, out.getvalue().splitlines())
            if line["event"] == event]


async def test_both_doors_log_the_messages_own_values(start_node: Any) -> None:
    with _logging("json", node_id="node-x") as out:
        node = await start_node()
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port(node))
        await smtp.connect()
        labelled = (b"X-MTA-Tenant: acme\r\nX-MTA-Campaign: spring-sale\r\n"
                    + message(1, 1000))
        try:
            await smtp.sendmail("app@sender.test", ["r1@dest.test", "r2@dest.test"], labelled)
        finally:
            smtp.close()
        assert node.admin is not None
        body = {"from": "web@sender.test", "to": ["r@dest.test"],
                "content": message(2, 500).decode()}
        async with aiohttp.ClientSession() as http, http.post(
                f"http://127.0.0.1:{node.admin.port}/api/v1/messages", json=body,
                headers={"Authorization": "Bearer t0ken"}) as resp:
            assert resp.status == 202, await resp.text()
        sizes = {mid: len(m.body) for mid, m in (await stored(node)).items()}
        [by_smtp] = await _lines(out, "smtp.received")
        [by_http] = await _lines(out, "http.received")
    assert list(by_smtp) == ["message_id", "sender", "recipients", "size", "client_ip",
                             "auth_user", "tls", "tenant", "campaign", "event", "node_id",
                             "level", "timestamp"]
    assert {k: v for k, v in by_smtp.items() if k not in ("message_id", "timestamp")} == {
        "sender": "app@sender.test", "recipients": 2, "size": sizes[by_smtp["message_id"]],
        "client_ip": "127.0.0.1", "auth_user": None, "tls": False, "tenant": "acme",
        "campaign": "spring-sale", "event": "smtp.received", "node_id": "node-x",
        "level": "info"}
    assert {k: v for k, v in by_http.items() if k not in ("message_id", "timestamp")} == {
        "sender": "web@sender.test", "recipients": 1, "size": sizes[by_http["message_id"]],
        "client_ip": by_http["client_ip"], "auth_user": "admin-api", "tls": False,
        "event": "http.received", "node_id": "node-x", "level": "info"}
