"""Mutants planted in the log line of every accepted message (mta/logs.py ``HotEvent``,
``_HotWriter``, ``structlog_settings``, ``_Stamper``; mta/ingress/submit.py
``_received_fields``) that the suite let through: each test here fails with its mutant and
passes without it."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from mta.envelope import Envelope
from mta.ingress.submit import _received, _received_fields, _received_head
from mta.logs import HotEvent, LineWriter, _JsonLine, structlog_settings

_MID = "01KBC4Z5R8000G2X6Y5N3P7QAB"
_ENV = Envelope("app@sender.test", ["r@dest.test"], client_ip="127.0.0.1")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@contextlib.contextmanager
def _configured(**settings: Any) -> Iterator[None]:
    """structlog configured with ``settings`` (no logger cached), then as before again."""
    before = structlog.get_config()
    structlog.configure(**{**settings, "cache_logger_on_first_use": False})
    try:
        yield
    finally:
        structlog.configure(**before)


def _json(out: io.StringIO, node_id: str = "n1") -> dict[str, Any]:
    return structlog_settings("json", "info", node_id, out)


def _by_structlog(env: Envelope = _ENV, size: int = 100, tls: bool = False) -> None:
    structlog.get_logger("mta.ingress").info("smtp.received",
                                              **_received_fields(_MID, env, size, tls))


def _taken(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


def test_each_line_has_its_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the timestamp taken once, when the template is made."""
    clock = [1764590000.25]
    monkeypatch.setattr("time.time", lambda: clock[0])
    out = io.StringIO()
    with _configured(**_json(out)):
        hot = _received("smtp")
        stamps = []
        for step in (0.0, 1.5, 60.0):
            clock[0] += step
            hot(_MID, _ENV, 100, False)
            ours = _taken(out)
            _by_structlog()
            assert ours == _taken(out)
            stamps.append(json.loads(ours)["timestamp"])
    assert stamps == ["2025-12-01T11:53:20.250000Z", "2025-12-01T11:53:21.750000Z",
                      "2025-12-01T11:54:21.750000Z"]


@pytest.mark.parametrize("fraction", [0.0, 0.00004, 0.0123, 0.5])
def test_the_timestamp_has_six_digits_of_microseconds(monkeypatch: pytest.MonkeyPatch,
                                                      fraction: float) -> None:
    """Planted: the microseconds without their leading zeros (".40Z" for 40 us)."""
    monkeypatch.setattr("time.time", lambda: 1764590000 + fraction)
    out = io.StringIO()
    with _configured(**_json(out)):
        _received("smtp")(_MID, _ENV, 100, False)
        _by_structlog()
    stamps = [json.loads(line)["timestamp"] for line in out.getvalue().splitlines()]
    assert len(stamps) == 2 and all(_TIMESTAMP.fullmatch(s) for s in stamps), stamps
    assert stamps[0] == stamps[1]


def test_a_new_output_for_the_same_chain_gets_the_lines(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """structlog told to write elsewhere (its logger factory changed, its processors
    kept): the line goes to the new output. Planted: the template's writer kept while only
    its chain is the same."""
    monkeypatch.setattr("time.time", lambda: 1764590000.5)
    first, second = io.StringIO(), io.StringIO()
    with _configured(**_json(first)):
        hot = _received("smtp")
        hot(_MID, _ENV, 100, False)
        assert first.getvalue() and hot._writer is not None
        writer = LineWriter(second)
        structlog.configure(logger_factory=lambda *_: writer)
        hot(_MID, _ENV, 100, False)
        _by_structlog()
    lines = second.getvalue().splitlines()
    assert len(first.getvalue().splitlines()) == 1 and len(lines) == 2
    assert lines[0] == lines[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("out", "is_json"), [(io.StringIO(), True), (_Terminal(), False)])
def test_auto_is_json_unless_the_output_is_a_terminal(out: io.StringIO, is_json: bool) -> None:
    """``auto`` asks the output it is given, not the process's stdout. Planted:
    ``sys.stdout.isatty()``."""
    with _configured(**structlog_settings("auto", "info", "n1", out)):
        _received("smtp")(_MID, _ENV, 100, False)
    line = out.getvalue()
    assert "smtp.received" in line
    assert line.startswith("{") is is_json, line


def test_the_structlog_path_says_null_for_no_auth_user() -> None:
    """Without AUTH, auth_user is None (null) on every output, not "". Planted:
    ``_received_fields`` without ``or None`` (only the template said null)."""
    with capture_logs() as logs:
        _received("smtp")(_MID, _ENV, 100, False)
    assert logs[0]["auth_user"] is None
    assert '"auth_user": null' in _received_head(_MID, _ENV, 100, False)


def test_a_logger_with_bound_values_goes_through_structlog() -> None:
    """A HotEvent on a logger carrying bound values: they are on the line (the template
    does not know them). Planted: the template used whatever the logger's context."""
    out = io.StringIO()
    with _configured(**_json(out)):
        hot = HotEvent(structlog.get_logger("t", request="r1"), "t.received",
                       _received_fields, _received_head)
        hot(_MID, _ENV, 100, False)
    line = json.loads(out.getvalue())
    assert line["request"] == "r1" and line["event"] == "t.received"


def test_a_chain_with_more_than_the_json_line_goes_through_structlog() -> None:
    """A processor after the JSON line (a chain the template does not know) still sees the
    line. Planted: any chain that begins with the JSON line taken for the template's."""
    out = io.StringIO()
    settings = _json(out)

    def tagged(_logger: object, _name: str, line: Any) -> Any:
        return line + " #tagged"

    settings["processors"] = [_JsonLine("n1"), tagged]
    with _configured(**settings):
        _received("smtp")(_MID, _ENV, 100, False)
    assert out.getvalue().rstrip("\n").endswith("} #tagged"), out.getvalue()
