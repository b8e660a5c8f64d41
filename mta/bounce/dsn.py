"""Delivery Status Notifications (RFC 3464 multipart/report) for bounces and expirations."""

from __future__ import annotations

import email.utils
import os
import re
from dataclasses import dataclass

from mta.text import escape_controls, one_line

__all__ = ["FailedRecipient", "build_dsn"]

_STATUS_RE = re.compile(r"(?:[245]\d\d[ -])?([245]\.\d{1,3}\.\d{1,3})\b")
_WIDTH = 78  # RFC 5322 2.1.1: lines SHOULD stay within 78 characters
_MAX_WORD = 900  # and MUST stay within 998: longer runs without a space are cut
_MAX_REPLY = 2000  # a remote's essay is cut here; the start says what went wrong


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the DSN reports on."""

    address: str
    reply: str  # the remote reply, or our synthesized one, e.g. "550 5.1.1 user unknown"
    remote: str = ""  # MX host that answered, if any


def _address(address: str) -> tuple[str, str]:
    """(address type, address) for Final-Recipient: RFC 6533's utf-8 type for SMTPUTF8
    addresses and for any that needed escaping (the rfc822 type has no escapes)."""
    text = escape_controls(address)
    return ("rfc822" if text == address and address.isascii() else "utf-8"), text


def _one_line(reply: str) -> str:
    """A remote reply as one line of text (RFC 3464 2.3.6 allows one Diagnostic-Code per
    recipient): the lines of a multi-line reply joined with spaces, control characters
    dropped, so no line of it can become a field (a forged Final-Recipient) of its own."""
    text = one_line(reply)
    return text if len(text) <= _MAX_REPLY else text[:_MAX_REPLY] + " [...]"


def _fold(first: str, text: str, indent: str = " ") -> list[str]:
    """``first`` and ``text`` folded at spaces into lines of at most 78 characters where the
    words allow (RFC 5322 2.2.3: unfolding removes only the CRLFs, so the text comes back
    unchanged)."""
    words = [w[i:i + _MAX_WORD] for w in text.split(" ")
             for i in range(0, max(len(w), 1), _MAX_WORD)]
    lines: list[str] = []
    line, bare = first, True  # bare: no word on this line yet, so nothing to break before
    for word in words:
        candidate = f"{line} {word}" if line else word
        if not bare and len(candidate) > _WIDTH:
            lines.append(line)
            candidate = indent + word
        line, bare = candidate, False
    lines.append(line)
    return lines


def _status(reply: str, expired: bool) -> str:
    """The enhanced status of a failed recipient: the one the reply opens with (after its
    code, RFC 3463), never a number found further in its free text, and never a success.

    Its class says why delivery stopped. A recipient given up on when the message expired
    (its reply a transient 4xx one) keeps class 4 (RFC 3463: a persistent transient failure
    that "caused abandonment"; X.4.7 "delivery time expired"), as RFC 3464 2.3.3 describes
    for a "failed" DSN after retries ran out. Every other failure is permanent: class 5,
    whatever class a remote's inconsistent reply ("550 4.1.1") claims."""
    gave_up = expired and reply[:1] == "4"
    if (m := _STATUS_RE.match(reply)) and m.group(1)[0] in "45":
        return ("4" if gave_up else "5") + m.group(1)[1:]
    return "4.4.7" if gave_up else "5.0.0"


def build_dsn(*, reporting_mta: str, postmaster: str, original_sender: str,
              original_headers: bytes, arrival: float, recipients: list[FailedRecipient],
              expired: bool, message_id: str) -> bytes:
    """The DSN message (CRLF line endings) telling ``original_sender`` what failed."""
    boundary = f"=_mta_{os.urandom(8).hex()}"
    subject = ("Undelivered Mail Returned to Sender (delivery time expired)" if expired
               else "Undelivered Mail Returned to Sender")
    why = ("could not be delivered before the retry period expired" if expired
           else "was refused permanently")
    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        f"Your message (queue id {message_id}) {why} for the recipients below.",
        "",
    ]
    for r in recipients:
        remote = f" (from {escape_controls(r.remote)})" if r.remote else ""
        human += _fold("", f"<{escape_controls(r.address)}>: {_one_line(r.reply)}{remote}", "    ")
    status_fields = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mta-Queue-ID: {message_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}",
        "",
    ]
    for r in recipients:
        addr_type, address = _address(r.address)
        status_fields += [
            *_fold("Final-Recipient:", f"{addr_type}; {address}"),
            "Action: failed",
            f"Status: {_status(r.reply, expired)}",
        ]
        if r.remote:
            status_fields += _fold("Remote-MTA:", f"dns; {escape_controls(r.remote)}")
        status_fields += [*_fold("Diagnostic-Code:", f"smtp; {_one_line(r.reply)}"), ""]
    headers = original_headers.rstrip(b"\r\n") + b"\r\n"
    parts = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: <{escape_controls(original_sender)}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: <dsn-{message_id}-{os.urandom(4).hex()}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        *human,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *status_fields,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(parts).encode("utf-8") + b"\r\n"
    return text + headers + f"\r\n--{boundary}--\r\n".encode()
