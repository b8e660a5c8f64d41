"""Trace and submission headers added to accepted messages (RFC 5321 4.4, RFC 6409 8)."""

from __future__ import annotations

import email.utils
import functools
import re
import time

from mta.text import escape_controls

__all__ = ["prepare_content", "received_header", "take_fields"]

# A field name and its colon (RFC 5322 2.2; blanks before the colon tolerated, RFC 5322 4.5).
_FIELD = rb"([!-9;-~]+)[ \t]*:"
_NAME_RE = re.compile(_FIELD)
# An escape cut in two by the length limit: dropped rather than left half-written.
_PARTIAL_ESCAPE_RE = re.compile(r"\\(?:x(?:\{[0-9A-F]{0,2})?)?$")
_date: tuple[int, str] = (0, "")


def _now() -> str:
    """RFC 5322 date of this second (formatting it showed in the ingress profile)."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, email.utils.formatdate(second, localtime=True))
    return _date[1]


# The rest of a header line: up to its CRLF (a bare CR or LF belongs to the line).
_REST = rb"[^\r]*(?:\r(?!\n)[^\r]*)*(?:\r\n|\Z)"
# A header section: fields (a name, a colon, the line; then folded continuation lines that
# start with white space), from the start of the content. Matched in one call: walking it
# line by line in Python was 2% of ingress.
_SECTION_RE = re.compile(rb"(?:" + _FIELD + _REST + rb"(?:[ \t]" + _REST + rb")*)*")
_AFTER_NAME_RE = re.compile(rb"[ \t]*:")


def _header_end(content: bytes) -> int:
    """Where the header section ends (offset after its last CRLF).

    The section ends at the first line that is neither a header field nor a folded
    continuation, so a message without headers gets new ones in front of its text.
    """
    blank = content.find(b"\r\n\r\n")
    scope = len(content) if blank < 0 else blank + 2
    if content.count(b"\r", 0, scope) != content.count(b"\r\n", 0, scope):
        # Bare CRs: the regex steps through each one (a hostile section of them took
        # seconds for 25 MB); the walk's cost grows with the lines instead.
        return _walk_end(content)
    m = _SECTION_RE.match(content)
    return m.end() if m is not None else 0


def _walk_end(content: bytes) -> int:
    """:func:`_header_end` line by line."""
    pos, size, fields = 0, len(content), 0
    while pos < size:
        eol = content.find(b"\r\n", pos)
        line_end = size if eol < 0 else eol + 2
        if not (fields and content[pos:pos + 1] in (b" ", b"\t")):
            if _NAME_RE.match(content, pos, line_end) is None:
                break
            fields += 1
        pos = line_end
    return pos


def _has_field(section: bytes, name: bytes) -> bool:
    """Does ``section`` (a header section, lower-cased) hold a field called ``name``
    (lower case)? Fields start the section or follow a CRLF."""
    start = 0
    while True:
        if section.startswith(name, start) and _AFTER_NAME_RE.match(section, start + len(name)):
            return True
        at = section.find(b"\r\n" + name, start)
        if at < 0:
            return False
        start = at + 2


@functools.lru_cache(maxsize=16)
def _wanted(names: tuple[str, ...]) -> frozenset[bytes]:
    """The field names asked for, lower case, as bytes (empty ones left out)."""
    return frozenset(n.lower().encode() for n in names if n)


def take_fields(content: bytes, names: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """``content`` without the header fields ``names`` (every occurrence, continuation lines
    too; names compared ignoring case), and the first value found of each, unfolded and
    stripped, keyed by the lower-case name. Mail without them is returned as it is."""
    wanted = _wanted(names)
    blank = content.find(b"\r\n\r\n")
    head = (content[:blank] if blank >= 0 else content).lower()
    for name in wanted:
        if _has_field(head, name):
            break
    else:
        # The common case: none of them. (_strip_fields takes fields only at the start of
        # a line, a CRLF before it, as _has_field finds them.)
        return content, {}
    return _strip_fields(content, wanted, _header_end(content))


def _strip_fields(content: bytes, wanted: frozenset[bytes], end: int
                  ) -> tuple[bytes, dict[str, str]]:
    """:func:`take_fields` of the header section that ends at ``end``, line by line."""
    kept: list[bytes] = []
    found: dict[str, bytearray] = {}
    taking: bytearray | None = None  # the value being read (None: dropping a repeat)
    dropping = False
    pos = 0
    while pos < end:
        eol = content.find(b"\r\n", pos)
        line_end = end if eol < 0 or eol + 2 > end else eol + 2
        line = content[pos:line_end]
        pos = line_end
        if line[:1] in (b" ", b"\t"):
            if dropping:
                if taking is not None:
                    taking += b" " + line.strip()
                continue
            kept.append(line)
            continue
        m = _NAME_RE.match(line)
        name = m.group(1).lower() if m is not None else b""
        dropping = name in wanted
        taking = None
        if dropping and name.decode() not in found:
            taking = found[name.decode()] = bytearray(line[m.end():].strip())  # type: ignore[union-attr]
        elif not dropping:
            kept.append(line)
    values = {k: bytes(v).decode("utf-8", "replace").strip() for k, v in found.items()}
    return b"".join(kept) + content[end:], values


def received_header(*, helo: str, ip: str, hostname: str, protocol: str, message_id: str,
                    recipient: str | None) -> bytes:
    """A ``Received:`` trace line; names the recipient only when there is exactly one.

    The HELO name is whatever the client typed and the recipient passed a door that may have
    been bypassed (the spool API): both are escaped, so neither can end this field early.
    """
    for_clause = f"\r\n\tfor <{escape_controls(recipient)}>" if recipient else ""
    date = _now()
    helo = _PARTIAL_ESCAPE_RE.sub("", escape_controls(helo)[:255])
    return (f"Received: from {helo} ([{ip}])\r\n\tby {hostname} (mta) with {protocol}"
            f" id {message_id}{for_clause};\r\n\t{date}\r\n").encode("utf-8", "surrogateescape")


def prepare_content(content: bytes, received: bytes, *, message_id: str, hostname: str) -> bytes:
    """Prepend ``received``; add ``Message-ID:`` and ``Date:`` when the client left them out."""
    end = _header_end(content)
    section = content[:end].lower()
    extra = []
    if not _has_field(section, b"message-id"):
        extra.append(f"Message-ID: <{message_id}@{hostname}>\r\n".encode())
    if not _has_field(section, b"date"):
        extra.append(f"Date: {_now()}\r\n".encode())
    if not extra:
        return received + content
    head = content[:end]
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"  # headers-only message without a final line break
    rest = content[end:]
    if rest and not rest.startswith(b"\r\n"):
        rest = b"\r\n" + rest  # the text had no header section: separate it from ours
    return b"".join((received, head, *extra, rest))
