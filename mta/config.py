"""Typed node configuration loaded from TOML and validated before anything starts.

Every field declares a parser; a bad value or unknown key raises :class:`ConfigError` naming
the file, the dotted key and what was expected, so the daemon can print one line and exit 2.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mta.dkim import DEFAULT_HEADERS, DEFAULT_OVERSIGN
from mta.dkim.keys import DkimKeyError, load_key
from mta.envelope import domain_key

__all__ = [
    "AdminConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DomainPolicy",
    "NodeConfig",
    "Secret",
    "SmtpConfig",
    "SpoolConfig",
    "load_config",
    "parse_duration",
    "parse_listen",
    "parse_rate",
    "parse_size",
]


class ConfigError(Exception):
    """A configuration problem, worded for the operator: file, key, what is expected."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + message)


class _Invalid(ValueError):
    """Raised by field parsers; the loader adds file and key."""


# --- value parsers -------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Longer than any timer needs; beyond it (or nan/inf) timeouts overflow or never fire.
_MAX_DURATION = 10 * 365 * 86400.0


def parse_size(value: Any) -> int:
    """A byte count: an integer, or a string like ``"25M"``, ``"64MiB"``, ``"512k"``."""
    if isinstance(value, bool):
        raise _Invalid(f"expected a size in bytes such as 26214400 or \"25M\", got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise _Invalid(f"expected a positive size in bytes, got {value}")
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if size > 0:
            return size
    raise _Invalid(f"expected a size in bytes such as 26214400 or \"25M\", got {value!r}")


def parse_duration(value: Any) -> float:
    """Seconds: a number, or a string like ``"300ms"``, ``"5s"``, ``"5m"``, ``"4h"``, ``"3d"``."""
    if isinstance(value, bool):
        raise _Invalid(f"expected a duration such as 30 or \"5m\", got {value!r}")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        else:
            raise _Invalid(f"expected a duration such as 30 or \"5m\", got {value!r}")
    except OverflowError:
        seconds = math.inf  # an integer too large for a float
    if not math.isfinite(seconds) or seconds > _MAX_DURATION:
        raise _Invalid(f"expected a finite duration of at most 10 years, got {_short(value)}")
    if seconds <= 0:
        raise _Invalid(f"expected a positive duration, got {value!r}")
    return seconds


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ZERO_DURATION = re.compile(r"0+(\.0*)?(ms|s|m|h|d)?")


def _duration_or_off(value: Any) -> float:
    """A duration, or 0 (also written "0s") for "off"."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    if isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip()):
        return 0.0
    return parse_duration(value)


def parse_listen(value: Any) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"``; port 0 picks a free port (tests)."""
    if not isinstance(value, str):
        raise _Invalid(f"expected \"host:port\", got {value!r}")
    host, sep, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise _Invalid(f"expected \"host:port\" with a port 0-65535, got {value!r}")
    return host, int(port_s)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Invalid(f"expected a positive integer, got {value!r}")
    return value


def _count_or_auto(value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise _Invalid(f'expected "auto" or a count of 0 to 64, got {value!r}')
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid(f"expected an integer of 0 or more, got {value!r}")
    return value


# Control characters: a NUL makes every open() of a path fail (a traceback at startup), and
# in a hostname, HELO, address or token they would go out on the wire or into a header.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _no_controls(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise _Invalid(f"expected text without control characters, got {value!r}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {value!r}")
    return _no_controls(value)


def _nonempty_string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, got {value!r}")
    return _no_controls(value.strip())


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {value!r}")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a path string, got {value!r}")
    return _no_controls(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of networks such as [\"127.0.0.0/8\"], got {value!r}")
    nets = []
    for item in value:
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise _Invalid(f"expected a network such as \"10.0.0.0/8\", got {item!r}") from None
    return tuple(nets)


def _endpoints(value: Any) -> tuple[str, ...]:
    """etcd endpoints as ``host:port``, also written the way etcdctl users write them
    (``http://host:port`` or ``https://host:port``, with or without a trailing slash); stored
    as ``host:port``, or ``https://host:port`` for TLS. Plain and TLS URLs do not mix."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of \"host:port\" etcd endpoints, got {value!r}")
    out = []
    schemes: dict[str, Any] = {}
    for item in value:
        text = item.strip().rstrip("/") if isinstance(item, str) else item
        scheme = ""
        if isinstance(text, str) and (match := re.match(r"(?i)(https?)://", text)):
            scheme = match.group(1).lower()
            schemes.setdefault(scheme, item)
            text = text[match.end():]
        if isinstance(text, str) and ("://" in text or "@" in text or "/" in text):
            # ftp://..., user:password@host: not an endpoint (and never echoed whole).
            raise _Invalid("expected \"host:port\" or \"http(s)://host:port\" (no other "
                           "scheme, no user or path; etcd_username and etcd_password are "
                           "keys of their own)")
        host, port = parse_listen(text)
        if port == 0:
            raise _Invalid(f"expected an etcd endpoint with a port 1-65535, got {item!r}")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        out.append(f"https://{address}" if scheme == "https" else address)
    if len(schemes) > 1:
        raise _Invalid(f"mixes plain {schemes['http']!r} and TLS {schemes['https']!r}: one "
                       "cluster's etcd is reached one way; write every endpoint as "
                       "https://host:port (or host:port with etcd_ca set)")
    return tuple(out)


def _node_id(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        raise _Invalid(
            "expected 1-63 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {value!r}"
        )
    return value


def _opt(parser: Callable[[Any], Any], default: Any) -> Any:
    """A field with a parser; ``default`` may be a zero-argument callable."""
    meta = {"parse": parser}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --- sections ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: identity and process-level settings."""

    id: str = _opt(_node_id, lambda: re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63])
    loop: str = _opt(_choice("auto", "asyncio", "uvloop"), "auto")
    log_format: str = _opt(_choice("auto", "json", "console"), "auto")
    log_level: str = _opt(_choice("debug", "info", "warning", "error"), "info")


_LOOPBACK_NETS = ["127.0.0.0/8", "::1/128"]


@dataclass(frozen=True)
class SmtpConfig:
    """``[smtp]``: the submission listener and its limits."""

    listen: tuple[str, int] = _opt(parse_listen, ("127.0.0.1", 2525))
    hostname: str = _opt(_nonempty_string, socket.getfqdn)
    max_message_size: int = _opt(parse_size, 25 * 1024 * 1024)
    max_recipients: int = _opt(_positive_int, 1000)
    relay_networks: tuple[Any, ...] = _opt(_networks, lambda: _networks(_LOOPBACK_NETS))
    tls_cert: str = _opt(_path, "")
    tls_key: str = _opt(_path, "")
    users_file: str = _opt(_path, "")
    auth_allow_insecure: bool = _opt(_boolean, False)
    max_connections: int = _opt(_positive_int, 1000)
    max_connections_per_ip: int = _opt(_positive_int, 100)
    # Slots of max_connections only relay_networks clients may take (a flood from elsewhere
    # cannot shut them out); None: a tenth of max_connections.
    reserved_connections: int | None = _opt(_non_negative_int, None)
    # DATA bytes all sessions may hold at once before they reach the spool; beyond it 452.
    max_inflight_bytes: int = _opt(parse_size, 512 * 1024 * 1024)
    # Above 80% of max_connections, idle sessions get this command timeout (slow-client
    # floods cannot hold the listener for the full command_timeout).
    stress_timeout: float = _opt(parse_duration, 10.0)
    auth_max_failures: int = _opt(_positive_int, 5)  # then AUTH refused (454) ...
    auth_lockout: float = _opt(parse_duration, 600.0)  # ... for this long
    auth_failure_delay: float = _opt(parse_duration, 1.0)  # x (failures - 1), at most 5x
    # Failed AUTHs at one user from any addresses within auth_lockout before that user's
    # password is no longer checked for unknown addresses (distributed guessing).
    auth_user_max_failures: int = _opt(_positive_int, 20)
    command_timeout: float = _opt(parse_duration, 300.0)
    data_timeout: float = _opt(parse_duration, 600.0)
    shutdown_grace: float = _opt(parse_duration, 30.0)
    reuse_port: bool = _opt(_boolean, False)
    # Received: headers a message may arrive with (Postfix's hopcount_limit): more is a loop,
    # refused with 554 5.4.6 at DATA and bounced if already queued.
    max_hops: int = _opt(_positive_int, 50)


@dataclass(frozen=True)
class SpoolConfig:
    """``[spool]``: where and how messages are stored durably."""

    path: str = _opt(_path, "./var/spool")
    shards: int = _opt(_positive_int, 64)
    segment_size: int = _opt(parse_size, 64 * 1024 * 1024)
    compact_interval: float = _opt(parse_duration, 60.0)
    # A sealed segment is rewritten when its live share falls below this ratio.
    compact_live_ratio: float = _opt(lambda v: _ratio(v), 0.25)  # noqa: PLW0108 (defined below)
    max_batch_bytes: int = _opt(parse_size, 8 * 1024 * 1024)
    # Copies of each shard, each on another node's own disk (issue 16). 1 is one copy, on a
    # standalone node or on the filesystem a cluster shares. Unset in a file: 2 in a cluster
    # (config_from_dict), 1 standalone; 1 here for configs built in code.
    replicas: int = _opt(_positive_int, 1)
    # Copies (the owner's included) a message must be on before its 250; below that the shard
    # is read-only (451). Unset: every copy (= replicas), set in __post_init__.
    min_insync: int = _opt(_positive_int, None)
    # A follower silent this long leaves the in-sync set. Below [cluster] lease_ttl, so the
    # owner shrinks the set (and acknowledges again) before its own lease could run out.
    replica_timeout: float = _opt(parse_duration, 2.0)

    def __post_init__(self) -> None:
        if self.min_insync is None:
            object.__setattr__(self, "min_insync", self.replicas)


def _ratio(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 <= value <= 1 or not math.isfinite(value)):
        raise _Invalid(f"expected a number between 0 and 1, got {_short(value)}")
    return float(value)


@dataclass(frozen=True)
class AdminConfig:
    """``[admin]``: the operator HTTP API."""

    listen: tuple[str, int] = _opt(parse_listen, ("127.0.0.1", 8025))
    token: str = _opt(_string, "")
    enabled: bool = _opt(_boolean, True)
    # URL peers use to reach this API (cluster-wide answers); default from listen.
    advertise: str = _opt(_string, "")


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h|d)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_RATE = 1e6  # messages per second: more is no throttle, and keeps rates finite


def parse_rate(value: Any) -> float:
    """A throttle spec like ``"100/s"``, ``"20/m"``, ``"5000/h"``; returns events per second."""
    if isinstance(value, str) and (m := _RATE_RE.match(value)):
        rate = float(m.group(1)) / _RATE_UNITS[m.group(2)]
        # 5000 nines make an infinite float, which JSON (etcd, the admin API) cannot carry.
        if 0 < rate <= _MAX_RATE:
            return rate
        if rate > _MAX_RATE:
            raise _Invalid(f"a rate of at most {_MAX_RATE:.0f}/s, got {value[:40]!r}")
    raise _Invalid(f"expected a rate such as \"100/s\", \"20/m\" or \"5000/h\", "
                   f"got {str(value)[:60]!r}")


def _optional_rate(value: Any) -> float | None:
    return None if value in ("", None) else parse_rate(value)


def _optional_hostport(value: Any) -> tuple[str, int] | None:
    return None if value in ("", None) else parse_listen(value)


def _nameservers(value: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list such as [\"127.0.0.1:53\"], got {value!r}")
    # A bare IPv4 address means port 53.
    return tuple(parse_listen(f"{item}:53" if isinstance(item, str) and ":" not in item
                              else item) for item in value)


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _Invalid(f"expected a port 1-65535, got {value!r}")
    return value


# verify: TLS with a certificate that chains to the trust store ([delivery] tls_ca_file, or
# the system's) and names the MX host; required: TLS, any certificate.
_TLS_MODES = ("opportunistic", "required", "verify", "disabled")
_DOMAIN_TLS_MODES = ("opportunistic", "required", "verify")
_SITE_TLS_MODES = ("opportunistic", "required", "verify", "disabled")

# Keys a [delivery.domains] table once took that belong to the receiving hosts: many domains
# share one site (all of a provider's hosted domains), and whichever domain reached it first
# used to decide its limits for all of them.
_MOVED_TO_SITES = {
    "max_connections": "connection limits",
    "max_messages_per_connection": "messages per connection",
}


def _domain_hint(key: str) -> str | None:
    if key in _MOVED_TO_SITES:
        return (f"{_MOVED_TO_SITES[key]} belong to the receiving hosts, which many domains "
                f"share: set {key} under [delivery.sites.\"<MX host or *.suffix>\"]")
    return None


def _domain_tls(value: Any) -> str:
    if value == "disabled":
        raise _Invalid("a connection either does STARTTLS or not, for every domain it carries: "
                       "set tls = \"disabled\" under [delivery.sites.\"<MX host or *.suffix>\"]")
    return _choice(*_DOMAIN_TLS_MODES)(value)


# A tenant or campaign name: what a header or the users file may carry, and what the
# accounting records, the admin API and metrics labels show.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _pool_name(value: Any) -> str:
    value = _string(value)
    if value and not TENANT_NAME.fullmatch(value):
        raise _Invalid(f"expected a pool name of 1-64 letters, digits, '.', '_' or '-', got "
                       f"{_short(value)}")
    return value


def _webhook_url(value: Any) -> str:
    value = _string(value)
    if value and not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s#]*)?", value):
        raise _Invalid(f"expected an http:// or https:// URL (or empty: off), got "
                       f"{value[:100]!r}")
    return value


@dataclass(frozen=True)
class DomainPolicy:
    """Per-destination overrides under ``[delivery.domains."<domain or *.suffix>"]``: what is
    decided per message (rate, TLS required, smarthost)."""

    rate: float | None = _opt(_optional_rate, None)
    tls: str | None = _opt(_domain_tls, None)
    smarthost: tuple[str, int] | None = _opt(_optional_hostport, None)
    pool: str = _opt(_pool_name, "")  # its [egress.pools] pool (a tenant's wins)


@dataclass(frozen=True)
class SitePolicy:
    """Per receiving host under ``[delivery.sites."<MX host, smarthost or *.suffix>"]``: what is
    decided per connection (how many, how long they stay, STARTTLS, the site's rate)."""

    max_connections: int | None = _opt(_positive_int, None)
    max_messages_per_connection: int | None = _opt(_positive_int, None)
    rate: float | None = _opt(_optional_rate, None)
    tls: str | None = _opt(_choice(*_SITE_TLS_MODES), None)


# A site key may name a port too (``"smtp.relay.example:2525"``, ``"[2001:db8::1]:25"``):
# it then matches that host on that port only, as a smarthost is written.
_SITE_WITH_PORT = re.compile(r"(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})")


def _table_key_problem(name: str, ports: bool) -> str | None:
    """Why ``name`` cannot be a key of [delivery.domains] / [delivery.sites], or None: a
    domain or host, ``*.suffix`` or ``*`` (and, for sites, any of those with ``:port``)."""
    import unicodedata

    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") for c in name):
        return "control or format character in the name"
    host = name
    if ports and (m := _SITE_WITH_PORT.fullmatch(name)):
        host = m.group(1)
        if not 1 <= int(m.group(2)) <= 65535:
            return "port out of range"
    if not host.strip() or host != host.strip() or any(c.isspace() for c in host):
        return "empty, or spaces in the name"
    if "*" in host and host != "*" and not (host.startswith("*.") and len(host) > 2
                                            and "*" not in host[2:]):
        return "a wildcard is \"*\" or \"*.suffix\" only"
    return None


def _table_values(cls: type, table: dict[str, Any], where: str,
                  hint: Callable[[str], str | None] = lambda _: None) -> dict[str, Any]:
    """``table``'s keys parsed by ``cls``'s fields; an error names ``where`` and the key."""
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, raw in table.items():
        if key not in known:
            raise _Invalid(f"{where}{key}: " + (hint(key) or (
                f"unknown key; known keys are {', '.join(sorted(known))}")))
        try:
            values[key] = known[key].metadata["parse"](raw)
        except _Invalid as exc:
            raise _Invalid(f"{where}{key}: {exc}") from None
    return values


def _policy_tables(cls: type, section: str, hint: Callable[[str], str | None] = lambda _: None,
                   parent: str = "delivery") -> Callable[[Any], dict[str, Any]]:
    def key_of(name: str, seen: dict[str, str]) -> str:
        if problem := _table_key_problem(name, section == "sites"):
            raise _Invalid(f"{name[:100]!r}: {problem}")
        key = domain_key(name)
        if key in seen:
            raise _Invalid(f"{seen[key][:100]!r} and {name[:100]!r} are the same "
                           "(names are compared ignoring case): keep one")
        seen[key] = name
        return key

    def parse(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected tables like [{parent}.{section}.\"example.com\"], "
                           f"got {value!r}")
        out, seen = {}, {}
        for name, table in value.items():
            entry = key_of(name, seen)
            if not isinstance(table, dict):
                raise _Invalid(f"{name!r}: expected a table of settings")
            out[entry] = cls(**_table_values(cls, table, f"{name!r}.", hint))
        return out
    return parse


_parse_domains = _policy_tables(DomainPolicy, "domains", _domain_hint)
_parse_sites = _policy_tables(SitePolicy, "sites")


def _domain_policies(value: Any) -> dict[str, DomainPolicy]:
    return _parse_domains(value)


def _site_policies(value: Any) -> dict[str, SitePolicy]:
    return _parse_sites(value)


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: the outbound engine, with per-domain overrides in ``domains`` and
    per receiving host overrides in ``sites``."""

    enabled: bool = _opt(_boolean, True)
    smarthost: tuple[str, int] | None = _opt(_optional_hostport, None)
    nameservers: tuple[tuple[str, int], ...] = _opt(_nameservers, tuple)
    mx_port: int = _opt(_port, 25)
    helo: str = _opt(_string, "")
    max_connections: int = _opt(_positive_int, 20)
    max_messages_per_connection: int = _opt(_positive_int, 100)
    # Attempts in progress at once; further due messages wait in the scheduled queue, so a
    # large backlog is neither a task per message nor one unbounded ready queue.
    max_inflight: int = _opt(_positive_int, 1000)
    rate: float | None = _opt(_optional_rate, None)
    tls: str = _opt(_choice(*_TLS_MODES), "opportunistic")
    # The CA bundle a "verify" certificate (and an MTA-STS policy server's) must chain to;
    # empty: the system's trust store.
    tls_ca_file: str = _opt(_path, "")
    # MTA-STS (RFC 8461): domains that publish a policy get mail only over verified TLS to
    # the MX hosts it names (mode enforce); policies are cached for their max_age, in
    # mta_sts_cache across restarts. mta_sts_port: where policies are fetched (443).
    mta_sts: bool = _opt(_boolean, True)
    mta_sts_cache: str = _opt(_path, "./var/lib/mta-sts.json")
    mta_sts_port: int = _opt(_port, 443)
    mta_sts_timeout: float = _opt(parse_duration, 10.0)
    # DANE (RFC 7672): MX hosts with DNSSEC-validated TLSA records get mail only over TLS
    # that the records authenticate. Trusts the AD bit of the nameservers' answers, so they
    # must validate DNSSEC and be reached over a path this node trusts (e.g. unbound on
    # loopback).
    dane: bool = _opt(_boolean, False)
    connect_timeout: float = _opt(parse_duration, 30.0)
    command_timeout: float = _opt(parse_duration, 300.0)
    data_timeout: float = _opt(parse_duration, 600.0)
    idle_timeout: float = _opt(parse_duration, 30.0)
    # The first command on a reused pooled connection gets only this long: a connection whose
    # path went dark while it was idle is dropped and the job moves to a fresh connection,
    # instead of waiting command_timeout behind it.
    reuse_timeout: float = _opt(parse_duration, 5.0)
    # A command unanswered for this long stops counting against the site's max_connections
    # (at most max_connections such): new connections and breaker probes never wait behind
    # it. It still waits for its reply up to command_timeout / data_timeout.
    stall_timeout: float = _opt(parse_duration, 30.0)
    # TCP keepalive on outbound connections: first probe after this much silence, then every
    # third of it; after 3 unanswered probes (or data unacknowledged twice this long) the
    # kernel resets the connection. 0 = off.
    keepalive: float = _opt(_duration_or_off, 15.0)
    retry_initial: float = _opt(parse_duration, 300.0)
    retry_max: float = _opt(parse_duration, 4 * 3600.0)
    max_age: float = _opt(parse_duration, 3 * 86400.0)
    breaker_failures: int = _opt(_positive_int, 5)
    breaker_cooldown: float = _opt(parse_duration, 60.0)
    # A site (pool, throttle, breaker, back-off) nothing has used for this long (no queued
    # job, connection or attempt) is forgotten, so a sender reaching many domains keeps a
    # bounded table. One whose breaker is not closed or that is backing off is kept for
    # max(site_idle, 16 x breaker_cooldown): its state outlives its longest cooldown.
    site_idle: float = _opt(parse_duration, 600.0)
    # Routes (domain -> MX hosts and addresses) kept at most, least recently used out first;
    # the DNS answers beneath them are held to the same bound.
    route_cache_size: int = _opt(_positive_int, 10_000)
    # A route lives as long as the DNS answers it was built from (their TTLs; negative ones by
    # their SOA), but at least route_ttl_min (TTL 0 must not mean a lookup per message; also
    # how long a SERVFAIL is trusted) and at most route_ttl_max.
    route_ttl_min: float = _opt(parse_duration, 5.0)
    route_ttl_max: float = _opt(parse_duration, 3600.0)
    bounce_sender: str = _opt(_string, "")
    accounting_log: str = _opt(_path, "./var/log/accounting.jsonl")
    domains: dict[str, DomainPolicy] = _opt(_domain_policies, dict)  # noqa: RUF009
    sites: dict[str, SitePolicy] = _opt(_site_policies, dict)  # noqa: RUF009


# A replication secret must resist offline guessing from one recorded handshake; the same
# bound as mta.replication.peerauth.MIN_SECRET (config does not import the replication code).
_MIN_SECRET = 16
_MAX_SECRET_FILE = 64 * 1024  # a secret file larger than this is the wrong file


class Secret:
    """A secret from the config: its ``repr`` and ``str`` never show it, so a log line, an
    error or an API answer that prints a config (or a section of it) cannot leak it.
    ``reveal()`` hands the bytes to the code that authenticates with them."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<hidden>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # By value (a SIGHUP reload compares sections to report what needs a restart), in
        # constant time like every comparison of a secret.
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(Secret)  # equal secrets hash alike without the hash depending on them


def _secret(value: Any) -> Secret | None:
    # Errors describe the value without quoting it: a config error is printed and logged.
    if value in ("", None):
        return None
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got a {type(value).__name__} (not shown)")
    data = value.encode()
    if len(data) < _MIN_SECRET:
        raise _Invalid(f"expected at least {_MIN_SECRET} bytes, got {len(data)} (the value "
                       "is not shown); e.g. the output of: openssl rand -hex 32")
    return Secret(data)


def _password(value: Any) -> Secret | None:
    # Any non-empty string (etcd sets the rules); like _secret, never quoted in an error.
    if value in ("", None):
        return None
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got a {type(value).__name__} (not shown)")
    return Secret(value.encode())


def _advertise(value: Any) -> tuple[str, int] | None:
    address = _optional_hostport(value)
    if address is None:
        return None
    if address[1] == 0 or _is_wildcard(address[0]):
        raise _Invalid(f"expected a \"host:port\" peers can dial (a port 1-65535, not "
                       f"0.0.0.0 or ::), got {value!r}")
    return address


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _zone(value: Any) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
        raise _Invalid("expected a label of 1-63 letters, digits, '.', '_' or '-' starting "
                       f"with a letter or digit (such as \"eu-west-1a\"), got {_short(value)}")
    return value


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: etcd coordination; empty ``etcd`` means standalone."""

    etcd: tuple[str, ...] = _opt(_endpoints, tuple)
    name: str = _opt(_node_id, "mta")
    lease_ttl: float = _opt(parse_duration, 5.0)
    # The replicated spool's peer channel (issue 16): where owners' frames arrive. Empty: no
    # listener, which [spool] replicas > 1 needs. Port 0 picks a free port (tests).
    replication_listen: tuple[str, int] | None = _opt(_optional_hostport, None)
    # What peers dial; empty: replication_listen (its bound port when that is 0), which then
    # cannot be 0.0.0.0 or :: (nobody can dial a wildcard).
    replication_advertise: tuple[str, int] | None = _opt(_advertise, None)
    # Copies of a shard go to different zones when the cluster has several; empty: no zone.
    zone: str = _opt(_zone, "")
    # Peer authentication without certificates: HMAC over every frame with this shared
    # secret. Or secret_file, a file holding it (the config file then holds no secret; the
    # loader reads it into ``secret``). Never shown: see Secret.
    secret: Secret | None = _opt(_secret, None)  # noqa: RUF009 (_opt is field())
    secret_file: str = _opt(_path, "")
    # Mutual TLS between peers (all three or none): the CA that signed every node's
    # certificate, and this node's certificate and key. Encrypts as well as authenticates.
    tls_ca: str = _opt(_path, "")
    tls_cert: str = _opt(_path, "")
    tls_key: str = _opt(_path, "")
    # etcd over TLS (every endpoint, also when only written host:port): the CA that signed
    # etcd's certificate, and this node's client certificate and key (both or neither; etcd's
    # --client-cert-auth needs them). https:// endpoints alone use the system's CAs.
    etcd_ca: str = _opt(_path, "")
    etcd_cert: str = _opt(_path, "")
    etcd_key: str = _opt(_path, "")
    # etcd's own users (etcdctl user add, auth enable): the password, or a file holding it
    # (read into etcd_password at load, like secret_file). Never shown: see Secret.
    etcd_username: str = _opt(_string, "")
    etcd_password: Secret | None = _opt(_password, None)  # noqa: RUF009 (_opt is field())
    etcd_password_file: str = _opt(_path, "")

    @property
    def etcd_tls(self) -> bool:
        """Whether etcd is reached over TLS: a CA or client certificate is set, or the
        endpoints are https:// URLs."""
        return bool(self.etcd_ca or self.etcd_cert) or any(
            e.startswith("https://") for e in self.etcd)


def _selector(value: Any) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or len(value) > 200 or not re.fullmatch(
            r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62}))*",
            value):
        raise _Invalid(f"expected a DKIM selector (DNS labels such as \"s2026\"), got "
                       f"{_short(value)}")
    return value


def _signing_domain(value: Any) -> str:
    if value == "":
        return ""
    if not isinstance(value, str) or _table_key_problem(value, False) or "*" in value:
        raise _Invalid(f"expected a domain name such as \"example.org\", got {_short(value)}")
    return value.lower().rstrip(".")


def _header_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,75}", v)
            for v in value):
        raise _Invalid(f"expected a list of header field names such as [\"from\", "
                       f"\"subject\"], got {_short(value)}")
    return tuple(v.lower() for v in value)


def _signed_headers(value: Any) -> tuple[str, ...]:
    names = _header_names(value)
    if "from" not in names:
        raise _Invalid(f"expected a list that includes \"from\" (RFC 6376: From: is always "
                       f"signed), got {_short(value)}")
    return names


@dataclass(frozen=True)
class DkimKey:
    """One DKIM key: its selector, its PEM private key file and its algorithm."""

    selector: str = _opt(_selector, "")
    key: str = _opt(_path, "")
    algorithm: str = _opt(_choice("rsa-sha256", "ed25519-sha256"), "rsa-sha256")


def _dkim_key(value: Any) -> DkimKey:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table with selector, key and algorithm, got "
                       f"{_short(value)}")
    return DkimKey(**_table_values(DkimKey, value, ""))


@dataclass(frozen=True)
class DkimDomain(DkimKey):
    """``[dkim.domains."example.org"]``: the key mail From: that domain is signed with;
    ``dual``, a second key (``[dkim.domains."example.org".dual]``, e.g. Ed25519 beside
    RSA) signing it too; ``signing_domain``, the ``d=`` (default: the From: domain)."""

    signing_domain: str = _opt(_signing_domain, "")
    dual: DkimKey | None = _opt(_dkim_key, None)  # noqa: RUF009


_parse_dkim_domains = _policy_tables(DkimDomain, "domains", parent="dkim")


def _dkim_domains(value: Any) -> dict[str, DkimDomain]:
    return _parse_dkim_domains(value)


@dataclass(frozen=True)
class DkimConfig:
    """``[dkim]``: DKIM signing at reception, by the From: header's domain."""

    # True: mail whose From: domain has no key (or no single From: domain) is refused with
    # 550 5.7.1 rather than sent unsigned.
    required: bool = _opt(_boolean, False)
    headers: tuple[str, ...] = _opt(_signed_headers, DEFAULT_HEADERS)
    oversign: tuple[str, ...] = _opt(_header_names, DEFAULT_OVERSIGN)
    expire: float = _opt(_duration_or_off, 0.0)  # the signature's x= after this long; 0: none
    domains: dict[str, DkimDomain] = _opt(_dkim_domains, dict)  # noqa: RUF009
    # Child processes that sign (off the event loop's GIL); 0: threads of the node itself.
    processes: int | str = _opt(_count_or_auto, "auto")




def _header_name(value: Any) -> str:
    value = _string(value)
    if value and not re.fullmatch(r"[!-9;-~]{1,76}", value):
        raise _Invalid(f"expected a header field name (or empty: off), got {value!r}")
    return value


def _weight(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise _Invalid(f"expected a weight 1-1000, got {value!r}")
    return value


@dataclass(frozen=True)
class TenantPolicy:
    """``[tenants."<name>"]``: one sender's share of the node (its weight against other
    tenants' backlogs) and its throttle, cluster-wide."""

    weight: int = _opt(_weight, 1)
    rate: float | None = _opt(_optional_rate, None)
    pool: str = _opt(_pool_name, "")  # its [egress.pools] pool; empty: the domain's or default
    # Its own webhook: this tenant's records are POSTed here too (signed with events_secret,
    # else [events] secret), from a cursor of its own.
    events_url: str = _opt(_webhook_url, "")
    events_secret: Secret | None = _opt(_secret, None)  # noqa: RUF009


def _tenant_policies(value: Any) -> dict[str, TenantPolicy]:
    # [tenants] names = { acme = { ... } }: the same as [tenants."acme"] tables.
    return _named_tables(TenantPolicy, "tenants")(value)


def _build_tenants(raw: Any, path: str) -> TenantsConfig:
    """``[tenants]``: its own keys, and a ``[tenants."<name>"]`` table per tenant (errors
    name that table)."""
    if not isinstance(raw, dict):
        raise ConfigError(path, "[tenants]", "expected a table")
    names: dict[str, TenantPolicy] = {}
    own_keys = {f.name for f in fields(TenantsConfig)}
    for name, table in raw.items():
        if not isinstance(table, dict) or name in own_keys:
            continue
        where = f'[tenants."{name[:80]}"]'
        if not TENANT_NAME.fullmatch(name):
            raise ConfigError(path, where, "a tenant name is 1-64 letters, digits, '.', '_' "
                                           "or '-', starting with a letter or digit")
        try:
            names[name] = TenantPolicy(**_table_values(TenantPolicy, table, ""))
        except _Invalid as exc:
            raise ConfigError(path, where, str(exc)) from None
    own = {k: v for k, v in raw.items() if not isinstance(v, dict) or k in own_keys}
    built = _build_section(TenantsConfig, own, path, "tenants")
    return replace(built, names={**built.names, **names})


@dataclass(frozen=True)
class TenantsConfig:
    """``[tenants]``: who a message is sent for (the tenant: the AUTH user's, from the users
    file, else the ``header``) and its campaign (``campaign_header``); both headers are
    removed at reception. ``[tenants."<name>"]`` tables set weights and throttles."""

    header: str = _opt(_header_name, "X-MTA-Tenant")
    campaign_header: str = _opt(_header_name, "X-MTA-Campaign")
    names: dict[str, TenantPolicy] = _opt(_tenant_policies, dict)  # noqa: RUF009


@dataclass(frozen=True)
class EventsConfig:
    """``[events]``: every accounting record POSTed to the sending application's webhook,
    in batches, signed with ``secret``, at least once (a cursor kept on disk)."""

    url: str = _opt(_webhook_url, "")  # empty: no webhook
    secret: Secret | None = _opt(_secret, None)  # noqa: RUF009
    batch_size: int = _opt(_positive_int, 500)  # records per POST at most
    timeout: float = _opt(parse_duration, 10.0)  # one POST; then retried, backing off
    retry_max: float = _opt(parse_duration, 60.0)  # the longest wait between retries
    cursor: str = _opt(_path, "")  # default: the accounting log's path + ".events-cursor"


# --- egress: the addresses mail leaves from ------------------------------------------------


def _bind_address(value: Any) -> str:
    value = _string(value).strip()
    if value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise _Invalid(f"expected an IP address of this host (or empty: the system's "
                           f"choice), got {_short(value)}") from None
    return value


_DAILY_RE = re.compile(r"\s*(\d+)\s*/\s*d\s*")


def _warmup(value: Any) -> tuple[int, ...]:
    """``["200/d", "500/d", 1000]``: one day's cap per step."""
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of daily caps such as [\"200/d\", \"500/d\"], got "
                       f"{_short(value)}")
    steps = []
    for raw in value:
        item = int(m.group(1)) if isinstance(raw, str) and (m := _DAILY_RE.fullmatch(raw)) \
            else raw
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise _Invalid(f"expected a daily cap such as \"200/d\" (or 200), got "
                           f"{_short(item)}")
        steps.append(item)
    return tuple(steps)


def _date(value: Any) -> datetime.date | None:
    if value in ("", None):
        return None
    if isinstance(value, datetime.date) and not isinstance(value, datetime.datetime):
        return value
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError:
        raise _Invalid(f"expected a date such as 2026-12-01, got {_short(value)}") from None


def _patterns(value: Any) -> tuple[re.Pattern[str], ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list of regular expressions, got {_short(value)}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise _Invalid(f"expected a non-empty regular expression, got {_short(item)}")
        try:
            out.append(re.compile(item, re.IGNORECASE))
        except re.error as exc:
            raise _Invalid(f"{_short(item)} is not a regular expression: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class SourceSitePolicy:
    """``[egress.sources."<name>".sites."<MX host or *.suffix>"]``: what one sending address
    may do at one site (large providers count per IP); rates here are this node's own."""

    max_connections: int | None = _opt(_positive_int, None)
    max_messages_per_connection: int | None = _opt(_positive_int, None)
    rate: float | None = _opt(_optional_rate, None)


_parse_source_sites = _policy_tables(SourceSitePolicy, "sites", parent="egress.sources.NAME")


def _source_sites(value: Any) -> dict[str, SourceSitePolicy]:
    return _parse_source_sites(value)


@dataclass(frozen=True)
class EgressSource:
    """``[egress.sources."<name>"]``: an address mail leaves from, the EHLO name that goes
    with it, and its warm-up ramp (a daily cap per site, one step per day from
    ``warmup_start``; past the last step, none)."""

    address: str = _opt(_bind_address, "")
    ehlo: str = _opt(_string, "")  # empty: [delivery] helo
    warmup: tuple[int, ...] = _opt(_warmup, tuple)
    warmup_start: datetime.date | None = _opt(_date, None)  # noqa: RUF009
    sites: dict[str, SourceSitePolicy] = _opt(_source_sites, dict)  # noqa: RUF009


def _pool_weights(value: Any) -> dict[str, int]:
    # ["a", "b"]: equal weights; {a = 3, b = 1}: weighted.
    if isinstance(value, list):
        value = dict.fromkeys(value, 1) if all(isinstance(v, str) for v in value) else value
    if not isinstance(value, dict) or not value:
        raise _Invalid(f"expected source names such as [\"ip1\", \"ip2\"] or weights such as "
                       f"{{ ip1 = 3, ip2 = 1 }}, got {_short(value)}")
    return {name: _weight(w) for name, w in value.items()}


@dataclass(frozen=True)
class EgressPool:
    """``[egress.pools."<name>"]``: sources taking turns by weight; ``over_cap``: when the
    chosen source has reached its warm-up cap at the site, ``spill`` (another source of the
    pool with room takes it) or ``wait`` (the message is deferred)."""

    sources: dict[str, int] = _opt(_pool_weights, dict)  # noqa: RUF009
    over_cap: str = _opt(_choice("spill", "wait"), "spill")


def _named_tables(cls: type, section: str) -> Callable[[Any], dict[str, Any]]:
    """A table of ``cls`` tables keyed by name (a tenant's, a source's, a pool's)."""
    def parse(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected tables like [{section}.\"name\"], got {_short(value)}")
        out = {}
        for name, table in value.items():
            if not TENANT_NAME.fullmatch(name):
                raise _Invalid(f"{name[:80]!r}: a name is 1-64 letters, digits, '.', '_' or "
                               "'-', starting with a letter or digit")
            if not isinstance(table, dict):
                raise _Invalid(f"{name!r}: expected a table of settings")
            out[name] = cls(**_table_values(cls, table, f"{name!r}."))
        return out
    return parse


# Replies that say the sending address is refused (a blocklist), not the message: the
# message is deferred (another source may take it), the source backs off at that site.
DEFAULT_BLOCK_PATTERNS = ("blocked using", "spamhaus", "blacklisted", "blocklisted",
                          "poor reputation")


@dataclass(frozen=True)
class EgressConfig:
    """``[egress]``: the sources (addresses) this node sends from and the pools a tenant or a
    domain picks; with none, mail leaves from the system's choice of address."""

    sources: dict[str, EgressSource] = _opt(_named_tables(EgressSource, "egress.sources"), dict)  # noqa: RUF009
    pools: dict[str, EgressPool] = _opt(_named_tables(EgressPool, "egress.pools"), dict)  # noqa: RUF009
    default_pool: str = _opt(_pool_name, "")  # mail no tenant or domain names a pool for
    # Warm-up counts (per source and site, today's) across restarts.
    state: str = _opt(_path, "./var/lib/egress.json")
    block_patterns: tuple[re.Pattern[str], ...] = _opt(
        _patterns, lambda: _patterns(list(DEFAULT_BLOCK_PATTERNS)))
    block_backoff: float = _opt(parse_duration, 600.0)  # first; doubles while blocks recur
    block_backoff_max: float = _opt(parse_duration, 4 * 3600.0)


def _optional_address(value: Any) -> str:
    value = _string(value)
    if value and (value.count("@") != 1 or not value.rpartition("@")[2]):
        raise _Invalid(f"expected an address like probe@example.com, got {value!r}")
    return value


@dataclass(frozen=True)
class ProbeConfig:
    """``[probe]``: a synthetic message through the node to a mailbox, timed end to end."""

    recipient: str = _opt(_optional_address, "")  # empty: no probe configured
    sender: str = _opt(_optional_address, "")  # default probe@<smtp hostname>
    interval: float = _opt(_duration_or_off, 0.0)  # 0: only on demand (mtactl probe)
    timeout: float = _opt(parse_duration, 60.0)


@dataclass(frozen=True)
class SloConfig:
    """``[slo]``: the objectives ``mtactl slo`` reports against."""

    availability: float = _opt(_ratio, 0.999)
    submit_p99: float = _opt(parse_duration, 1.0)
    delivery_success: float = _opt(_ratio, 0.999)
    sample_interval: float = _opt(parse_duration, 5.0)  # readiness sampling period


@dataclass(frozen=True)
class Config:
    """The whole node configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    egress: EgressConfig = field(default_factory=EgressConfig)
    source: str = "<defaults>"

    @property
    def standalone(self) -> bool:
        return not self.cluster.etcd


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "smtp": SmtpConfig,
    "spool": SpoolConfig,
    "admin": AdminConfig,
    "delivery": DeliveryConfig,
    "cluster": ClusterConfig,
    "probe": ProbeConfig,
    "slo": SloConfig,
    "dkim": DkimConfig,
    "tenants": TenantsConfig,
    "events": EventsConfig,
    "egress": EgressConfig,
}


def _build_section(cls: type, raw: Any, path: str, section: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"[{section}]", "expected a table")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                path, f"[{section}] {key}",
                f"unknown key; known keys are {', '.join(sorted(known))}",
            )
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        try:
            values[name] = f.metadata["parse"](raw[name])
        except _Invalid as exc:
            raise ConfigError(path, f"[{section}] {name}", str(exc)) from None
    return cls(**values)


def describe_ssl(exc: BaseException) -> str:
    """An ssl or file error in a few words (``No such file or directory``, ``no
    certificate or crl found``)."""
    return str(getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc)


def _ca_problem(path: str) -> str | None:
    """Why ``path`` does not load as PEM CA certificates (a TLS client's trust store)."""
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"cannot load {path!r} as CA certificates (PEM): {describe_ssl(exc)}"
    return None


def _bind_problem(address: str) -> str | None:
    """Why this host cannot send from ``address`` (not one of its addresses), or None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        return f"cannot send from {address}: {exc.strerror or exc} (is it an address of " \
               "this host?)"
    return None


def _check_egress(cfg: Config, path: str) -> None:
    """Pools name sources that exist, tenants and domains name pools that exist, and every
    source's address is one this host can bind."""
    egress = cfg.egress
    for name, source in egress.sources.items():
        if source.address and (problem := _bind_problem(source.address)):
            raise ConfigError(path, f'[egress.sources."{name}"] address', problem)
        if source.warmup and source.warmup_start is None:
            raise ConfigError(path, f'[egress.sources."{name}"] warmup_start',
                              "a warm-up ramp needs the day it starts (such as 2026-12-01)")
    for name, pool in egress.pools.items():
        for source in pool.sources:
            if source not in egress.sources:
                raise ConfigError(path, f'[egress.pools."{name}"] sources',
                                  f"no source {source!r}: define [egress.sources.\"{source}\"]"
                                  f" (known: {', '.join(sorted(egress.sources)) or 'none'})")
    known = ", ".join(sorted(egress.pools)) or "none"
    users = [("[egress] default_pool", egress.default_pool)]
    users += [(f'[tenants."{t}"] pool', p.pool) for t, p in cfg.tenants.names.items()]
    users += [(f'[delivery.domains."{d}"] pool', p.pool)
              for d, p in cfg.delivery.domains.items()]
    for key, pool_name in users:
        if pool_name and pool_name not in egress.pools:
            raise ConfigError(path, key, f"no pool {pool_name!r}: define [egress.pools."
                                         f"\"{pool_name}\"] (known: {known})")
    if egress.block_backoff > egress.block_backoff_max:
        raise ConfigError(path, "[egress] block_backoff",
                          f"expected at most block_backoff_max "
                          f"({egress.block_backoff_max:g}s), got {egress.block_backoff:g}s")


def _check_tenant_hooks(cfg: Config, path: str) -> None:
    for name, tenant in cfg.tenants.names.items():
        if tenant.events_url and tenant.events_secret is None and cfg.events.secret is None:
            raise ConfigError(path, f'[tenants."{name}"] events_secret',
                              "its webhook needs a secret to sign its POSTs (or set [events] "
                              "secret); e.g. the output of: openssl rand -hex 32")


def _check_consistency(cfg: Config, path: str) -> None:
    if cfg.events.url and cfg.events.secret is None:
        raise ConfigError(path, "[events] secret", "a webhook needs a secret to sign its "
                                                   "POSTs; e.g. the output of: openssl rand "
                                                   "-hex 32")
    _check_tenant_hooks(cfg, path)
    _check_egress(cfg, path)
    smtp = cfg.smtp
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        key = "tls_key" if smtp.tls_cert else "tls_cert"
        raise ConfigError(path, f"[smtp] {key}", "tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key", "users_file"):
        value = getattr(smtp, key)
        if value and not os.path.isfile(value):
            raise ConfigError(path, f"[smtp] {key}", f"file {value!r} does not exist")
    if cfg.delivery.tls_ca_file and (problem := _ca_problem(cfg.delivery.tls_ca_file)):
        raise ConfigError(path, "[delivery] tls_ca_file", problem)
    if smtp.reserved_connections is not None and (
            smtp.reserved_connections >= smtp.max_connections):
        raise ConfigError(path, "[smtp] reserved_connections",
                          f"expected fewer than max_connections ({smtp.max_connections}), "
                          f"got {smtp.reserved_connections}")
    if smtp.max_inflight_bytes < smtp.max_message_size:
        # A message of the largest size would never fit: its sender would retry forever.
        raise ConfigError(path, "[smtp] max_inflight_bytes",
                          f"expected at least max_message_size ({smtp.max_message_size}), "
                          f"got {smtp.max_inflight_bytes}")
    if cfg.spool.shards > 4096:
        raise ConfigError(path, "[spool] shards", "expected at most 4096 shards")
    if cfg.delivery.route_ttl_min > cfg.delivery.route_ttl_max:
        raise ConfigError(path, "[delivery] route_ttl_min",
                          f"expected at most route_ttl_max ({cfg.delivery.route_ttl_max:g}s), "
                          f"got {cfg.delivery.route_ttl_min:g}s")
    if cfg.spool.segment_size < 64 * 1024:
        raise ConfigError(path, "[spool] segment_size", "expected at least 64K")


# --- etcd access: TLS and users -----------------------------------------------------------

_ETCD_KEYS = ("etcd_ca", "etcd_cert", "etcd_key", "etcd_username", "etcd_password",
              "etcd_password_file")


def _pem_problem(path: str) -> str | None:
    """Why ``path`` is not a PEM file this node can read."""
    if problem := _file_problem(path):
        return problem
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024 * 1024)
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"
    return None if b"-----BEGIN " in head else f"{path!r} is not a PEM file (no -----BEGIN line)"


def _check_etcd(cluster: ClusterConfig, raw: Any, path: str) -> None:
    """The etcd TLS and user keys, alone and together (``raw``: the [cluster] table as
    written, for the endpoints' schemes)."""
    if not cluster.etcd:
        for key in _ETCD_KEYS:
            if getattr(cluster, key):
                raise ConfigError(path, f"[cluster] {key}",
                                  "set, but [cluster] etcd is empty (a standalone node reaches "
                                  f"no etcd): set [cluster] etcd, or remove {key}")
        return
    if bool(cluster.etcd_cert) != bool(cluster.etcd_key):
        missing = "etcd_key" if cluster.etcd_cert else "etcd_cert"
        raise ConfigError(path, f"[cluster] {missing}",
                          "etcd_cert and etcd_key go together (this node's client certificate "
                          "and its key): set both, or neither")
    for key in ("etcd_ca", "etcd_cert", "etcd_key"):
        value = getattr(cluster, key)
        if value and (problem := _pem_problem(value)):
            raise ConfigError(path, f"[cluster] {key}", problem)
    _check_etcd_tls_files(cluster, path)
    if cluster.etcd_password_file and (problem := _file_problem(cluster.etcd_password_file)):
        raise ConfigError(path, "[cluster] etcd_password_file", problem)
    if cluster.etcd_password is not None and cluster.etcd_password_file:
        raise ConfigError(path, "[cluster] etcd_password_file",
                          "set etcd_password or etcd_password_file, not both")
    has_password = cluster.etcd_password is not None or bool(cluster.etcd_password_file)
    if cluster.etcd_username and not has_password:
        raise ConfigError(path, "[cluster] etcd_password",
                          "etcd_username is set without a password: set etcd_password or "
                          "etcd_password_file too")
    if has_password and not cluster.etcd_username:
        raise ConfigError(path, "[cluster] etcd_username",
                          "a password is set without a user: set etcd_username too")
    written = raw.get("etcd") if isinstance(raw, dict) else None
    plain = [e for e in (written if isinstance(written, list) else [written])
             if isinstance(e, str) and e.strip().lower().startswith("http://")]
    if plain and (cluster.etcd_ca or cluster.etcd_cert):
        raise ConfigError(path, "[cluster] etcd",
                          f"{plain[0]!r} is plain http, but etcd_ca / etcd_cert make every "
                          "etcd connection TLS: write https://host:port (or host:port)")


# --- replication (issue 16): the keys are checked now, the node replicates later ----------


def _check_etcd_tls_files(cluster: ClusterConfig, path: str) -> None:
    """What gRPC would load at start (it says why only on stderr, and exits as if etcd were
    down): a CA that holds no certificate, a key that is not the certificate's."""
    if cluster.etcd_ca and (problem := _ca_problem(cluster.etcd_ca)):
        raise ConfigError(path, "[cluster] etcd_ca", problem)
    try:
        if cluster.etcd_cert:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cluster.etcd_cert,
                                                                    cluster.etcd_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(path, "[cluster] etcd_cert", f"cannot load {cluster.etcd_cert!r} "
                          f"with the key {cluster.etcd_key!r}: {describe_ssl(exc)}") from None


def _file_problem(path: str) -> str | None:
    """Why ``path`` cannot be read (open() is the test: permissions, ACLs and root alike;
    a FIFO or a device, which would block the open or the read, is refused first)."""
    try:
        if not os.path.isdir(path) and not stat.S_ISREG(os.stat(path).st_mode):
            return f"{path!r} is not a regular file"
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return f"file {path!r} does not exist"
    except IsADirectoryError:
        return f"{path!r} is a directory, expected a file"
    except OSError as exc:
        return f"cannot read {path!r}: {exc.strerror or exc}"


def _check_cluster_files(cluster: ClusterConfig, path: str) -> None:
    tls = {key: getattr(cluster, key) for key in ("tls_ca", "tls_cert", "tls_key")}
    if any(tls.values()) and not all(tls.values()):
        missing = next(key for key, value in tls.items() if not value)
        raise ConfigError(path, f"[cluster] {missing}",
                          "tls_ca, tls_cert and tls_key go together (mutual TLS needs the "
                          "cluster CA and this node's certificate and key): set all three, "
                          "or none")
    for key in ("tls_ca", "tls_cert", "tls_key", "secret_file"):
        value = getattr(cluster, key)
        if value and (problem := _file_problem(value)):
            raise ConfigError(path, f"[cluster] {key}", problem)
    if cluster.secret is not None and cluster.secret_file:
        raise ConfigError(path, "[cluster] secret_file",
                          "set secret or secret_file, not both")


def _read_secret_file(file: str, path: str, key: str, at_least: int, hint: str = "") -> Secret:
    """The content of ``file`` (named by ``key``) as a secret: surrounding whitespace (an
    editor's final newline) is not part of it. Only its length is ever reported."""
    if problem := _file_problem(file):
        raise ConfigError(path, key, problem)
    try:
        with open(file, "rb") as fh:
            data = fh.read(_MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise ConfigError(path, key, f"cannot read {file!r}: {exc.strerror or exc}") from None
    if len(data) > _MAX_SECRET_FILE:
        raise ConfigError(path, key, f"{file!r} is larger than "
                          f"{_MAX_SECRET_FILE // 1024}K: expected a file holding one secret")
    data = data.strip()
    if len(data) < at_least:
        raise ConfigError(path, key, f"{file!r} holds {len(data)} bytes, expected at least "
                          f"{at_least} (the value is not shown){hint}")
    return Secret(data)


def _read_secret_files(cluster: ClusterConfig, path: str) -> ClusterConfig:
    """``secret_file``'s content as ``secret``, ``etcd_password_file``'s as
    ``etcd_password``."""
    if cluster.secret_file:
        cluster = replace(cluster, secret=_read_secret_file(
            cluster.secret_file, path, "[cluster] secret_file", _MIN_SECRET,
            "; e.g. openssl rand -hex 32 > FILE"))
    if cluster.etcd_password_file:
        cluster = replace(cluster, etcd_password=_read_secret_file(
            cluster.etcd_password_file, path, "[cluster] etcd_password_file", 1))
    return cluster


def _check_replica_counts(cfg: Config, path: str, timeout_set: bool) -> None:
    spool, cluster = cfg.spool, cfg.cluster
    if spool.replicas > 1 and cfg.standalone:
        raise ConfigError(path, "[spool] replicas",
                          f"replicas = {spool.replicas} needs a cluster: a standalone node "
                          "has nobody to replicate to; set [cluster] etcd, or replicas = 1")
    if spool.min_insync > spool.replicas:
        raise ConfigError(path, "[spool] min_insync",
                          f"expected at most replicas ({spool.replicas}), got "
                          f"{spool.min_insync}: a message cannot be on more copies than "
                          "there are; lower min_insync or raise replicas")
    # With one copy replica_timeout is unused, and a short lease_ttl (2s) predates it:
    # checked when it matters, or when the operator wrote it.
    if (spool.replicas > 1 or timeout_set) and spool.replica_timeout >= cluster.lease_ttl:
        raise ConfigError(path, "[spool] replica_timeout",
                          f"expected less than [cluster] lease_ttl ({cluster.lease_ttl:g}s), "
                          f"got {spool.replica_timeout:g}s: the owner must drop a silent "
                          "follower before its own lease can expire; lower replica_timeout "
                          "or raise lease_ttl")


def _check_replication_peers(cfg: Config, path: str) -> None:
    cluster = cfg.cluster
    listen = cluster.replication_listen
    if cluster.replication_advertise is not None and listen is None:
        raise ConfigError(path, "[cluster] replication_advertise",
                          "advertises a replication listener that is not configured: set "
                          "[cluster] replication_listen too, or remove replication_advertise")
    if cfg.spool.replicas <= 1:
        return
    if listen is None:
        raise ConfigError(path, "[cluster] replication_listen",
                          f"[spool] replicas = {cfg.spool.replicas} (the default in a cluster) "
                          "needs a peer channel: set replication_listen = \"host:port\" (a "
                          "port peers can reach) and secret, or [spool] replicas = 1 if every "
                          "node mounts one shared spool directory")
    if cluster.replication_advertise is None and _is_wildcard(listen[0]):
        raise ConfigError(path, "[cluster] replication_advertise",
                          f"replication_listen is on {listen[0]!r}, an address no peer can "
                          "dial: set replication_advertise = \"host:port\" peers reach this "
                          "node at")
    if cluster.secret is None and not cluster.tls_cert:
        raise ConfigError(path, "[cluster] secret",
                          "replicas > 1 with neither a secret nor TLS: anyone who reaches "
                          "the replication port could inject mail; set secret (or "
                          "secret_file; at least 16 bytes, the same on every node) or "
                          "tls_ca, tls_cert and tls_key")


def _check_replication(cfg: Config, path: str, timeout_set: bool) -> Config:
    """The replication keys, alone and together; returns ``cfg`` with secret_file (and
    etcd_password_file) read."""
    _check_cluster_files(cfg.cluster, path)
    cfg = replace(cfg, cluster=_read_secret_files(cfg.cluster, path))
    _check_replica_counts(cfg, path, timeout_set)
    _check_replication_peers(cfg, path)
    return cfg


def _check_dkim(dkim: DkimConfig, path: str) -> None:
    """Every configured key is there, readable, and of its algorithm: a config error at
    start (and a failed reload that keeps the old keys), never mail sent unsigned."""
    for name, entry in dkim.domains.items():
        if entry.dual is not None and entry.dual.selector == entry.selector:
            raise ConfigError(path, f'[dkim.domains."{name}".dual] selector',
                              f"{entry.selector!r} is the first key's selector too: each key "
                              "needs its own (its own TXT record)")
        for where, key in ((f'[dkim.domains."{name}"]', entry),
                           (f'[dkim.domains."{name}".dual]', entry.dual)):
            if key is None:
                continue
            for need in ("selector", "key"):
                if not getattr(key, need):
                    raise ConfigError(path, f"{where} {need}", "required: the DKIM "
                                      f"{'selector' if need == 'selector' else 'private key file'}"
                                      " to sign with")
            try:
                load_key(key.key, key.selector, key.algorithm)
            except DkimKeyError as exc:
                raise ConfigError(path, f"{where} key", str(exc)) from None


def _expand_home(cfg_dict: dict[str, Any]) -> None:
    """Paths stay relative to the working directory (as the quick start expects); ``~`` expands."""
    for section in ("smtp", "spool", "cluster"):
        table = cfg_dict.get(section)
        if isinstance(table, dict):
            for key in ("tls_cert", "tls_key", "tls_ca", "users_file", "secret_file", "path",
                        "etcd_ca", "etcd_cert", "etcd_key", "etcd_password_file"):
                if isinstance(table.get(key), str) and table[key].startswith("~"):
                    table[key] = os.path.expanduser(table[key])


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a TOML config file; raise :class:`ConfigError` on any problem."""
    spath = str(path)
    raw = _read_toml(spath)
    try:
        return config_from_dict(raw, spath)
    except RecursionError:  # a deeply nested value in a known key, echoed in an error
        raise ConfigError(spath, "", "a value is nested too deeply") from None


def load_admin(path: str | os.PathLike[str]) -> AdminConfig:
    """Only the ``[admin]`` table of a config file (what mtactl needs to reach the node):
    a node's file that the running node accepts but this version would refuse elsewhere
    (after an upgrade that changed a default) still tells mtactl where the API is."""
    spath = str(path)
    raw = _read_toml(spath)
    try:
        return _build_section(AdminConfig, raw.get("admin", {}), spath, "admin")  # type: ignore[no-any-return]
    except RecursionError:
        raise ConfigError(spath, "", "a value is nested too deeply") from None


def _read_toml(spath: str) -> dict[str, Any]:
    try:
        with open(spath, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(spath, "", "file not found; pass --config PATH to an existing file"
                          ) from None
    except PermissionError:
        raise ConfigError(spath, "", "permission denied reading the config file") from None
    except IsADirectoryError:
        raise ConfigError(spath, "", "is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(spath, "", f"not valid TOML: {_one_line(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(spath, "", "not valid UTF-8 text") from None
    except RecursionError:
        raise ConfigError(spath, "", "not valid TOML: arrays or tables nested too deeply"
                          ) from None
    except (OSError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        # Whatever else the parser or the read may raise: one line, never a traceback.
        raise ConfigError(spath, "", f"cannot read the config file: {_one_line(exc)}") from None
    return raw


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Build a :class:`Config` from an already-parsed TOML document."""
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(
                source, f"[{key}]", f"unknown section; known sections are {', '.join(_SECTIONS)}"
            )
    _expand_home(raw)
    sections = {
        # [tenants."acme"] tables sit beside [tenants]'s own keys.
        name: _build_tenants(raw.get(name, {}), source) if name == "tenants"
        else _build_section(cls, raw.get(name, {}), source, name)
        for name, cls in _SECTIONS.items()
    }
    cfg = Config(**sections, source=source)
    _check_consistency(cfg, source)
    _check_etcd(cfg.cluster, raw.get("cluster"), source)
    _check_dkim(cfg.dkim, source)
    spool = raw.get("spool")
    if not cfg.standalone and not (isinstance(spool, dict) and "replicas" in spool):
        # A cluster keeps two copies of every shard unless told otherwise (a shared spool
        # directory: replicas = 1).
        given = isinstance(spool, dict) and "min_insync" in spool
        cfg = replace(cfg, spool=replace(cfg.spool, replicas=2, min_insync=(
            cfg.spool.min_insync if given else 2)))
    return _check_replication(cfg, source, isinstance(spool, dict) and "replica_timeout" in spool)
