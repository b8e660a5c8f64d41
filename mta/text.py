"""Text that crosses a boundary: the characters that may end a line or a field downstream.

One rule for every place outside text lands in: the doors refuse it in addresses, headers
and DSNs escape it, and remote replies are kept as one line without it.
"""

from __future__ import annotations

import re

__all__ = ["all_crlf", "escape_controls", "has_controls", "one_line"]

# C0, DEL and C1 controls, the Unicode line and paragraph separators (str.splitlines() and
# some mail parsers break lines there) and lone surrogates (JSON can carry them; no wire
# encoding can): none of them is part of any address, and each could end a line or a field
# somewhere downstream (a header, a DSN, an SMTP command, a log line, a terminal).
CONTROLS_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def has_controls(text: str) -> bool:
    """Whether ``text`` holds a character no address (nor SMTP command argument) may."""
    return CONTROLS_RE.search(text) is not None


def escape_controls(text: str) -> str:
    """``text`` with every such character written as ``\\x{HH}`` (the RFC 6533 form), for
    the places envelope text lands in: headers, replies, DSNs."""
    return CONTROLS_RE.sub(lambda m: f"\\x{{{ord(m.group()):02X}}}", text)


def one_line(reply: str) -> str:
    """A (remote) reply as one line of text: the lines of a multi-line reply joined with
    spaces, control characters dropped, runs of white space made one, so no line of it can
    become a line or a field of its own wherever it is kept."""
    text = " ".join(CONTROLS_RE.sub("", line) for line in reply.splitlines())
    return " ".join(text.split())


def all_crlf(data: bytes) -> bool:
    """Does every CR and every LF in ``data`` belong to a CRLF pair? (Counted, not copied:
    most messages are all CRLF.)"""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") == crlf and data.count(b"\r") == crlf
