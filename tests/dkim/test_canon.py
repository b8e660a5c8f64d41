"""The relaxed body canonicalisation's fast path (no tab, double space or space before a line
end: no regex pass) gives exactly what RFC 6376 3.4.4's rules, applied literally, give."""

from __future__ import annotations

import random
import re

from mta.dkim.canon import relaxed_body


def _reference(body: bytes) -> bytes:
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = re.sub(rb"[ \t]+", b" ", body)
    body = re.sub(rb"[ \t]+(?=\r\n)", b"", body)
    body = re.sub(rb"(?:\r\n)+\Z", b"\r\n", body)
    return b"" if body == b"\r\n" else body


def test_the_fast_path_matches_the_rules_on_random_bodies() -> None:
    rng = random.Random(17)
    pieces = [b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n", b".", b"\xc3\xa9", b"x" * 80]
    for _ in range(20_000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        assert relaxed_body(body) == _reference(body), body


def test_edge_bodies() -> None:
    for body in (b"", b"\r\n", b"\r\n\r\n", b"x", b"x \r\n\r\n\r\n", b" ", b"\t\r\n",
                 b"a\r\n\r\nb\r\n\r\n", b"line\r\n" * 1000 + b"\r\n" * 50):
        assert relaxed_body(body) == _reference(body), body
