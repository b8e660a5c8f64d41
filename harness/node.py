"""An ``mta`` daemon in a subprocess, on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.config import toml_dumps
from harness.net import free_port
from harness.poll import wait_until_sync


class NodeProcess:
    """An ``mta`` daemon in a subprocess, on free ports, with its config file in ``workdir``."""

    def __init__(self, workdir: Path, raw: dict[str, Any], env: dict[str, str] | None = None,
                 preexec: Any = None, smtp_port: int | None = None) -> None:
        self.workdir = workdir
        self.smtp_port = smtp_port or free_port()
        self.admin_port = free_port()
        raw = {k: dict(v) for k, v in raw.items()}
        raw["smtp"]["listen"] = f"127.0.0.1:{self.smtp_port}"
        raw["admin"]["listen"] = f"127.0.0.1:{self.admin_port}"
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(toml_dumps(raw))
        self.log_path = workdir / "node.log"
        self.env = {**os.environ, **(env or {})}
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> NodeProcess:
        """Start the daemon and return once its SMTP port greets."""
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mta", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            preexec_fn=self.preexec,  # noqa: PLW1509 (only setrlimit, before exec)
        )
        log.close()
        try:
            wait_until_sync(self._greets, timeout, "the node to open its SMTP port")
        except AssertionError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None
        return self

    def _greets(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
        with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.smtp_port), timeout=1) as s:
            s.recv(100)
            return True
        return False

    def log(self) -> str:
        """Everything the node wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the daemon if it still runs, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit; its exit code."""
        assert self.proc is not None
        return self.proc.wait(timeout)


@contextlib.contextmanager
def running_node(workdir: Path, raw: dict[str, Any], **kw: Any) -> Iterator[NodeProcess]:
    """A started ``NodeProcess``, killed on the way out."""
    node = NodeProcess(workdir, raw, **kw).start()
    try:
        yield node
    finally:
        node.kill()
