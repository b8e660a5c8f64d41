"""The DATA reader's line-length scan (mta/ingress/data.py ``_scan_lines``) jumps from line
end to line end within the limit instead of splitting a piece into lines: it must answer
exactly as the split did, on pieces built to hit every branch (CRLF across pieces, bare CR
and LF, lines at the limit and one over, lines carried in from the previous piece)."""

from __future__ import annotations

import random

from mta.ingress.data import _scan_lines, _unstuff


def _by_split(data: bytes, prev: bytes, carry: int, max_line: int) -> tuple[int, bool]:
    """The former implementation: every line of the piece measured."""
    start, long = 0, False
    if prev[-1:] == b"\r" and data[:1] == b"\n":
        long = carry - 1 > max_line
        carry, start = 0, 1
    last = data.rfind(b"\r\n", start)
    if last < 0:
        return carry + len(data) - start, long
    lines = data.split(b"\r\n")
    lines.pop()
    long = (long or len(lines[0]) + carry - start > max_line
            or max(map(len, lines[1:]), default=0) > max_line)
    return len(data) - last - 2, long


def test_the_scan_equals_measuring_every_line() -> None:
    rng = random.Random(20261201)
    pieces = [b"a", b"\r", b"\n", b"\r\n", b"x" * 10, b"y" * 7]
    for _ in range(60_000):
        max_line = rng.choice([0, 1, 2, 3, 5, 8, 13, 20, 998])
        if max_line == 998 and rng.random() < 0.5:
            data = b"".join(b"z" * rng.randrange(990, 1006) + b"\r\n"
                            for _ in range(rng.randrange(1, 5)))
        else:
            data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        prev = rng.choice([b"\r\n", b"a\r", b"ab", b"\n\r", b"\r\r"])
        carry = rng.randrange(0, 1200 if max_line == 998 else 30)
        want = _by_split(data, prev, carry, max_line)
        assert _scan_lines(data, prev, carry, max_line) == want, (data, prev, carry, max_line)


def test_a_line_one_over_the_limit_is_found_anywhere_in_a_long_piece() -> None:
    lines = [b"l" * 998] * 40
    for at in (0, 17, 39):
        body = b"\r\n".join([*lines[:at], b"l" * 999, *lines[at + 1:]]) + b"\r\n"
        assert _scan_lines(body, b"\r\n", 0, 998) == (0, True)
    assert _scan_lines(b"\r\n".join(lines) + b"\r\n", b"\r\n", 0, 998) == (0, False)


def test_unstuffing_equals_the_plain_replace() -> None:
    """``_unstuff`` searches before it replaces: the same bytes as replacing every time, for
    pieces whose stuffed dots sit at the start, straddle the previous piece, or are absent."""
    rng = random.Random(20261202)
    parts = [b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"x", b".."]
    for _ in range(60_000):
        data = b"".join(rng.choice(parts) for _ in range(rng.randrange(0, 12)))
        prev = rng.choice([b"\r\n", b"a\r", b"ab", b"\n\r", b"\r\r"])
        want = data
        if want[:1] == b"." and prev == b"\r\n":
            want = want[1:]
        elif want[:2] == b"\n." and prev[-1:] == b"\r":
            want = b"\n" + want[2:]
        assert _unstuff(data, prev) == want.replace(b"\r\n.", b"\r\n"), (data, prev)
