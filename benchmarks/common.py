"""Shared benchmark plumbing: a node subprocess, the SMTP load generator, the commit id."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _body(size_kb: float, n: int) -> bytes:
    head = (f"From: bench@example.com\r\nTo: sink@example.org\r\nSubject: bench {n}\r\n"
            f"Message-ID: <bench-{n}@example.com>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    count = max(1, int(size_kb * 1024 - len(head)) // len(line))
    return head.encode() + line * count


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _session_reuse(port: int, count: int, body: bytes, lat: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO load.example\r\n")
    await _reply(reader)
    ok = 0
    payload = body + b".\r\n"
    for _ in range(count):
        # PIPELINING: envelope and DATA in one write, then the body.
        writer.write(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
        for _r in range(3):
            await _reply(reader)
        t0 = time.perf_counter()
        writer.write(payload)
        line = await _reply(reader)
        lat.append(time.perf_counter() - t0)
        ok += line.startswith(b"250")
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()
    return ok


async def _one_shot(port: int, body: bytes, lat: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO load.example\r\n")
    await _reply(reader)
    writer.write(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
    for _r in range(3):
        await _reply(reader)
    t0 = time.perf_counter()
    writer.write(body + b".\r\n")
    line = await _reply(reader)
    lat.append(time.perf_counter() - t0)
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()
    return int(line.startswith(b"250"))


async def _session_no_reuse(port: int, count: int, body: bytes, lat: list[float]) -> int:
    ok = 0
    for _ in range(count):
        ok += await _one_shot(port, body, lat)
    return ok


def _worker(port: int, sessions: int, per_session: int, size_kb: float, reuse: bool,
            start_at: float, out: mp.Queue) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = _body(size_kb, os.getpid())
    lat: list[float] = []

    async def run() -> int:
        while time.time() < start_at:
            await asyncio.sleep(0.005)
        fn = _session_reuse if reuse else _session_no_reuse
        res = await asyncio.gather(*(fn(port, per_session, body, lat) for _ in range(sessions)))
        return sum(res)

    ok = asyncio.run(run())
    out.put((ok, lat))


def launch_node(work: Path, smtp_port: int, admin_port: int, concurrency: int,
                log_level: str, extra: str, smtp_extra: str = "", node_id: str = "bench"
                ) -> tuple[subprocess.Popen[bytes], Any]:
    """Write a node config (plus ``extra`` TOML, and ``smtp_extra`` keys in ``[smtp]``) under
    ``work``, start ``mta``, wait for SMTP."""
    cfg = work / "node.toml"
    cfg.write_text(
        f'[node]\nid = "{node_id}"\nlog_format = "json"\nlog_level = "{log_level}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "bench.example"\n'
        f"max_connections = {concurrency * 2 + 10}\n"
        f"max_connections_per_ip = {concurrency * 2 + 10}\n" + smtp_extra +
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n' + extra
    )
    log = open(work / "node.log", "wb")  # noqa: SIM115 (closed by stop_node)
    node = subprocess.Popen([sys.executable, "-m", "mta", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=work)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", smtp_port), 1).close()
            break
        except OSError:
            time.sleep(0.05)
    return node, log


def stop_node(node: subprocess.Popen[bytes], log: Any) -> None:
    node.send_signal(signal.SIGTERM)
    node.wait(60)
    log.close()


def run_load(smtp_port: int, messages: int, concurrency: int, procs: int, size_kb: float,
             reuse: bool) -> tuple[list[tuple[int, list[float]]], float]:
    """Drive the node from ``procs`` processes; returns per-process (ok, latencies) and the
    common start time."""
    per_proc = [concurrency // procs + (1 if i < concurrency % procs else 0)
                for i in range(procs)]
    per_session = max(1, messages // concurrency)
    out: mp.Queue = mp.Queue()
    start_at = time.time() + 0.5
    ps = [mp.Process(target=_worker, args=(smtp_port, n, per_session, size_kb, reuse,
                                            start_at, out)) for n in per_proc if n]
    for p in ps:
        p.start()
    results = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return results, start_at


def machine() -> str:
    """The machine column of every results table."""
    return f"{platform.python_version()}, {os.cpu_count()} cores"


def add_rows(path: Path, table: str, rows: str) -> None:
    """Add ``rows`` at the end of the results table marked ``<!-- TABLE rows -->`` in ``path``
    (appending to the file would put them under whichever table happens to come last)."""
    marker = f"<!-- {table} rows -->\n"
    text = path.read_text()
    if marker not in text:
        raise SystemExit(f"{path}: no {marker.strip()} line ending the {table} table")
    path.write_text(text.replace(marker, rows + marker, 1))


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()

