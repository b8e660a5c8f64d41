"""Delivery errors carrying the SMTP reply (or a synthesized one) that ends an attempt."""

from __future__ import annotations

__all__ = ["DeliveryError", "NotOwnerError", "PermanentError", "SuspendedError", "TemporaryError"]


class DeliveryError(Exception):
    """An attempt failed with ``code`` and ``text`` (``text`` starts with the enhanced code)."""

    permanent = False

    def __init__(self, code: int, text: str, *, remote: str = "", connection: bool = False
                 ) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.remote = remote
        self.connection = connection  # failed to reach the host at all (breaker input)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


class TemporaryError(DeliveryError):
    """Try again later (4xx, connection failure, timeout, DNS SERVFAIL)."""


class PermanentError(DeliveryError):
    """Give up on the recipients concerned (5xx, NXDOMAIN, null MX)."""

    permanent = True


class NotOwnerError(TemporaryError):
    """This node may not send for the message's shard now (fenced, shard released, or its
    lease deadline passed): the attempt stops without sending. Not the remote's fault, so it
    is neither a TransientFailure of the message nor a failure of the site; the message
    stays in the spool for whoever provably owns the shard next."""

    def __init__(self, stage: str) -> None:
        super().__init__(451, f"4.3.2 Not serving this shard now (stopped {stage})")
        self.stage = stage


class SuspendedError(DeliveryError):
    """An operator suspended the job's domain or site (``key``, as stored) while it waited:
    it goes back unsent, and its message waits without an attempt counted, as for a
    domain suspended before its attempt began."""

    def __init__(self, key: str) -> None:
        super().__init__(451, f"4.3.2 Delivery suspended by the operator ({key})")
        self.key = key
