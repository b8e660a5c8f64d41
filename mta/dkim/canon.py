"""The message as DKIM sees it: header fields split out, and the relaxed canonical forms of
headers and body (RFC 6376 3.4.2, 3.4.4)."""

from __future__ import annotations

import re

__all__ = ["HeaderField", "relaxed_body", "relaxed_header", "split_message"]

_WSP_RUN = re.compile(rb"[ \t]+")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_TRAILING_WSP = re.compile(rb"[ \t]+(?=\r\n)")


class HeaderField:
    """One header field as it appears (``raw``: name, colon, value, with its folding)."""

    __slots__ = ("name", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.name = raw.split(b":", 1)[0].strip().lower()

    def value(self) -> bytes:
        """The unfolded value, without leading or trailing whitespace."""
        value = self.raw.split(b":", 1)[1] if b":" in self.raw else b""
        return _FOLD.sub(b"", value).strip()


def split_message(message: bytes) -> tuple[list[HeaderField], bytes]:
    """The header fields (in order) and the body of a CRLF message."""
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        if message.startswith(b"\r\n"):  # no header at all
            return [], message[2:]
        head, body = message, b""
    fields: list[HeaderField] = []
    current: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        if current:
            fields.append(HeaderField(b"\r\n".join(current)))
        current = [line]
    if current and current != [b""]:
        fields.append(HeaderField(b"\r\n".join(current)))
    return fields, body


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """``name:value`` relaxed: name lower-cased, value unfolded, whitespace runs made one
    space, no whitespace around the colon or at the end (no CRLF added)."""
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.strip().lower() + b":" + value


def relaxed_body(body: bytes) -> bytes:
    """The body relaxed: whitespace runs made one space, none at line ends, no empty lines
    at the end, and a final CRLF if anything is left."""
    if not body:
        return b""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    # Most bodies have no tab, no double space and no space before a line end: then the
    # two whole-body regex passes would change nothing (they were a third of signing).
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        body = _TRAILING_WSP.sub(b"", _WSP_RUN.sub(b" ", body))
    end = len(body)
    while end >= 4 and body[end - 4:end] == b"\r\n\r\n":  # empty lines at the end
        end -= 2
    body = body[:end]
    return b"" if body == b"\r\n" else body
