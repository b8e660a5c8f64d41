"""The header section found by one regex match (mta/ingress/headers.py ``_header_end``,
``_has_field``) answers exactly as the line-by-line walk it replaced, on content built to hit
every branch: folded lines, bare CR and LF inside lines, a last line without CRLF, names
that only start like the ones asked for, text with no header section at all. And
``take_fields``, whose first look now uses them, returns what its line walk alone returns."""

from __future__ import annotations

import random
import re
from typing import Any

from mta.ingress.headers import _has_field, _header_end, _strip_fields, take_fields

_NAME_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:")


def _walk(content: bytes) -> tuple[int, set[bytes]]:
    """The former implementation: every line of the section, one at a time."""
    names: set[bytes] = set()
    pos, size = 0, len(content)
    while pos < size:
        eol = content.find(b"\r\n", pos)
        line_end = size if eol < 0 else eol + 2
        line = content[pos:line_end]
        if line[:1] in (b" ", b"\t") and names:
            pos = line_end
            continue
        m = _NAME_RE.match(line)
        if m is None:
            break
        names.add(m.group(1).lower())
        pos = line_end
    return pos, names


def _take_by_walk(content: bytes, names: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """take_fields without its first look: the line walk over the whole section (as the
    former walk found it) every time."""
    wanted = frozenset(n.lower().encode() for n in names if n)
    return _strip_fields(content, wanted, _walk(content)[0])


_PIECES = [b"Date", b"date", b"DATE-X", b"Message-ID", b"message-id2", b"X-Tenant", b"x-tenant",
           b"X-Campaign", b"Subject", b":", b" :", b"\t:", b" ", b"\t", b"\r\n", b"\r", b"\n",
           b"value", b"a:b", b"\x00", b"\xff", b"-", b"\r\n\r\n", b"body text"]
_ASKED = (b"date", b"message-id", b"x-tenant", b"x-campaign", b"subject")


def _content(rng: random.Random) -> bytes:
    return b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(0, 25)))


def test_the_section_and_its_fields_equal_the_walk() -> None:
    rng = random.Random(20261203)
    for _ in range(40_000):
        content = _content(rng)
        end, names = _walk(content)
        assert _header_end(content) == end, content
        section = content[:end].lower()
        for name in _ASKED:
            assert _has_field(section, name) == (name in names), (content, name)


def test_take_fields_equals_the_walk() -> None:
    rng = random.Random(20261204)
    for _ in range(40_000):
        content = _content(rng)
        names = rng.choice([("X-Tenant", "X-Campaign"), ("X-Tenant", ""), ("Date",)])
        assert take_fields(content, names) == _take_by_walk(content, names), (content, names)


def test_a_long_header_section_is_matched_whole() -> None:
    """Thousands of folded lines: one match, no recursion limit, the same end as the walk."""
    content = b"".join(b"X-Field-%d: v\r\n\tfolded\r\n" % i for i in range(5000)) + b"\r\nbody"
    assert _header_end(content) == _walk(content)[0] == len(content) - len(b"\r\nbody")


def test_a_section_with_bare_crs_is_walked_not_matched(monkeypatch: Any) -> None:
    """The regex steps through every bare CR (a hostile 25 MB section of them took seconds);
    such a section is walked line by line instead, with the same answer."""
    from mta.ingress import headers

    class _Refuse:
        def match(self, *_args: Any) -> None:
            raise AssertionError("the regex was used on a section with bare CRs")

    contents = [b"A: x\ry\r\nB: \r\r\n\tmore\r\n\r\nbody\r", b"A:\r" * 1000 + b"\r\n",
                b"A: 1\r\nB\r: 2\r\n"]
    monkeypatch.setattr(headers, "_SECTION_RE", _Refuse())
    for content in contents:
        assert _header_end(content) == _walk(content)[0], content
