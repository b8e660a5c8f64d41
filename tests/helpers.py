"""Shared test helpers: free ports, configs, node subprocesses, message builders."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mta.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_config(spool: Path, /, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a test node on free loopback ports; ``sections`` override keys."""
    raw: dict[str, Any] = {
        "node": {"id": "test-node", "log_format": "json", "log_level": "warning"},
        "smtp": {"listen": "127.0.0.1:0", "hostname": "mx.test.example"},
        "spool": {"path": str(spool), "shards": 4},
        "admin": {"listen": "127.0.0.1:0", "token": "t0ken"},
        # Ingress and spool tests keep what they submit; delivery tests turn this on.
        "delivery": {"enabled": False, "accounting_log": str(spool.parent / "accounting.jsonl")},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def make_config(spool: Path, /, **sections: dict[str, Any]) -> Config:
    return config_from_dict(node_config(spool, **sections), "<test>")


def toml_dumps(raw: dict[str, Any]) -> str:
    """Just enough TOML for test configs (tables of scalars and lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def key(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'

    out: list[str] = []

    def table(path: str, tbl: dict[str, Any]) -> None:
        out.append(f"[{path}]")
        out.extend(f"{key(k)} = {value(v)}" for k, v in tbl.items() if not isinstance(v, dict))
        out.append("")
        for k, v in tbl.items():
            if isinstance(v, dict):
                table(f"{path}.{key(k)}", v)

    for section, tbl in raw.items():
        table(section, tbl)
    return "\n".join(out)


def message(n: int, size: int = 2048, extra_headers: str = "") -> bytes:
    """A unique test message with CRLF line endings, about ``size`` bytes."""
    head = (f"From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: test {n}\r\n"
            f"Message-ID: <test-{n}@example.com>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"X-Test-Id: {n}\r\n{extra_headers}\r\n")
    line = f"message {n} line ".ljust(76, "x") + "\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return (head + body).encode()


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
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mta", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            preexec_fn=self.preexec,  # noqa: PLW1509 (only setrlimit, before exec)
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.smtp_port), timeout=1
            ) as s:
                s.recv(100)
                return self
            time.sleep(0.05)
        raise RuntimeError(f"node did not open its SMTP port:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)


@contextlib.contextmanager
def running_node(workdir: Path, raw: dict[str, Any], **kw: Any) -> Iterator[NodeProcess]:
    node = NodeProcess(workdir, raw, **kw).start()
    try:
        yield node
    finally:
        node.kill()


def read_spool(path: Path, shards: int) -> dict[str, Any]:
    """Open a spool the way a restarted node would and return {id: StoredMessage}."""
    import asyncio

    from mta.spool import Spool

    async def run() -> dict[str, Any]:
        spool = Spool(path, "reader", shards=shards)
        await spool.start()
        out = {}
        try:
            for n in range(shards):
                await spool.acquire_shard(n, time.time_ns())
                for ref in spool.live_messages(n):
                    out[ref.id] = await spool.load(ref.id)
        finally:
            await spool.close()
        return out

    return asyncio.run(run())
