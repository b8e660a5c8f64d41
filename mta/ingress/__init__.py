"""SMTP submission: aiosmtpd sessions, relay policy, limits, durable DATA."""

from mta.ingress.server import IngressServer, load_tls_context

__all__ = ["IngressServer", "load_tls_context"]
