"""Storing one submitted message: the step SMTP DATA and HTTP injection share."""

from __future__ import annotations

from mta.delivery.loops import received_count
from mta.envelope import Envelope
from mta.ingress.headers import prepare_content, received_header
from mta.spool import Spool

__all__ = ["TooManyHops", "store_submission"]


class TooManyHops(Exception):
    """The message arrived with more ``Received:`` headers than ``[smtp] max_hops``: it is
    going round in a loop somewhere. Each door answers it as a permanent refusal."""

    reply = "554 5.4.6 Too many hops"

    def __init__(self, hops: int, max_hops: int) -> None:
        super().__init__(f"{hops} Received: headers, at most {max_hops} allowed")
        self.hops = hops
        self.max_hops = max_hops


async def store_submission(spool: Spool, hostname: str, env: Envelope, raw: bytes,
                           protocol: str, *, max_hops: int) -> tuple[str, int]:
    """Check the hop count, add trace and missing submission headers, then store durably.

    Returns (message id, stored size) once fsynced. Raises :class:`TooManyHops`; spool errors
    propagate for the caller to turn into its own protocol's reply.
    """
    if (hops := received_count(raw)) > max_hops:
        raise TooManyHops(hops, max_hops)
    message_id = spool.allocate_id()
    received = received_header(
        helo=env.helo, ip=env.client_ip, hostname=hostname, protocol=protocol,
        message_id=message_id,
        recipient=env.recipients[0] if len(env.recipients) == 1 else None)
    content = prepare_content(raw, received, message_id=message_id, hostname=hostname)
    await spool.submit(env, content, message_id)
    return message_id, len(content)
