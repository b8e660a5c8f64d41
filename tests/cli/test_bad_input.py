"""Every invalid thing an operator can type gets one line naming what is wrong, never a
traceback: every config key with every wrong kind of value, and bad command lines."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from mta.config import _SECTIONS, ConfigError, DomainPolicy, config_from_dict

BAD_VALUES = [True, False, [], ["x", 1], {}, {"a": 1}, "", "???", "-5", -1, 0, 10**30, 1.5,
              "1e9", "\x00", "ü" * 300, "127.0.0.1:99999", "999999999999999999999G"]

# Which of BAD_VALUES (by index) each field parser accepts: every other one must be refused
# with a ConfigError naming the key. Text settings take any text without control characters.
_TEXT = {6, 7, 8, 13, 15, 16, 17}
ACCEPTED_BY_PARSER: dict[str, set[int]] = {
    "parse_listen": set(),  # "host:port" with a port 0-65535 only
    "_port": set(),
    "_choice.<locals>.parse": set(),
    "_string": _TEXT,
    "_path": _TEXT,
    "_nonempty_string": _TEXT - {6},
    "_optional_address": {6},  # "" (none); an address needs one "@" and a domain
    "_node_id": {13, 17},  # letters, digits, ".", "_", "-"
    "_boolean": {0, 1},
    "_endpoints": {2},  # no etcd: standalone
    "_nameservers": {2},  # the system's resolvers
    "_networks": {2},
    "_domain_policies": {4},
    "_site_policies": {4},
    "_domain_tls": set(),
    "parse_duration": {12},  # positive numbers up to 10 years (10**30 s is not a timer)
    "_duration_or_off": {10, 12},  # and 0 for off
    "parse_size": {11, 17},  # positive integers, or digits with a unit
    "_positive_int": {11},
    "_non_negative_int": {10},
    "_count_or_auto": {10},  # "auto", or 0 to 64
    "_ratio": {10},  # 0 to 1
    "_optional_rate": {6},  # "" (none); a rate is "N/unit"
    "_optional_hostport": {6},  # "" (none)
    "_advertise": {6},  # "" (none); else "host:port" a peer can dial
    "_zone": {6, 13, 17},  # "" (none); letters, digits, ".", "_", "-"
    "_secret": {6, 15, 17},  # "" (none); else at least 16 bytes
    "_signed_headers": set(),  # header names, "from" among them
    "_header_names": {2},  # header names, or none
    "_dkim_domains": {4},
    "_header_name": {6, 7, 8, 13, 17},  # "" (off); a header field name
    "_tenant_policies": {4},  # no tenants
    "_webhook_url": {6},  # "" (off); an http(s) URL
    "_pool_name": {6, 13, 17},  # "" (none); letters, digits, ".", "_", "-"
    "_named_tables.<locals>.parse": {4},  # no sources, no pools
    "_patterns": {2},  # regular expressions, or none
}
# Keys where a check across keys, or the file system, refuses more than the parser does.
ACCEPTED_BY_KEY: dict[str, set[int]] = {
    "[smtp] tls_cert": {6}, "[smtp] tls_key": {6}, "[smtp] users_file": {6},  # must exist
    "[delivery] tls_ca_file": {6},  # must load as PEM CA certificates
    "[smtp] max_message_size": set(),  # beyond the default max_inflight_bytes
    "[spool] shards": set(),  # at most 4096
    "[spool] compact_live_ratio": {10},  # a ratio
    "[delivery] route_ttl_min": {12},  # at most route_ttl_max (default 1 h)
    "[delivery] route_ttl_max": set(),  # at least route_ttl_min (5 s), at most 10 years
    "[spool] replicas": set(),  # > 1 needs [cluster] etcd
    "[spool] min_insync": set(),  # at most replicas (default 1)
    "[cluster] secret_file": {6},  # must exist
    "[egress] default_pool": {6},  # must name a pool (these cases define none)
    "x.test.pool": {6},
    "[egress] block_backoff_max": set(),  # at least block_backoff (10 min)
    "[cluster] tls_ca": {6}, "[cluster] tls_cert": {6}, "[cluster] tls_key": {6},
    # the etcd TLS and user keys need [cluster] etcd (these cases set none)
    **{f"[cluster] etcd_{k}": {6} for k in ("ca", "cert", "key", "username", "password",
                                             "password_file")},
}
# A value the parser takes but a check across keys refuses names the other key.
NAMED_AS: dict[tuple[str, int], str] = {
    ("[smtp] max_message_size", 11): "[smtp] max_inflight_bytes",
    ("[smtp] max_message_size", 17): "[smtp] max_inflight_bytes",
    ("[delivery] route_ttl_max", 12): "[delivery] route_ttl_min",
    ("[egress] block_backoff_max", 12): "[egress] block_backoff",
    # a certificate without its key (or the other way round) names the one missing
    **{("[smtp] tls_cert", i): "[smtp] tls_key" for i in _TEXT - {6}},
    **{("[smtp] tls_key", i): "[smtp] tls_cert" for i in _TEXT - {6}},
    # the replication TLS files go in threes: one alone names the first missing
    **{("[cluster] tls_ca", i): "[cluster] tls_cert" for i in _TEXT - {6}},
    **{("[cluster] tls_cert", i): "[cluster] tls_ca" for i in _TEXT - {6}},
    **{("[cluster] tls_key", i): "[cluster] tls_ca" for i in _TEXT - {6}},
}


def _accepted(key: str, f: Any) -> set[int]:
    if key in ACCEPTED_BY_KEY:
        return ACCEPTED_BY_KEY[key]
    name = f.metadata["parse"].__qualname__
    assert name in ACCEPTED_BY_PARSER, f"{key}: say which of BAD_VALUES {name} accepts"
    return ACCEPTED_BY_PARSER[name]


def _check(raw: dict[str, Any], key: str, value: Any, accepted: bool) -> None:
    try:
        config_from_dict(raw, "/etc/mta/node.toml")
    except ConfigError as exc:
        text = str(exc)
        assert not accepted, f"{key} refused {value!r}, a valid value: {text}"
        assert "\n" not in text, text
        assert text.startswith("/etc/mta/node.toml: ") and key in text, (key, text)
    else:
        assert accepted, f"{key} accepted {value!r}"


@pytest.mark.parametrize("section", sorted(_SECTIONS))
def test_every_key_with_every_wrong_value_is_a_config_error(section: str) -> None:
    for f in fields(_SECTIONS[section]):
        key = f"[{section}] {f.name}"
        ok = _accepted(key, f)
        for i, value in enumerate(BAD_VALUES):
            _check({section: {f.name: value}}, NAMED_AS.get((key, i), key), value, i in ok)


def test_domain_policy_keys_and_odd_tables() -> None:
    for f in fields(DomainPolicy):
        ok = _accepted(f"x.test.{f.name}", f)
        for i, value in enumerate(BAD_VALUES):
            _check({"delivery": {"domains": {"x.test": {f.name: value}}}}, "x.test", value,
                   i in ok)
    for i, value in enumerate(BAD_VALUES):
        empty = i == 4  # {}: no policies, a policy of defaults, a section of defaults
        _check({"delivery": {"domains": value}}, "[delivery] domains", value, empty)
        _check({"delivery": {"domains": {"x.test": value}}}, "x.test", value, empty)
        _check({"smtp": value}, "[smtp]", value, empty)


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env={"PATH": "", "MTACTL_URL": "",
                                                    "MTACTL_TOKEN": ""})


# Each bad command line: the exit code (2: usage or config, 1: the node could not be asked)
# and what its one line must name.
BAD_COMMAND_LINES: list[tuple[tuple[str, ...], int, str]] = [
    (("mta",), 2, "required: --config/-c"),
    (("mta", "--bogus"), 2, "required: --config/-c"),  # argparse names the missing one first
    (("mta", "--config"), 2, "argument --config/-c: expected one argument"),
    (("mta", "-c", "/nonexistent.toml"), 2, "/nonexistent.toml: file not found"),
    (("mta", "-c", "/"), 2, "/: is a directory"),
    (("mta", "-c", "/dev/null", "--check", "extra"), 2, "unrecognized arguments: extra"),
    (("mta.cli.ctl",), 2, "required: COMMAND"),
    (("mta.cli.ctl", "frobnicate"), 2, "invalid choice: 'frobnicate'"),
    (("mta.cli.ctl", "--url", "notaurl", "status"), 2, "--url 'notaurl' is not an http:// URL"),
    (("mta.cli.ctl", "--url", "http://127.0.0.1:99999", "status"), 2, "has a bad port"),
    (("mta.cli.ctl", "--url", "http://127.0.0.1:1", "status"), 1,
     "node not reachable at http://127.0.0.1:1"),
    (("mta.cli.ctl", "--config", "/nonexistent.toml", "status"), 2,
     "/nonexistent.toml: file not found"),
    (("mta.cli.ctl", "throttle"), 2, "required: action"),
    (("mta.cli.ctl", "throttle", "set", "x.test"), 2, "throttle set needs KEY and SPEC"),
    (("mta.cli.ctl", "throttle", "explode"), 2, "argument action: invalid choice: 'explode'"),
    (("mta.cli.ctl", "message", "show"), 2, "message show needs a message ID"),
    (("mta.cli.ctl", "message", "bounce", "ID", "--domain", "x.test"), 2,
     "message bounce needs a message ID or --domain DOMAIN (not both)"),
    (("mta.cli.ctl", "queue", "--limit", "lots"), 2, "argument --limit: invalid int value"),
    (("mta.cli.ctl", "rebalance", "--timeout", "-1"), 2, "--timeout must be between 0 and 3600"),
    (("mta.cli.ctl", "drain"), 2, "required: node"),
    (("mta.cli.ctl", "slo", "--window"), 2, "argument --window: expected one argument"),
]


@pytest.mark.parametrize(("argv", "code", "names"), BAD_COMMAND_LINES,
                         ids=[" ".join(c[0]) for c in BAD_COMMAND_LINES])
def test_bad_command_lines_get_one_line_and_a_usage_exit_code(
        argv: tuple[str, ...], code: int, names: str, tmp_path: Path) -> None:
    res = _run(*argv, cwd=tmp_path)
    assert res.returncode == code, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    prog = "mta: " if argv[0] == "mta" else "mtactl: "
    assert len(lines) == 1 and lines[0].startswith(prog), res.stderr
    assert names in lines[0], res.stderr
