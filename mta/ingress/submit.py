"""Storing one submitted message: the step SMTP DATA and HTTP injection share."""

from __future__ import annotations

from mta.envelope import Envelope
from mta.ingress.headers import prepare_content, received_header
from mta.spool import Spool

__all__ = ["store_submission"]


async def store_submission(spool: Spool, hostname: str, env: Envelope, raw: bytes,
                           protocol: str) -> tuple[str, int]:
    """Add trace and missing submission headers, then store durably.

    Returns (message id, stored size) once fsynced; spool errors propagate for the caller
    to turn into its own protocol's reply.
    """
    message_id = spool.allocate_id()
    received = received_header(
        helo=env.helo, ip=env.client_ip, hostname=hostname, protocol=protocol,
        message_id=message_id,
        recipient=env.recipients[0] if len(env.recipients) == 1 else None)
    content = prepare_content(raw, received, message_id=message_id, hostname=hostname)
    await spool.submit(env, content, message_id)
    return message_id, len(content)
