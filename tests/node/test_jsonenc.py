"""One JSON encoder built once (mta/jsonenc.py), for the log and accounting lines: the same
text as ``json.dumps`` with the same options, the same errors, and still right after one."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from mta.jsonenc import encoder

_STRINGS = ["", "a", "é", "\u2028", "\x00", "\ud800", "\"\\", "line\nbreak", "日本", "😀"]


def _value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.random()
    if depth > 3 or pick < 0.45:
        return rng.choice([
            rng.random() * 10 ** rng.randint(-5, 20), rng.randint(-10 ** 20, 10 ** 20),
            "".join(rng.choice(_STRINGS) for _ in range(rng.randint(0, 4))),
            None, True, False, math.nan, math.inf, -math.inf, 0.1, -0.0])
    if pick < 0.7:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(_STRINGS) + str(i): _value(rng, depth + 1)
            for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("options", [
    {},
    {"ensure_ascii": False, "separators": (",", ":")},
    {"default": repr},
])
def test_the_text_equals_json_dumps(options: dict[str, Any]) -> None:
    dumps = encoder(**options)
    rng = random.Random(20261201)
    for _ in range(5_000):
        value = _value(rng)
        assert dumps(value) == json.dumps(value, **options), value


def test_what_json_cannot_encode_goes_to_default_or_raises_as_json_does() -> None:
    odd = {"when": object()}
    assert encoder(default=lambda o: "odd")(odd) == '{"when": "odd"}'
    with pytest.raises(TypeError):
        encoder()(odd)


def test_a_circular_value_raises_and_the_encoder_still_works_after() -> None:
    dumps = encoder(ensure_ascii=False, separators=(",", ":"))
    loop: list[Any] = []
    loop.append({"again": loop})
    for _ in range(2):
        with pytest.raises(ValueError, match="Circular reference"):
            dumps({"x": loop})
    # The containers it was inside when it gave up are not mistaken for a cycle next time.
    shared = [1]
    assert dumps({"a": shared, "b": shared}) == '{"a":[1],"b":[1]}'
