"""The JSON log line (mta/logs.py ``_JsonLine``: structlog's JSON chain in one processor)
is the line structlog's own processors made: same keys, same order, same text, for plain
events, warnings by their alias, exceptions, values JSON cannot encode, and an event that
names its own node."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from mta.logs import _JsonLine, _NodeId, _Stamper


class _Odd:
    def __repr__(self) -> str:
        return "<odd>"


class _Rich:
    def __structlog__(self) -> dict[str, int]:
        return {"rich": 1}


def _by_structlog(node_id: str, name: str, event: dict[str, Any]) -> str:
    out: Any = event
    for step in (_NodeId(node_id), structlog.processors.add_log_level, _Stamper(),
                 structlog.processors.format_exc_info, structlog.processors.JSONRenderer()):
        out = step(None, name, out)
    return str(out)


def _boom() -> tuple[Any, ...]:
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        return (type(exc), exc, exc.__traceback__)


@pytest.mark.parametrize(("name", "event"), [
    ("info", {"event": "smtp.received", "message_id": "M1", "size": 5, "tls": False,
              "auth_user": None, "ratio": 0.25}),
    ("warn", {"event": "w", "sender": "é\u2028<x>"}),
    ("warning", {"event": "w2", "nested": {"a": [1, "b", None]}}),
    ("exception", {"event": "failed", "exc_info": _boom()}),
    ("error", {"event": "failed2", "exc_info": False}),
    ("info", {"event": "objects", "odd": _Odd(), "rich": _Rich()}),
    ("info", {"event": "own node", "node_id": "other"}),
])
@pytest.mark.parametrize("node_id", ["n1", ""])
def test_the_line_equals_structlogs_chain(monkeypatch: pytest.MonkeyPatch, name: str,
                                          event: dict[str, Any], node_id: str) -> None:
    monkeypatch.setattr("time.time", lambda: 1764590000.123456)
    ours = _JsonLine(node_id)(None, name, dict(event))
    assert ours == _by_structlog(node_id, name, dict(event))
    line = json.loads(ours)
    assert line["level"] in ("info", "warning", "error")
    assert ("node_id" in line) == bool(node_id or "node_id" in event)
