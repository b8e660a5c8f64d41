"""Recovery: how long a node takes to come back with N messages queued, and its RSS per message.

    python -m benchmarks recovery [--messages 100000,1000000] [--size 1] [--delivery]
                                  [--repeat 3]

Fills a spool with N messages (through the Spool API, in big batches: fast), then starts a
node process on it and measures the time from exec to the SMTP port answering (recovery of
every shard: scan, crc check, index) and the node's RSS once up, minus the RSS of the same
node on an empty spool. Each spool is booted ``--repeat`` times (min / median / max; the
page cache is warm, as after a process restart). With ``--delivery`` the node also schedules
every message (one attempt at a time to a closed port, so the backlog stays) and the figure
includes the scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import free_port, rss_kb
from benchmarks.harness import Result, Tick, common_options, finish, fmt, progress, sweep
from benchmarks.targets import workdir


async def _fill(spool_dir: Path, messages: int, size_kb: float, shards: int,
                tick: Tick) -> None:
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
        tick(min(batch, messages - start))
    await spool.close()


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
        return up, rss_kb(node.pid)
    finally:
        node.kill()
        node.wait()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks recovery",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", default="100000,1000000", help="queued messages, comma list")
    ap.add_argument("--size", type=float, default=1.0, help="body KB")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--delivery", action="store_true",
                    help="also schedule every message for delivery")
    common_options(ap, repeat=3)
    args = ap.parse_args()
    counts = sweep(args.messages)
    result = Result("recovery", vars(args))
    mode = "with delivery scheduling" if args.delivery else "delivery off"
    work = workdir("mta-recovery-")
    try:
        with progress(sum(counts) * (1 + args.repeat), "recovery (filled + recovered)") as bar:
            empty = [_boot(work, work / "empty", args.shards, args.delivery)
                     for _ in range(args.repeat)]
            empty_up = statistics.median(e[0] for e in empty)
            empty_rss = statistics.median(e[1] for e in empty)
            for n in counts:
                bar.status(f"filling {n}")
                spool = work / f"spool-{n}"
                t0 = time.monotonic()
                asyncio.run(_fill(spool, n, args.size, args.shards, bar.update))
                fill = time.monotonic() - t0
                disk = sum(f.stat().st_size for f in spool.rglob("*") if f.is_file())
                for i in range(args.repeat):
                    bar.status(f"boot {i + 1}/{args.repeat} with {n}")
                    up, rss = _boot(work, spool, args.shards, args.delivery)
                    bar.update(n)
                    run = {"seconds": up, "rss_mb": rss / 1024,
                           "bytes_per_msg": (rss - empty_rss) * 1024 / n,
                           "empty_seconds": empty_up, "fill_seconds": fill,
                           "disk_mb": disk / 1e6}
                    result.add({"messages": n, "delivery": args.delivery}, run)
                    bar.say(f"{n} messages, boot {i + 1}: up in {up:.2f} s, RSS "
                            f"{rss / 1024:.0f} MB, {run['bytes_per_msg']:.0f} bytes/msg")
                shutil.rmtree(spool, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"recovery {g['labels']['messages']} messages ({mode}): up in "
             f"{fmt(result.summary('seconds', **g['labels']), 2)} s, "
             f"{fmt(result.summary('bytes_per_msg', **g['labels']))} bytes RSS per queued "
             f"message (empty node: {empty_up:.2f} s, {empty_rss / 1024:.0f} MB)"
             for g in result.groups]
    finish(result, lines, args)


if __name__ == "__main__":
    main()
