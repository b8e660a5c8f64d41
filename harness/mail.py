"""Test messages."""

from __future__ import annotations


def message(n: int, size: int = 2048, extra_headers: str = "") -> bytes:
    """A unique test message with CRLF line endings, about ``size`` bytes."""
    head = (f"From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: test {n}\r\n"
            f"Message-ID: <test-{n}@example.com>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"X-Test-Id: {n}\r\n{extra_headers}\r\n")
    line = f"message {n} line ".ljust(76, "x") + "\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return (head + body).encode()
