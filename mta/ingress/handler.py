"""aiosmtpd handler hooks: relay policy, address checks, limits, and the durable DATA."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from aiosmtpd.smtp import Session

from mta.envelope import Envelope
from mta.ingress.policy import address_problem
from mta.ingress.submit import SubmissionRefused, TooManyHops, store_submission
from mta.text import escape_controls

if TYPE_CHECKING:
    from mta.ingress.server import IngressServer
    from mta.ingress.session import IngressSession

__all__ = ["IngressHandler"]

log = structlog.get_logger("mta.ingress")

# Fenced, or the shard was taken over: this node may not write it now, but a peer may; the
# client should go elsewhere (421, RFC 5321 4.2.3), not wait for a disk (452).
FENCED_REPLY = "421 4.3.2 Not serving this shard now, try another node"

# The SMTP answer to each way store_submission can refuse a message (TooManyHops: its reply).
_REFUSAL_REPLIES = {
    "too_many_hops": TooManyHops.reply,
    "no_shards": "451 4.3.0 No spool shard available on this node, try again later",
    "fenced": FENCED_REPLY,
    "disk": "452 4.3.1 Insufficient system storage, try again later",
    "unavailable": "451 4.3.0 Spool not available, try again later",
    "unsigned": "550 5.7.1 {}",
    "sign_failed": "451 4.7.0 DKIM signing failed, try again later",
    "bad_label": "550 5.6.0 {}",
}

_EXTRA_EHLO = ("250-PIPELINING", "250-ENHANCEDSTATUSCODES")


class IngressHandler:
    """Decides every MAIL, RCPT and DATA; a ``250`` to DATA means the message is fsynced."""

    def __init__(self, server: IngressServer) -> None:
        self._server = server

    async def handle_EHLO(self, server: IngressSession, session: Session,
                          envelope: SmtpEnvelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        out = [responses[0], *_EXTRA_EHLO]
        for line in responses[1:]:
            if line.startswith("250-AUTH") and self._server.users is None:
                continue  # no users configured: do not offer AUTH at all
            out.append(line)
        return out

    # MAIL and RCPT are plain functions the session calls (mta/ingress/session.py), not
    # aiosmtpd hooks: a coroutine each was a measurable share of the event loop.

    def mail(self, server: IngressSession, session: Session, envelope: SmtpEnvelope,
             address: str, mail_options: list[str]) -> str:
        """The reply to a syntactically valid MAIL; an accepted sender goes in ``envelope``."""
        # The null sender stays "<>" here: aiosmtpd reads an empty mail_from as "no MAIL yet".
        if address != "<>" and (problem := address_problem(address, envelope.smtp_utf8)):
            # 5.1.3 like aiosmtpd's own "malformed address", so every refusal of a MAIL
            # address for its syntax carries one code, whichever layer caught it.
            return f"501 5.1.3 Bad sender address syntax: {problem}"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    def rcpt(self, server: IngressSession, session: Session, envelope: SmtpEnvelope,
             address: str, rcpt_options: list[str]) -> str:
        """The reply to a syntactically valid RCPT; an accepted recipient goes in ``envelope``."""
        cfg = self._server.cfg
        if address.lower() == "postmaster":
            # RFC 5321 4.5.1: the unqualified "postmaster" must be accepted, from anyone (no
            # relay check); it is this node's own, postmaster@<[smtp] hostname> (README).
            address = f"postmaster@{cfg.hostname}"
            if address_problem(address, envelope.smtp_utf8):
                log.warning("smtp.no_postmaster", hostname=cfg.hostname)
                return "451 4.3.5 No postmaster address: [smtp] hostname is not a mail domain"
        elif not session.authenticated and not server.relay_allowed:
            # Not checked yet: escaped, so a console log cannot be fed terminal controls.
            log.info("smtp.relay_denied", client_ip=server.client_ip,
                     rcpt=escape_controls(address))
            return "554 5.7.1 Relay access denied: authenticate first"
        elif problem := address_problem(address, envelope.smtp_utf8):
            return f"501 5.1.3 Bad recipient address syntax: {problem}"
        if len(envelope.rcpt_tos) >= cfg.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {cfg.max_recipients} per message)"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: IngressSession, session: Session,
                          envelope: SmtpEnvelope) -> str:
        srv = self._server
        if not srv.accepting_writes:
            srv.metrics.fenced_refusals.labels("smtp").inc()
            return FENCED_REPLY
        sender = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        body_8bit = "BODY=8BITMIME" in envelope.mail_options
        env = Envelope(
            sender=sender,
            recipients=list(envelope.rcpt_tos),
            smtputf8=bool(envelope.smtp_utf8),
            body_8bit=body_8bit,
            client_ip=server.client_ip,
            helo=session.host_name or "",
            auth_user=str(session.auth_data) if session.authenticated else "",
        )
        if env.auth_user and srv.users is not None:
            env.tenant = srv.users.tenant_of(env.auth_user)
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        raw: Any = envelope.original_content or b""
        try:
            message_id, _size = await store_submission(
                srv.spool, srv.cfg.hostname, env, raw, protocol, max_hops=srv.cfg.max_hops,
                metrics=srv.metrics, via="smtp", signer=srv.signer, tenants=srv.tenants)
        except SubmissionRefused as exc:  # counted and logged by store_submission
            return _REFUSAL_REPLIES[exc.kind].format(exc)
        return f"250 2.0.0 Ok: queued as {message_id}"
