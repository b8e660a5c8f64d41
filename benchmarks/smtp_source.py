"""Postfix's ``smtp-source`` as a second load generator: C, one process, far cheaper per
message than ours, so on a small machine it leaves more CPU to the server measured."""

from __future__ import annotations

import shutil
import subprocess
import time

from benchmarks.harness import Tick
from benchmarks.loadgen import Load, fixed_size

__all__ = ["run_smtp_source", "smtp_source_missing"]


def smtp_source_missing() -> str | None:
    if shutil.which("smtp-source") is None:
        return ("smtp-source is not installed; it comes with Postfix: "
                "`apt-get install postfix`")
    return None


def run_smtp_source(port: int, load: Load, tick: Tick | None = None) -> int:
    """Send ``load`` with smtp-source; returns the messages it completed (it stops at the
    first refusal, so anything short of all of them fails the run)."""
    if (why := smtp_source_missing()) is not None:
        raise SystemExit(why)
    size = fixed_size(load.size)
    cmd = ["smtp-source", "-c", "-s", str(load.concurrency), "-m", str(load.messages),
           "-l", str(size), "-f", load.sender, "-t", load.rcpt, "-M", "load.example"]
    if load.reuse:
        cmd.append("-d")
    proc = subprocess.Popen([*cmd, f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    done = 0
    buf = b""
    t0 = time.time()
    # -c prints a running count ("\r123"); read it for progress.
    while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
        buf = (buf + chunk)[-64:]
        count = buf.replace(b"\r", b"\n").split(b"\n")
        for text in reversed(count):
            if text.strip().isdigit():
                now = int(text)
                if tick is not None and now > done:
                    tick(now - done)
                done = max(done, now)
                break
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise RuntimeError(f"smtp-source failed after {done} messages in "
                           f"{time.time() - t0:.1f} s: {err.strip()[-500:]}")
    if tick is not None and load.messages > done:
        tick(load.messages - done)
    return load.messages
