"""Prometheus's ``promtool`` for the alert-rule tests, fetched on first use.

promtool is not on PyPI, so the test extras cannot bring it. Lookup order: ``$PROMTOOL``,
``PATH``, then a cached copy under the repository's git-ignored ``var/tools/``. When none is
there, the binary is taken out of Debian's ``prometheus`` package with ``apt-get download``
and ``dpkg-deb -x`` into a temporary directory: nothing is installed system-wide and no root
is needed (unless the apt package lists are empty, in which case root runs ``apt-get update``
once). promtool is a static Go binary, so the copied file runs on its own.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_FIX = ("install Debian's `prometheus` package (apt-get install prometheus) or set PROMTOOL "
        "to a promtool binary")


class PromtoolUnavailable(RuntimeError):
    """No promtool could be found or fetched; the message says what failed and the fix."""


def cache_dir() -> Path:
    """Where the fetched promtool is kept: the checkout's ignored var/, else the venv's."""
    base = _REPO if (_REPO / "pyproject.toml").is_file() else Path(sys.prefix)
    return base / "var" / "tools"


def promtool() -> str:
    """Path of a runnable promtool, fetching it into the cache if needed."""
    env = os.environ.get("PROMTOOL")
    if env:
        if not os.access(env, os.X_OK):
            raise PromtoolUnavailable(f"PROMTOOL={env} is not an executable file; {_FIX}")
        return env
    found = shutil.which("promtool")
    if found:
        return found
    cached = cache_dir() / "promtool"
    if os.access(cached, os.X_OK):  # the fast path once fetched: no lock, no subprocess
        return str(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers (or two test runs) may get here together: one fetches, the others
    # wait on the lock and then find the file.
    with open(cached.parent / "promtool.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.access(cached, os.X_OK):
            _fetch(cached)
    return str(cached)


# Under pytest's 120s per-test timeout: our message, not a bare timeout, says what hung.
_STEP_TIMEOUT = 90


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=_STEP_TIMEOUT)
    except FileNotFoundError:
        raise PromtoolUnavailable(f"no promtool, and `{cmd[0]}` is not on PATH to fetch it "
                                  f"(not a Debian system?); {_FIX}") from None
    except subprocess.TimeoutExpired:
        raise PromtoolUnavailable(f"no promtool, and `{' '.join(cmd)}` took over "
                                  f"{_STEP_TIMEOUT}s; {_FIX}") from None


def _download(work: Path) -> Path:
    """The prometheus .deb in ``work``, downloaded by apt-get."""
    cmd = ["apt-get", "download", "prometheus"]
    result = _run(cmd, work)
    if result.returncode != 0 and os.geteuid() == 0:
        # A fresh container ships empty package lists: "Unable to locate package".
        update = _run(["apt-get", "update"], work)
        if update.returncode == 0:
            result = _run(cmd, work)
    debs = sorted(work.glob("prometheus_*.deb"))
    if result.returncode != 0 or not debs:
        raise PromtoolUnavailable(
            f"no promtool, and `apt-get download prometheus` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-500:]}; {_FIX}")
    return debs[-1]


def _fetch(dest: Path) -> None:
    """Put promtool from Debian's prometheus package at ``dest``, atomically."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="fetch-") as tmp:
        work = Path(tmp)
        deb = _download(work)
        tree = work / "tree"
        result = _run(["dpkg-deb", "-x", str(deb), str(tree)], work)
        binary = tree / "usr" / "bin" / "promtool"
        if result.returncode != 0 or not binary.is_file():
            raise PromtoolUnavailable(
                f"no promtool, and unpacking {deb.name} failed: "
                f"{result.stderr.strip()[-500:] or 'no usr/bin/promtool in it'}; {_FIX}")
        staged = dest.with_name(f".promtool-{os.getpid()}")
        shutil.copy2(binary, staged)
        staged.chmod(0o755)
        staged.replace(dest)  # the others see either no file or the whole binary
