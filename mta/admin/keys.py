"""The runtime keys an operator may suspend or throttle (see :mod:`mta.delivery.runtime` for
what they match): checked and normalised here, at the API edge, so nothing else reaches
etcd or a terminal."""

from __future__ import annotations

import ipaddress
import re

from mta.config import TENANT_NAME
from mta.delivery.runtime import SITE_PREFIX
from mta.envelope import domain_key
from mta.ingress.policy import domain_problem

__all__ = ["PatternError", "domain_pattern", "label_key", "site_pattern"]

_WITH_PORT = re.compile(r"(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})")


class PatternError(ValueError):
    """Not a key an operator may suspend or throttle; the message names the problem."""


def _host_problem(host: str) -> str | None:
    """Why ``host`` (after any ``*.``) is not a host name, or None."""
    if "*" in host:
        return "a wildcard is \"*.\" at the start only, followed by a host name"
    return domain_problem(host)


def domain_pattern(text: str) -> str:
    """``text`` as a domain key: a domain, an address literal or ``*.domain``, normalised;
    raises PatternError."""
    rest = text[2:] if text.startswith("*.") else text
    if ":" in rest and not rest.startswith("["):
        raise PatternError("host:port names a site: suspend or throttle it as a site "
                           "(mtactl --site)")
    if rest != text and rest.startswith("["):
        raise PatternError("a wildcard takes a host name, not an address literal")
    if problem := _host_problem(rest):
        raise PatternError(problem)
    return domain_key(text)


def label_key(kind: str, value: object) -> str:
    """The stored key holding a tenant's or a campaign's mail (``tenant:acme``); raises
    PatternError for a value that is not a name."""
    if not isinstance(value, str) or not TENANT_NAME.fullmatch(value):
        raise PatternError(f"a {kind} is 1-64 letters, digits, '.', '_' or '-', starting "
                           "with a letter or digit")
    return f"{kind}:{value}"


def _literal(text: str) -> str:
    try:
        return f"[{ipaddress.ip_address(text[1:-1].removeprefix('IPv6:'))}]"
    except ValueError:
        raise PatternError("bad address literal (expected [192.0.2.1] or "
                           "[2001:db8::1])") from None


def site_pattern(text: str) -> str:
    """``text`` as a stored site key (``site:`` and a ``[delivery.sites]`` key): a host,
    ``*.suffix``, ``[address]``, any of those with ``:port``, or ``smarthost:host:port`` as
    ``mtactl queue`` shows a smarthost; raises PatternError."""
    text = text.removeprefix(SITE_PREFIX).removeprefix("smarthost:")
    host, port = text, ""
    if m := _WITH_PORT.fullmatch(text):
        host, port = m.group(1), m.group(2)
        if not 1 <= int(port) <= 65535:
            raise PatternError("port out of range")
    if "," in host:
        raise PatternError("one host per site key (a site matches when any of its MX "
                           "hosts does)")
    if host.startswith("["):
        host = _literal(host)
    else:
        wild = host.startswith("*.")
        if wild and host[2:].startswith("["):
            raise PatternError("a wildcard takes a host name, not an address literal")
        if problem := _host_problem(host[2:] if wild else host):
            raise PatternError(problem)
        host = domain_key(host)
    return SITE_PREFIX + host + (f":{int(port)}" if port else "")
