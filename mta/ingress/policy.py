"""Who may submit, how many may connect, and what counts as an address."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable

from mta.netaddr import ip_address
from mta.text import has_controls

__all__ = ["ConnectionLimiter", "address_problem", "domain_problem", "in_networks", "is_loopback"]

_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ATEXT_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_IPV6_TAG = "ipv6:"
# RFC 5321 4.1.2 Quoted-string: qtextSMTP (%d32-33 / %d35-91 / %d93-126) or quoted-pairSMTP
# (backslash, then %d32-126); RFC 6531 adds UTF8-non-ascii to qtextSMTP (SMTPUTF8 is checked
# separately, controls before this).
_QUOTED_RE = re.compile(r'^"(?:[ !#-\[\]-~]|\\[ -~]|[^\x00-\x7f])*"$')


def in_networks(ip: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether the client address ``ip`` lies in one of ``networks``."""
    addr = ip_address(ip)
    return addr is not None and any(addr in net for net in networks)


def is_loopback(ip: str) -> bool:
    """Whether the client address ``ip`` is a loopback address."""
    addr = ip_address(ip)
    return addr is not None and addr.is_loopback


@functools.lru_cache(maxsize=65536)
def _domain_problem(domain: str, smtputf8: bool) -> str | None:
    if domain.startswith("[") and domain.endswith("]"):
        return _literal_problem(domain[1:-1])
    if not domain or len(domain) > 253:
        return "bad domain length"
    if domain.endswith("."):
        return "domain ends with a dot"
    if not domain.isascii():
        if not smtputf8:
            return "non-ASCII domain without SMTPUTF8"
        try:
            ace = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return "bad internationalised domain"
        # IDNA maps fullwidth letters, ideographic full stops and invisible characters onto
        # another name (fullwidth "sink" and U+3002 give ``sink.test``): only the own form is
        # accepted, or suspensions and policies keyed on that name would be walked around.
        if ace.encode("ascii").decode("idna") != domain.lower():
            return f"internationalised domain not in its normal form (write {ace})"
        domain = ace
    labels = domain.rstrip(".").split(".")
    if len(labels) < 2 and domain.lower() != "localhost":
        return "domain must be fully qualified"
    if not all(_LABEL_RE.match(label) for label in labels):
        return "bad domain"
    return None


def _literal_problem(literal: str) -> str | None:
    """Why ``literal`` (an address literal without its brackets, RFC 5321 4.1.3) is not an
    IPv4 address or ``IPv6:`` and an IPv6 address, or None."""
    if "%" in literal:
        return "bad address literal"  # a zone id means nothing outside this host
    try:
        if literal.lower().startswith(_IPV6_TAG):
            ipaddress.IPv6Address(literal[len(_IPV6_TAG):])
        else:
            ipaddress.IPv4Address(literal)
    except ValueError:
        return "bad address literal"
    return None


def domain_problem(domain: str, smtputf8: bool = True) -> str | None:
    """Why ``domain`` is not a mail domain (as after the ``@`` of an address), or None."""
    if has_controls(domain):
        return "control character in domain"
    return _domain_problem(domain, smtputf8)


def address_problem(address: str, smtputf8: bool) -> str | None:
    """Why ``address`` is not a deliverable ``local@domain`` mailbox, or None if it is.

    The one rule both doors (SMTP MAIL/RCPT, HTTP injection) apply.
    """
    if has_controls(address):
        return "control character in address"
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "expected local@domain"
    if len(local.encode("utf-8", "surrogateescape")) > 64:
        return "local part longer than 64 octets"
    if not local.isascii() and not smtputf8:
        return "non-ASCII local part without SMTPUTF8"
    if local.startswith('"'):
        if not _QUOTED_RE.match(local):
            return "bad quoted local part"
    else:
        ascii_local = local.encode("ascii", "ignore").decode() if smtputf8 else local
        if ascii_local and not _ATEXT_RE.match(ascii_local):
            return "bad local part"
        if local.startswith(".") or local.endswith(".") or ".." in local:
            return "bad dots in local part"
    return _domain_problem(domain, smtputf8)


class ConnectionLimiter:
    """Counts open sessions in total and per client address; the last ``reserved`` slots
    only go to privileged clients, so a flood from elsewhere never fills the listener."""

    def __init__(self, max_total: int, max_per_ip: int, reserved: int = 0) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.reserved = reserved
        self.total = 0
        self._per_ip: Counter[str] = Counter()

    def acquire(self, ip: str, privileged: bool = False) -> str | None:
        """Take a slot for ``ip``; return the refusal reason when over a limit."""
        if self.total >= (self.max_total if privileged else self.max_total - self.reserved):
            return "total"
        if self._per_ip[ip] >= self.max_per_ip:
            return "per_ip"
        self.total += 1
        self._per_ip[ip] += 1
        return None

    def release(self, ip: str) -> None:
        self.total -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
