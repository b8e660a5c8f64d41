"""A fast loopback SMTP sink in its own process: pipelining, no checks, counts messages and
writes each one's ``X-Bench-Id`` to a file so a relay run can prove nothing was lost; it also
counts the messages that arrive signed (a ``DKIM-Signature`` first field) and keeps the first
message it receives, so a signing run can check the signature itself. With ``times`` it also
writes each id's arrival time (``time.time()`` when its final dot was read), for a scenario
that asks when each message got there."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import IO

TAG = b"\nX-Bench-Id: "
SIGNED = b"\r\ndkim-signature:"  # a signer prepends its field: the body's first line
_sampled = [False]


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, counter: mp.Value, signed: mp.Value,  # type: ignore[valid-type]
                 ids: IO[bytes], sample: Path, times: IO[bytes] | None = None) -> None:
        self.counter = counter
        self.signed = signed
        self.ids = ids
        self.times = times
        self.sample = sample
        self.n_signed = 0
        self.n_received = 0  # messages of this read (smtp-source's carry no id)
        self.buf = b""
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 sink ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        got = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    break
                at = self.buf.find(TAG, 0, end)
                if at >= 0:
                    at += len(TAG)
                    got.append(self.buf[at:self.buf.find(b"\r\n", at)] + b"\n")
                # The buffer starts with the DATA line's CRLF, then the message.
                if self.buf[:len(SIGNED)].lower() == SIGNED:
                    self.n_signed += 1
                if not _sampled[0]:
                    _sampled[0] = True  # one per sink process: the first message
                    self.sample.write_bytes(self.buf[2:end + 2])
                self.buf = self.buf[end + 5:]
                self.n_received += 1
                self.in_data = False
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
                self._flush(out, got)
                self.transport.close()
                return
            else:
                out.append(b"250 ok\r\n")
        self._flush(out, got)

    def _flush(self, out: list[bytes], got: list[bytes]) -> None:
        if self.n_signed:  # before the count: a run reads it once the count is complete
            with self.signed.get_lock():
                self.signed.value += self.n_signed
            self.n_signed = 0
        if got:
            if self.times is not None:
                # Every message of this read arrived by now ("id time" lines).
                now = f" {time.time():.6f}\n".encode()
                self.times.write(b"".join(g[:-1] + now for g in got))
                self.times.flush()
            # Ids first: a message counts as received once its id is on record.
            self.ids.write(b"".join(got))
            self.ids.flush()
        if self.n_received:
            with self.counter.get_lock():
                self.counter.value += self.n_received
            self.n_received = 0
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


def _sink_main(host: str, port: int, counter: mp.Value,  # type: ignore[valid-type]
               signed: mp.Value, ready: mp.Event, ids_path: str,  # type: ignore[valid-type]
               sample: str, times_path: str = "") -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run() -> None:
        loop = asyncio.get_running_loop()
        with open(ids_path, "ab") as ids, ExitStack() as stack:
            times = stack.enter_context(open(times_path, "ab")) if times_path else None
            await loop.create_server(
                lambda: _SinkProtocol(counter, signed, ids, Path(sample), times),
                host, port, backlog=1024)
            ready.set()
            await asyncio.Event().wait()

    asyncio.run(run())


class Sink:
    """``with Sink(work, port) as sink:`` a sink process; ``sink.count`` messages so far,
    ``sink.ids()`` how often each id arrived, ``sink.signed`` how many arrived with a
    DKIM-Signature first field, ``sink.sample`` the first message received (or None);
    ``times=True``: ``sink.arrivals()`` when each id arrived."""

    def __init__(self, work: Path, port: int, host: str = "127.0.0.1",
                 times: bool = False) -> None:
        self.path = work / "sink-ids.txt"
        self.sample_path = work / "sink-sample.eml"
        self.times_path = work / "sink-times.txt" if times else None
        self.counter = mp.Value("q", 0)
        self.signed_counter = mp.Value("q", 0)
        self.ready = mp.Event()
        self.proc = mp.Process(target=_sink_main,
                               args=(host, port, self.counter, self.signed_counter, self.ready,
                                     str(self.path), str(self.sample_path),
                                     str(self.times_path or "")), daemon=True)

    def __enter__(self) -> Sink:
        self.proc.start()
        if not self.ready.wait(10):
            raise RuntimeError("the benchmark sink did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.join()

    @property
    def count(self) -> int:
        return int(self.counter.value)

    @property
    def signed(self) -> int:
        return int(self.signed_counter.value)

    @property
    def sample(self) -> bytes | None:
        return self.sample_path.read_bytes() if self.sample_path.exists() else None

    def ids(self) -> Counter[str]:
        return Counter(self.path.read_text().split()) if self.path.exists() else Counter()

    def arrivals(self) -> dict[str, float]:
        """Each id's first arrival (``time.time()``); a sink made with ``times=True``."""
        out: dict[str, float] = {}
        if self.times_path is None or not self.times_path.exists():
            return out
        for line in self.times_path.read_text().splitlines():
            ident, _, at = line.partition(" ")
            if at and ident not in out:
                out[ident] = float(at)
        return out
