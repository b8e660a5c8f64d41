"""Certificates from a test CA (trustme) for receiving servers on loopback."""

from __future__ import annotations

import datetime
import ssl
from typing import Any

import trustme

__all__ = ["server_context"]


def server_context(ca: trustme.CA, *names: str, expired: bool = False) -> ssl.SSLContext:
    """A server-side context with a certificate from ``ca`` for ``names`` (expired: valid
    from 30 days ago to yesterday)."""
    kw: dict[str, Any] = {}
    if expired:
        now = datetime.datetime.now(datetime.UTC)
        kw = {"not_before": now - datetime.timedelta(days=30),
              "not_after": now - datetime.timedelta(days=1)}
    cert = ca.issue_cert(*names, **kw)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx
