"""Durable ingress benchmark: N messages of S KB over C sessions into a real node.

    python -m benchmarks.ingress --messages 20000 --size 5 --concurrency 50 [--no-reuse]

Starts an ``mta`` node (subprocess, real spool on disk, fsync on), drives it with a pipelining
SMTP load generator spread over several processes, and reports msgs/s, submission latency
(end of DATA to the 250) p50/p99, and the node's group-commit batch size. ``--append`` adds a
row to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _free_port() -> int:
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


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def run_bench(messages: int, size_kb: float, concurrency: int, reuse: bool, procs: int,
              shards: int, log_level: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="mta-bench-", dir=str(ROOT / "var")
                                 if (ROOT / "var").exists() else None))
    smtp_port, admin_port = _free_port(), _free_port()
    cfg = work / "node.toml"
    cfg.write_text(
        f'[node]\nid = "bench"\nlog_format = "json"\nlog_level = "{log_level}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "bench.example"\n'
        f"max_connections = {concurrency * 2 + 10}\n"
        f"max_connections_per_ip = {concurrency * 2 + 10}\n"
        f'[spool]\npath = "{work / "spool"}"\nshards = {shards}\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        # Durable accept only; benchmarks/relay.py measures accept + delivery together.
        f'[delivery]\nenabled = false\naccounting_log = "{work / "acct.jsonl"}"\n'
    )
    log = open(work / "node.log", "wb")  # noqa: SIM115
    node = subprocess.Popen([sys.executable, "-m", "mta", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=work)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", smtp_port), 1).close()
                break
            except OSError:
                time.sleep(0.05)
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
        elapsed = time.time() - start_at
        for p in ps:
            p.join()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics").read().decode()
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        log.close()
    ok = sum(r[0] for r in results)
    lat = sorted(x for r in results for x in r[1])
    batches = _metric(metrics, "mta_spool_batch_records_count")
    records = _metric(metrics, "mta_spool_batch_records_sum")
    shutil.rmtree(work, ignore_errors=True)
    return {
        "accepted": ok,
        "seconds": elapsed,
        "msgs_per_s": ok / elapsed,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "batch": records / batches if batches else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--size", type=float, default=5.0, help="message size in KB")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes")
    ap.add_argument("--no-reuse", action="store_true", help="one connection per message")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    ap.add_argument("--append", action="store_true", help="append a row to RESULTS.md")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    runs = [run_bench(args.messages, args.size, args.concurrency, not args.no_reuse, args.procs,
                      args.shards, args.log_level) for _ in range(args.repeat)]
    runs.sort(key=lambda r: r["msgs_per_s"])
    res = runs[len(runs) // 2]
    mode = "no reuse" if args.no_reuse else "reuse"
    spread = f"{runs[0]['msgs_per_s']:.0f}-{runs[-1]['msgs_per_s']:.0f}"
    print(f"ingress {mode}: {res['accepted']:.0f} x {args.size:g} KB over {args.concurrency} "
          f"sessions: median {res['msgs_per_s']:.0f} msg/s (min-max {spread} over "
          f"{len(runs)} runs); p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms; "
          f"batch {res['batch']:.1f} records/fsync")
    if args.append:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        row = (f"| {time.strftime('%Y-%m-%d')} | {commit} | {mode} | {res['accepted']:.0f} | "
               f"{args.size:g} KB | {args.concurrency} | {res['msgs_per_s']:.0f} ({spread}) | "
               f"{res['p50_ms']:.2f} | {res['p99_ms']:.2f} | {res['batch']:.1f} | "
               f"{platform.python_version()}, {os.cpu_count()} cores | {args.note} |\n")
        with open(RESULTS, "a") as fh:
            fh.write(row)


if __name__ == "__main__":
    main()
