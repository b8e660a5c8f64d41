"""Every invalid thing an operator can type gets one line naming what is wrong, never a
traceback: every config key with every wrong kind of value, and bad command lines."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from mta.config import _SECTIONS, ConfigError, DomainPolicy, config_from_dict

BAD_VALUES = [True, False, [], ["x", 1], {}, {"a": 1}, "", "???", "-5", -1, 0, 10**30, 1.5,
              "1e9", "\x00", "ü" * 300, "127.0.0.1:99999", "999999999999999999999G"]


def _check(raw: dict, key: str) -> None:
    try:
        config_from_dict(raw, "/etc/mta/node.toml")
    except ConfigError as exc:
        text = str(exc)
        assert "\n" not in text, text
        assert text.startswith("/etc/mta/node.toml: ") and key in text, (key, text)


@pytest.mark.parametrize("section", sorted(_SECTIONS))
def test_every_key_with_every_wrong_value_is_a_config_error(section: str) -> None:
    for f in fields(_SECTIONS[section]):
        for value in BAD_VALUES:
            # Either accepted (some values are valid for some keys) or a ConfigError
            # naming the key: anything else propagating is a bug.
            _check({section: {f.name: value}}, f"[{section}] ")


def test_domain_policy_keys_and_odd_tables() -> None:
    for f in fields(DomainPolicy):
        for value in BAD_VALUES:
            _check({"delivery": {"domains": {"x.test": {f.name: value}}}}, "x.test")
    for value in BAD_VALUES:
        _check({"delivery": {"domains": value}}, "[delivery] domains")
        _check({"delivery": {"domains": {"x.test": value}}}, "x.test")
        _check({"smtp": value}, "[smtp]")


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env={"PATH": "", "MTACTL_URL": "",
                                                    "MTACTL_TOKEN": ""})


@pytest.mark.parametrize("argv", [
    ("mta",), ("mta", "--bogus"), ("mta", "--config"), ("mta", "-c", "/nonexistent.toml"),
    ("mta", "-c", "/"), ("mta", "-c", "/dev/null", "--check", "extra"),
    ("mta.cli.ctl",), ("mta.cli.ctl", "frobnicate"), ("mta.cli.ctl", "--url", "notaurl",
                                                     "status"),
    ("mta.cli.ctl", "--url", "http://127.0.0.1:99999", "status"),
    ("mta.cli.ctl", "--url", "http://127.0.0.1:1", "status"),
    ("mta.cli.ctl", "--config", "/nonexistent.toml", "status"),
    ("mta.cli.ctl", "throttle"), ("mta.cli.ctl", "throttle", "set", "x.test"),
    ("mta.cli.ctl", "throttle", "explode"), ("mta.cli.ctl", "message", "show"),
    ("mta.cli.ctl", "message", "bounce", "ID", "--domain", "x.test"),
    ("mta.cli.ctl", "queue", "--limit", "lots"), ("mta.cli.ctl", "rebalance", "--timeout", "-1"),
    ("mta.cli.ctl", "drain"), ("mta.cli.ctl", "slo", "--window"),
])
def test_bad_command_lines_get_one_line_and_a_usage_exit_code(
        argv: tuple[str, ...], tmp_path: Path) -> None:
    res = _run(*argv, cwd=tmp_path)
    assert res.returncode in (1, 2), res
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(("mta:", "mtactl:", "/")), res.stderr
