"""The shipped systemd units pass ``systemd-analyze verify`` (with their binaries pointed at
this checkout's), and keep the hardening the operations guide promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

UNITS = ROOT / "systemd"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (apt install systemd)")


def _verify(unit_dir: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_dir / unit)],
                          capture_output=True, text=True, timeout=60)


def _install(tmp_path: Path, name: str) -> Path:
    text = (UNITS / name).read_text()
    text = text.replace("/opt/mta/.venv/bin/mta", str(BIN / "mta"))
    text = text.replace("/usr/local/bin/etcd", str(BIN / "etcd"))
    (tmp_path / name).write_text(text)
    return tmp_path


def test_node_unit_verifies_with_its_etcd_drop_in(tmp_path: Path) -> None:
    unit_dir = _install(tmp_path, "mta@.service")
    shutil.copytree(UNITS / "mta@.service.d", tmp_path / "mta@.service.d")
    _install(tmp_path, "etcd-mta.service")
    res = _verify(unit_dir, "mta@node1.service")
    assert res.returncode == 0, res.stderr
    assert "Unknown" not in res.stderr and "ignoring" not in res.stderr, res.stderr


def test_etcd_example_unit_verifies(tmp_path: Path) -> None:
    res = _verify(_install(tmp_path, "etcd-mta.service"), "etcd-mta.service")
    assert res.returncode == 0, res.stderr
    assert "Unknown" not in res.stderr and "ignoring" not in res.stderr, res.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    # The check above is only worth something if verify fails on a bad unit here.
    (tmp_path / "bad@.service").write_text(
        (UNITS / "mta@.service").read_text().replace("/opt/mta/.venv/bin/mta", "/nonexistent"))
    assert _verify(tmp_path, "bad@x.service").returncode != 0


def test_node_unit_has_notify_watchdog_restart_and_hardening() -> None:
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1]
             for line in (UNITS / "mta@.service").read_text().splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify" and lines["Restart"] == "on-failure"
    assert float(lines["WatchdogSec"]) > 0 and lines["ExecReload"].endswith("-HUP $MAINPID")
    assert lines["ProtectSystem"] == "strict" and lines["NoNewPrivileges"] == "yes"
    assert lines["PrivateTmp"] == "yes" and lines["ReadWritePaths"] == "/var/lib/mta"
    assert lines["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
