"""Delivery Status Notifications (RFC 3464 multipart/report) for bounces and expirations."""

from __future__ import annotations

import email.utils
import os
import re
from dataclasses import dataclass

__all__ = ["FailedRecipient", "build_dsn"]

_STATUS_RE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the DSN reports on."""

    address: str
    reply: str  # the remote reply, or our synthesized one, e.g. "550 5.1.1 user unknown"
    remote: str = ""  # MX host that answered, if any


def _addr_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"  # RFC 6533 for SMTPUTF8 addresses


def _status(reply: str, expired: bool) -> str:
    if m := _STATUS_RE.search(reply):
        status = m.group(1)
        return "5" + status[1:] if status.startswith("4") else status
    return "4.4.7" if expired else "5.0.0"


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
        human.append(f"<{r.address}>: {r.reply}" + (f" (from {r.remote})" if r.remote else ""))
    status_fields = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Mta-Queue-ID: {message_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}",
        "",
    ]
    for r in recipients:
        status_fields += [
            f"Final-Recipient: {_addr_type(r.address)}; {r.address}",
            "Action: failed",
            f"Status: {_status(r.reply, expired)}",
        ]
        if r.remote:
            status_fields.append(f"Remote-MTA: dns; {r.remote}")
        status_fields += [f"Diagnostic-Code: smtp; {r.reply}", ""]
    headers = original_headers.rstrip(b"\r\n") + b"\r\n"
    parts = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: <{original_sender}>",
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
