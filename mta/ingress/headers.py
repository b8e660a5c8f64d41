"""Trace and submission headers added to accepted messages (RFC 5321 4.4, RFC 6409 8)."""

from __future__ import annotations

import email.utils
import functools
import re
import time

from mta.text import escape_controls

__all__ = ["prepare_content", "received_header", "take_fields"]

_NAME_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:")
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


def _split_headers(content: bytes) -> tuple[int, set[bytes]]:
    """Where the header section ends (offset after its last CRLF) and the names it holds.

    The section ends at the first line that is neither a header field nor a folded
    continuation, so a message without headers gets new ones in front of its text.
    """
    names: set[bytes] = set()
    pos = 0
    size = len(content)
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


@functools.lru_cache(maxsize=16)
def _fields_re(names: tuple[str, ...]) -> re.Pattern[bytes]:
    alternatives = b"|".join(re.escape(n.encode()) for n in names)
    return re.compile(rb"(?im)^(?:" + alternatives + rb")[ \t]*:")


def take_fields(content: bytes, names: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """``content`` without the header fields ``names`` (every occurrence, continuation lines
    too; names compared ignoring case), and the first value found of each, unfolded and
    stripped, keyed by the lower-case name. Mail without them is returned as it is."""
    names = tuple(n for n in names if n)
    blank = content.find(b"\r\n\r\n")
    if not names or not _fields_re(names).search(content, 0, blank if blank >= 0 else
                                                  len(content)):
        return content, {}  # the common case: one search of the header section
    wanted = {n.lower().encode() for n in names}
    end, _ = _split_headers(content)
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
    end, present = _split_headers(content)
    extra = []
    if b"message-id" not in present:
        extra.append(f"Message-ID: <{message_id}@{hostname}>\r\n".encode())
    if b"date" not in present:
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
