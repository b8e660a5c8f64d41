"""What DKIM signing raises when a message cannot be signed."""

from __future__ import annotations

__all__ = ["SigningStartError", "Unsignable"]


class Unsignable(Exception):
    """The message cannot be signed under the policy: ``permanent`` (no key for its From:
    domain while signing is required, no usable From:) or not (signing failed)."""

    def __init__(self, detail: str, *, permanent: bool) -> None:
        super().__init__(detail)
        self.permanent = permanent


class SigningStartError(Exception):
    """A DKIM signing process could not be started, or ended before it was ready."""
