"""The SMTP load generator: several processes of raw-socket asyncio sessions, so that it is
not the bottleneck, with or without connection reuse, fixed or mixed message sizes, closed
loop (as fast as replies come) or open loop (a fixed offered rate).

Every message carries a unique ``X-Bench-Id`` header; the generator returns the ids it got a
``250`` for (and when: ``acked_at``), so a relay run can check that each of them reached the
sink. ``Load.headers`` adds header lines to every message (``X-MTA-Tenant: bulk``).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from benchmarks.harness import Tick

# A marketing-platform mix (KB, weight): mostly small HTML mails, a tail of big ones.
MIX = [(4, 40), (16, 30), (48, 20), (128, 9), (512, 1)]
LINE = b"x" * 76 + b"\r\n"


def size_sampler(spec: str) -> Callable[[random.Random], int]:
    """Bytes per message from ``spec``: ``5`` (fixed KB), ``2-64`` (log-uniform KB range) or
    ``mix`` (the weighted MIX above)."""
    if spec == "mix":
        sizes, weights = zip(*MIX, strict=True)
        return lambda rng: int(rng.choices(sizes, weights)[0] * 1024)
    if "-" in spec:
        lo, hi = (math.log(float(x)) for x in spec.split("-", 1))
        return lambda rng: int(math.exp(rng.uniform(lo, hi)) * 1024)
    fixed = fixed_size(spec)
    return lambda rng: fixed


def fixed_size(spec: str) -> int:
    """Bytes of a fixed ``--size``; a distribution is refused (for clients that send one
    size only)."""
    if spec == "mix" or "-" in spec:
        raise SystemExit(f"--size {spec}: this client sends one fixed size; use --size N")
    return int(float(spec) * 1024)


def mean_size_kb(spec: str) -> float:
    if spec == "mix":
        return sum(k * w for k, w in MIX) / sum(w for _, w in MIX)
    if "-" in spec:
        lo, hi = (float(x) for x in spec.split("-", 1))
        return (hi - lo) / math.log(hi / lo)
    return float(spec)


def message(token: str, size: int, filler: bytes, headers: str = "") -> bytes:
    """A message of about ``size`` bytes; ``headers``: more header lines, each ending in
    CRLF."""
    head = (f"From: bench@example.com\r\nTo: sink@example.org\r\nSubject: bench {token}\r\n"
            f"Message-ID: <{token}@bench.example>\r\nX-Bench-Id: {token}\r\n{headers}"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n").encode()
    lines = max(1, (size - len(head)) // len(LINE))
    return head + filler[: lines * len(LINE)]


@dataclass(frozen=True)
class Load:
    """What to offer: ``rate`` 0 is closed loop (each session sends its next message when the
    last one is answered); otherwise messages are scheduled at ``rate`` msg/s over all
    processes and latency counts from the scheduled time (no coordinated omission)."""

    messages: int
    concurrency: int = 50
    procs: int = 2
    size: str = "5"
    reuse: bool = True
    rate: float = 0.0
    sender: str = "bench@example.com"
    rcpt: str = "sink@example.org"
    headers: str = ""  # more header lines for every message, each ending in CRLF


@dataclass
class LoadResult:
    accepted: int = 0
    refused: int = 0
    errors: int = 0  # sessions cut by a connection error
    unsent: int = 0  # messages those sessions never got to send
    latencies: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)  # time.time() of each id's 250
    bytes: int = 0
    start: float = 0.0
    end: float = 0.0

    @property
    def seconds(self) -> float:
        return max(1e-9, self.end - self.start)

    @property
    def msgs_per_s(self) -> float:
        return self.accepted / self.seconds


def _split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal shares (the first ones one larger)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        if line[3:4] != b"-":
            return line


class _Conn:
    def __init__(self, port: int, load: Load) -> None:
        self.port = port
        self.envelope = (f"MAIL FROM:<{load.sender}>\r\nRCPT TO:<{load.rcpt}>\r\n"
                         f"DATA\r\n").encode()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        await _reply(self.reader)
        self.writer.write(b"EHLO load.example\r\n")
        await _reply(self.reader)

    async def send(self, msg: bytes) -> tuple[bool, float]:
        """One transaction, envelope and DATA pipelined: (250?, time the final dot left)."""
        self.writer.write(self.envelope)
        replies = [await _reply(self.reader) for _ in range(3)]
        if not replies[2].startswith(b"354"):
            self.writer.write(b"RSET\r\n")
            await _reply(self.reader)
            return False, time.perf_counter()
        self.writer.write(msg + b".\r\n")
        sent = time.perf_counter()
        return (await _reply(self.reader)).startswith(b"250"), sent

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await _reply(self.reader)
        except (ConnectionError, OSError):
            pass
        self.writer.close()


class _Worker:
    def __init__(self, port: int, load: Load, index: int, sessions: int, count: int,
                 done: mp.Value) -> None:  # type: ignore[valid-type]
        self.port, self.load, self.index = port, load, index
        self.sessions, self.count, self.done = sessions, count, done
        self.res = LoadResult()
        rng = random.Random(index)  # same sizes for every target, run after run
        sample = size_sampler(load.size)
        self.sizes = [sample(rng) for _ in range(count)]
        self.filler = LINE * (max(self.sizes, default=0) // len(LINE) + 1)
        self.tag = f"{os.getpid()}.{int(time.time() * 1000) % 10**8}"
        self._unreported = 0

    def _record(self, k: int, ok: bool, t_sched: float, sent: float, size: int) -> None:
        now = time.perf_counter()
        if ok:
            self.res.accepted += 1
            self.res.ids.append(f"{self.tag}.{k}")
            self.res.acked_at.append(time.time())
            self.res.latencies.append(now - t_sched)
            self.res.service.append(now - sent)
            self.res.bytes += size
        else:
            self.res.refused += 1
        self._unreported += 1
        if self._unreported >= 25:
            with self.done.get_lock():
                self.done.value += self._unreported
            self._unreported = 0

    async def _transaction(self, conn: _Conn | None, k: int, t_sched: float | None
                           ) -> _Conn | None:
        """Send message ``k`` (connecting first when needed); returns the connection to
        reuse, or None."""
        if conn is None:
            conn = _Conn(self.port, self.load)
            await conn.open()
        msg = message(f"{self.tag}.{k}", self.sizes[k], self.filler, self.load.headers)
        ok, sent = await conn.send(msg)
        self._record(k, ok, sent if t_sched is None else t_sched, sent, len(msg))
        if not self.load.reuse:
            await conn.close()
            return None
        return conn

    async def _closed(self, ks: range) -> None:
        conn = None
        sent = 0
        try:
            for k in ks:
                conn = await self._transaction(conn, k, None)
                sent += 1
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            # The session is cut: what it did not send counts as unsent, never as nothing.
            self.res.errors += 1
            self.res.unsent += len(ks) - sent
            self._unreported += len(ks) - sent
        if conn is not None:
            await conn.close()

    async def _open(self, queue: asyncio.Queue[tuple[int, float] | None]) -> None:
        conn = None
        while (item := await queue.get()) is not None:
            try:
                conn = await self._transaction(conn, *item)
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                # As in the closed loop: the cut message counts as unsent, and the session
                # reconnects for the next one.
                self.res.errors += 1
                self.res.unsent += 1
                self._unreported += 1
                conn = None
        if conn is not None:
            await conn.close()

    async def run(self, start_at: float) -> LoadResult:
        while time.time() < start_at:
            await asyncio.sleep(0.002)
        self.res.start = time.time()
        if self.load.rate <= 0:
            per = _split(self.count, self.sessions)
            bounds = [sum(per[:i]) for i in range(self.sessions + 1)]
            await asyncio.gather(*(self._closed(range(bounds[i], bounds[i + 1]))
                                   for i in range(self.sessions)))
        else:
            queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
            tasks = [asyncio.create_task(self._open(queue)) for _ in range(self.sessions)]
            rate = self.load.rate / self.load.procs
            t0 = time.perf_counter()
            for k in range(self.count):
                due = t0 + k / rate
                # The loop's timers may fire up to a millisecond early: never send early.
                while (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                queue.put_nowait((k, due))
            for _ in tasks:
                queue.put_nowait(None)
            await asyncio.gather(*tasks)
        self.res.end = time.time()
        with self.done.get_lock():
            self.done.value += self._unreported
        return self.res


def _worker_main(port: int, load: Load, index: int, sessions: int, count: int,
                 start_at: float, done: mp.Value, out: mp.Queue) -> None:  # type: ignore[valid-type]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    worker = _Worker(port, load, index, sessions, count, done)
    out.put(asyncio.run(worker.run(start_at)))


def run_load(port: int, load: Load, tick: Tick | None = None) -> LoadResult:
    """Offer ``load`` to 127.0.0.1:``port`` from ``load.procs`` processes; merged result."""
    procs = max(1, min(load.procs, load.concurrency, load.messages))
    load = replace(load, procs=procs)  # the open-loop rate is split over the real count
    sessions, counts = _split(load.concurrency, procs), _split(load.messages, procs)
    done = mp.Value("q", 0)
    out: mp.Queue = mp.Queue()
    start_at = time.time() + 0.5
    ps = [mp.Process(target=_worker_main, args=(port, load, i, sessions[i], counts[i],
                                                 start_at, done, out), daemon=True)
          for i in range(procs)]
    for p in ps:
        p.start()
    parts: list[LoadResult] = []
    seen = 0
    while len(parts) < procs:
        try:
            parts.append(out.get(timeout=0.2))
        except Exception:  # queue.Empty: report progress while the workers run
            if not any(p.is_alive() for p in ps) and out.empty():
                raise RuntimeError("load generator processes died") from None
        if tick is not None and done.value > seen:
            tick(done.value - seen)
            seen = done.value
    for p in ps:
        p.join()
    if tick is not None and done.value > seen:
        tick(done.value - seen)
    res = LoadResult(start=start_at, end=max(p.end for p in parts))
    for p in parts:
        res.accepted += p.accepted
        res.refused += p.refused
        res.errors += p.errors
        res.unsent += p.unsent
        res.bytes += p.bytes
        res.latencies += p.latencies
        res.service += p.service
        res.ids += p.ids
        res.acked_at += p.acked_at
    res.latencies.sort()
    res.service.sort()
    return res
