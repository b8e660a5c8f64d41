"""End-to-end relay benchmark: submit N x S KB into a node, measure until a sink has them all.

    python -m benchmarks.relay --messages 10000 --route smarthost|mx [--repeat 3] [--append]

The node runs with delivery on (real spool, fsync, real outbound SMTP via aiosmtplib); the
sink is a minimal pipelining SMTP server in its own process. msg/s counts from the start of
submission to the moment the sink holds every message; delivery latency (reception to remote
250) comes from the node's accounting log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    ROOT,
    add_rows,
    free_port,
    git_commit,
    launch_node,
    machine,
    run_load,
    stop_node,
)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


class _SinkProtocol(asyncio.Protocol):
    """Just enough SMTP to accept mail fast: pipelining, no checks."""

    def __init__(self, counter: mp.Value) -> None:  # type: ignore[valid-type]
        self.counter = counter
        self.buf = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 sink ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buf = self.buf[end + 5:]
                self.in_data = False
                with self.counter.get_lock():
                    self.counter.value += 1
                out.append(b"250 2.0.0 ok\r\n")
                continue
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                break
            line, self.buf = self.buf[:eol].upper(), self.buf[eol + 2:]
            if line.startswith(b"EHLO"):
                out.append(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
            elif line.startswith(b"DATA"):
                out.append(b"354 go\r\n")
                self.in_data = True
                # A body can start in the same packet: the "\r\n" before "." may be the
                # DATA line's own, so look for a lone "." line from here.
                self.buf = b"\r\n" + self.buf
            elif line.startswith(b"QUIT"):
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))  # type: ignore[attr-defined]
                self.transport.close()
                return
            else:
                out.append(b"250 ok\r\n")
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


def _sink_main(host: str, port: int, counter: mp.Value, ready: mp.Event) -> None:  # type: ignore[valid-type]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _SinkProtocol(counter), host, port, backlog=1024)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(run())


def run_relay(messages: int, size_kb: float, concurrency: int, procs: int, route: str,
              max_connections: int) -> dict[str, float]:
    (ROOT / "var").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mta-relay-", dir=ROOT / "var"))
    smtp_port, admin_port = free_port(), free_port()
    sink_port = free_port()
    counter = mp.Value("q", 0)
    ready = mp.Event()
    sink = mp.Process(target=_sink_main, args=("127.0.0.2" if route == "mx" else "127.0.0.1",
                                               sink_port, counter, ready), daemon=True)
    sink.start()
    ready.wait(10)
    dns = None
    if route == "mx":
        from tests.mailworld import DNSServer

        # The load generator addresses sink@example.org.
        dns = DNSServer({"example.org": {"MX": [(10, "mx.example.org")]},
                         "mx.example.org": {"A": ["127.0.0.2"]}})
        delivery = (f'nameservers = ["127.0.0.1:{dns.port}"]\nmx_port = {sink_port}\n')
    else:
        delivery = f'smarthost = "127.0.0.1:{sink_port}"\n'
    acct = work / "acct.jsonl"
    node, log = launch_node(
        work, smtp_port, admin_port, concurrency, "warning",
        f'[spool]\npath = "{work / "spool"}"\n'
        f'[delivery]\n{delivery}max_connections = {max_connections}\n'
        f'max_messages_per_connection = 1000\naccounting_log = "{acct}"\n')
    try:
        results, start_at = run_load(smtp_port, messages, concurrency, procs, size_kb, True)
        accepted = sum(r[0] for r in results)
        total = max(1, messages // concurrency) * concurrency
        ingress_done = time.time()
        deadline = time.time() + 120
        while counter.value < accepted and time.time() < deadline:
            time.sleep(0.01)
        elapsed = time.time() - start_at
        time.sleep(0.5)  # let the accounting log flush
    finally:
        stop_node(node, log)
        sink.kill()
        if dns is not None:
            dns.close()
    received: dict[str, float] = {}
    latencies = []
    for line in acct.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "Reception":
            received[rec["message_id"]] = rec["time"]
        elif rec["type"] == "Delivery" and rec["message_id"] in received:
            latencies.append(rec["time"] - received[rec["message_id"]])
    latencies.sort()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "submitted": total, "accepted": accepted, "delivered": counter.value,
        "seconds": elapsed, "ingress_seconds": ingress_done - start_at,
        "msgs_per_s": counter.value / elapsed,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=float, default=5.0, help="message size in KB")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--procs", type=int, default=1, help="load generator processes")
    ap.add_argument("--route", choices=("smarthost", "mx"), default="smarthost")
    ap.add_argument("--max-connections", type=int, default=20,
                    help="outbound connections to the sink")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    runs = sorted((run_relay(args.messages, args.size, args.concurrency, args.procs, args.route,
                             args.max_connections) for _ in range(args.repeat)),
                  key=lambda r: r["msgs_per_s"])
    res = runs[len(runs) // 2]
    spread = f"{runs[0]['msgs_per_s']:.0f}-{runs[-1]['msgs_per_s']:.0f}"
    print(f"relay {args.route}: {res['delivered']:.0f}/{res['accepted']:.0f} delivered x "
          f"{args.size:g} KB: median {res['msgs_per_s']:.0f} msg/s end to end (min-max {spread} "
          f"over {len(runs)} runs); delivery latency p50 {res['p50_ms']:.0f} ms, "
          f"p99 {res['p99_ms']:.0f} ms")
    if args.append:
        commit = git_commit()
        add_rows(RESULTS, "relay",
                 f"| {time.strftime('%Y-%m-%d')} | {commit} | {args.route} | "
                 f"{res['delivered']:.0f} | {args.size:g} KB | {args.concurrency} | "
                 f"{res['msgs_per_s']:.0f} ({spread}) | {res['p50_ms']:.0f} | "
                 f"{res['p99_ms']:.0f} | {machine()} | {args.note} |\n")


if __name__ == "__main__":
    main()
