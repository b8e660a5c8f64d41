"""Storing one submitted message: the step SMTP DATA and HTTP injection share.

Both doors call :func:`store_submission`, so both get the same checks (hop count, trace and
submission headers, durable store) and the same accounting: ``mta_received_messages``,
``mta_received_bytes``, ``mta_submit_seconds`` (which the SLO reads as its submissions),
``mta_spool_write_errors`` and ``mta_fenced_refusals``. A refusal comes back as one
:class:`SubmissionRefused` with a ``kind``; each door turns the kind into its own reply
(SMTP reply code in the handler, HTTP status and JSON in the admin API).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import structlog

from mta.config import TENANT_NAME, TenantsConfig
from mta.delivery.loops import received_count
from mta.dkim.signer import Signer, Unsignable
from mta.envelope import Envelope
from mta.ingress.headers import prepare_content, received_header, take_fields
from mta.logs import HotEvent, describe, json_string
from mta.metrics import NodeMetrics
from mta.spool import FencedError, NoShardsOwned, Spool, SpoolError, SpoolWriteError

__all__ = ["REFUSAL_KINDS", "SubmissionRefused", "TooManyHops", "store_submission"]

log = structlog.get_logger("mta.ingress")

# Why a submission was not stored; every door answers each of these.
REFUSAL_KINDS = ("too_many_hops", "no_shards", "fenced", "disk", "unavailable", "unsigned",
                 "sign_failed", "bad_label")


class SubmissionRefused(Exception):
    """The message was not stored. ``kind`` is one of :data:`REFUSAL_KINDS`; only
    ``too_many_hops``, ``unsigned`` (DKIM signing required, no key for the message) and
    ``bad_label`` (a tenant or campaign header that is not a name) are permanent. Already
    counted and logged when raised."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class TooManyHops(SubmissionRefused):
    """The message arrived with more ``Received:`` headers than ``[smtp] max_hops``: it is
    going round in a loop somewhere. Each door answers it as a permanent refusal."""

    reply = "554 5.4.6 Too many hops"

    def __init__(self, hops: int, max_hops: int) -> None:
        super().__init__("too_many_hops", f"{hops} Received: headers, at most {max_hops} allowed")
        self.hops = hops
        self.max_hops = max_hops


def take_labels(raw: bytes, env: Envelope, tenants: TenantsConfig, via: str) -> bytes:
    """Remove the tenant and campaign headers from ``raw``; set ``env.tenant`` from the
    first (unless the AUTH user's tenant already set it) and ``env.campaign`` from the
    second. Raises SubmissionRefused (``bad_label``) for a value that is not a name."""
    raw, found = take_fields(raw, (tenants.header, tenants.campaign_header))
    for header, attr in ((tenants.header, "tenant"), (tenants.campaign_header, "campaign")):
        value = found.get(header.lower())
        if value is None or (attr == "tenant" and env.tenant):
            continue
        if not TENANT_NAME.fullmatch(value):
            log.warning(f"{via}.bad_label", sender=env.sender, client_ip=env.client_ip,
                        header=header)
            raise SubmissionRefused("bad_label", f"{header}: expected 1-64 letters, digits, "
                                                 "'.', '_' or '-', starting with a letter or "
                                                 "digit")
        setattr(env, attr, value)
    return raw


async def store_submission(spool: Spool, hostname: str, env: Envelope, raw: bytes,
                           protocol: str, *, max_hops: int, metrics: NodeMetrics,
                           via: str, signer: Signer | None = None,
                           tenants: TenantsConfig | None = None) -> tuple[str, int]:
    """Check the hop count, take the tenant and campaign headers, add trace and missing
    submission headers, store durably, count.

    ``via`` names the door (``smtp`` or ``http``) in logs and in ``mta_fenced_refusals``.
    Returns (message id, stored size) once fsynced; raises :class:`SubmissionRefused`.
    """
    started = time.perf_counter()
    if (hops := received_count(raw)) > max_hops:
        log.warning(f"{via}.too_many_hops", sender=env.sender, client_ip=env.client_ip,
                    hops=hops, max_hops=max_hops)
        raise TooManyHops(hops, max_hops)
    if tenants is not None:
        # Before signing: the signed bytes are the bytes sent.
        raw = take_labels(raw, env, tenants, via)
    try:
        message_id = spool.allocate_id()
        received = received_header(
            helo=env.helo, ip=env.client_ip, hostname=hostname, protocol=protocol,
            message_id=message_id,
            recipient=env.recipients[0] if len(env.recipients) == 1 else None)
        content = prepare_content(raw, received, message_id=message_id, hostname=hostname)
        if signer is not None:
            # Signed once, here: every retry and every replica carries these bytes.
            content = await signer.sign_async(content)
        await spool.submit(env, content, message_id)
    except Unsignable as exc:
        log.warning(f"{via}.dkim_refused", sender=env.sender, client_ip=env.client_ip,
                    error=str(exc))
        raise SubmissionRefused("unsigned" if exc.permanent else "sign_failed",
                                str(exc)) from exc
    except NoShardsOwned as exc:
        raise SubmissionRefused("no_shards", str(exc)) from exc
    except FencedError as exc:
        # Counted apart from disk errors: the disk alert must not fire on a lease loss.
        metrics.fenced_refusals.labels(via).inc()
        log.warning(f"{via}.fenced_refusal", sender=env.sender, shard=exc.shard,
                    error=describe(exc))
        raise SubmissionRefused("fenced", str(exc)) from exc
    except SpoolWriteError as exc:
        metrics.spool_errors.labels(str(exc.errno)).inc()
        log.error(f"{via}.spool_write_failed", sender=env.sender, error=describe(exc))
        raise SubmissionRefused("disk", str(exc)) from exc
    except SpoolError as exc:
        log.warning(f"{via}.spool_unavailable", sender=env.sender, error=describe(exc))
        raise SubmissionRefused("unavailable", str(exc)) from exc
    size = len(content)
    metrics.received.inc()
    metrics.received_bytes.inc(size)
    metrics.submit_latency.observe(time.perf_counter() - started)
    # RFC 3848 protocol names: ESMTPS / ESMTPSA mean the message came over TLS.
    _received(via)(message_id, env, size, protocol.rstrip("A").endswith("S"))
    return message_id, size


def _received_fields(message_id: str, env: Envelope, size: int, tls: bool) -> dict[str, Any]:
    """The fields of ``<via>.received``, the info line of every accepted message."""
    return {"message_id": message_id, "sender": env.sender, "recipients": len(env.recipients),
            "size": size, "client_ip": env.client_ip, "auth_user": env.auth_user or None,
            "tls": tls, **env.labels()}


def _received_head(message_id: str, env: Envelope, size: int, tls: bool) -> str:
    """:func:`_received_fields` as the head of their JSON line (see HotEvent);
    tests/ingress/test_received_line.py holds the line equal to structlog's."""
    user = env.auth_user
    head = (f'{{"message_id": {json_string(message_id)}, "sender": {json_string(env.sender)}, '
            f'"recipients": {len(env.recipients):d}, "size": {size:d}, '
            f'"client_ip": {json_string(env.client_ip)}, '
            f'"auth_user": {json_string(user) if user else "null"}, '
            f'"tls": {"true" if tls else "false"}')
    for key, value in env.labels().items():
        head += f", {json_string(key)}: {json_string(value)}"
    return head


@functools.cache
def _received(via: str) -> HotEvent[[str, Envelope, int, bool]]:
    return HotEvent(log, f"{via}.received", _received_fields, _received_head)
