"""Recovery: how long a node takes to come back with N messages queued, and its RSS per message.

    python -m benchmarks.recovery --messages 100000 [--size 1] [--delivery] [--append]

Fills a spool with N messages (through the Spool API, in big batches: fast), then starts a
node process on it and measures the time from exec to the SMTP port answering (recovery of
every shard: scan, crc check, index) and the node's RSS once up, minus the RSS of the same
node on an empty spool. With ``--delivery`` the node also schedules every message (one attempt
at a time to a closed port, so the backlog stays) and the figure includes the scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, add_rows, free_port, git_commit, machine

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


async def _fill(spool_dir: Path, messages: int, size_kb: float, shards: int) -> None:
    from mta.envelope import Envelope
    from mta.logs import configure_logging
    from mta.spool import Spool

    configure_logging("console", "warning", "filler")

    spool = Spool(spool_dir, "filler", shards=shards, hot_cache_bytes=0)
    await spool.start()
    for n in range(shards):
        await spool.acquire_shard(n, 1)
    body = b"Subject: backlog\r\n\r\n" + b"x" * int(size_kb * 1024)
    batch = 2000
    for start in range(0, messages, batch):
        await asyncio.gather(*(spool.submit(Envelope("app@example.com",
                                                     [f"r{start + i}@held.example"]), body)
                               for i in range(min(batch, messages - start))))
    await spool.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _boot(work: Path, spool_dir: Path, shards: int, delivery: bool) -> tuple[float, int]:
    """Start a node on ``spool_dir``: (seconds until SMTP answers, RSS kB once up)."""
    port, admin = free_port(), free_port()
    cfg = work / "node.toml"
    cfg.write_text(
        f'[node]\nid = "recovery"\nlog_level = "warning"\nlog_format = "json"\n'
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "bench.example"\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
        f'[spool]\npath = "{spool_dir}"\nshards = {shards}\n'
        f'[delivery]\nenabled = {"true" if delivery else "false"}\n'
        f'smarthost = "127.0.0.1:9"\nretry_initial = "1h"\nmax_inflight = 1\n'
        f'accounting_log = "{work / "acct.jsonl"}"\n')
    t0 = time.monotonic()
    node = subprocess.Popen([sys.executable, "-m", "mta", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if node.poll() is not None:
                    raise RuntimeError("node exited during recovery") from None
                time.sleep(0.02)
        up = time.monotonic() - t0
        time.sleep(2.0)  # let startup garbage settle
        return up, _rss_kb(node.pid)
    finally:
        node.kill()
        node.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=float, default=1.0, help="body KB")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--delivery", action="store_true")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    (ROOT / "var").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mta-recovery-", dir=ROOT / "var"))
    try:
        empty_up, empty_rss = _boot(work, work / "empty", args.shards, args.delivery)
        t0 = time.monotonic()
        asyncio.run(_fill(work / "spool", args.messages, args.size, args.shards))
        fill = time.monotonic() - t0
        disk = sum(f.stat().st_size for f in (work / "spool").rglob("*") if f.is_file())
        up, rss = _boot(work, work / "spool", args.shards, args.delivery)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_msg = (rss - empty_rss) * 1024 / args.messages
    print(f"recovery: {args.messages} messages ({disk / 1e6:.0f} MB on disk, filled in "
          f"{fill:.1f}s): up in {up:.2f}s (empty spool {empty_up:.2f}s); RSS {rss / 1024:.0f} MB"
          f" (empty {empty_rss / 1024:.0f} MB): {per_msg:.0f} bytes per queued message"
          + (" with delivery scheduling" if args.delivery else ", delivery off"))
    if args.append:
        add_rows(RESULTS, "recovery",
                 f"| {time.strftime('%Y-%m-%d')} | {git_commit()} | {args.messages} | "
                 f"{args.size:g} KB | {'on' if args.delivery else 'off'} | {up:.2f} | "
                 f"{per_msg:.0f} | {machine()} |\n")


if __name__ == "__main__":
    main()
