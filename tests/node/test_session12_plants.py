"""The JSON encoder built once (mta/jsonenc.py) after an error: the containers it was inside
are not remembered as seen."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mta.jsonenc import encoder
from mta.logs import _JsonLine


def test_a_value_that_was_circular_encodes_once_its_cycle_is_gone() -> None:
    dumps = encoder(ensure_ascii=False, separators=(",", ":"))
    value: dict[str, Any] = {"items": [1]}
    value["items"].append(value)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(value)
    value["items"].pop()
    assert dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_a_log_line_after_a_circular_one_is_written() -> None:
    line = _JsonLine("n1")
    context: dict[str, Any] = {"seen": []}
    context["seen"].append(context)
    with pytest.raises(ValueError, match="Circular reference"):
        line(None, "info", {"event": "first", "context": context})
    context["seen"].clear()
    assert json.loads(line(None, "info", {"event": "second", "context": context}))[
        "context"] == {"seen": []}
