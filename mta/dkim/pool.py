"""Signing processes: the node's DKIM signatures made in child processes it feeds over
pipes, so the RSA operation and the canonicalisation run on other cores without taking the
event loop's GIL (signing threads in the node's own process wait for it after every
signature while the loop is busy: a third of the loop's time went to that contention)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import structlog

import mta
from mta.dkim.errors import SigningStartError, Unsignable
from mta.tasks import keep

__all__ = ["SigningPool"]

log = structlog.get_logger("mta.dkim")

MAX_FRAME = 64 * 1024 * 1024  # either way: messages up to 256 KiB are sent, a spec is small
_QUICK_EXIT = 1.0  # seconds: a process that ends sooner is restarted after a back-off
_MAX_BACKOFF = 60.0  # seconds: the longest back-off
PROTOCOL = 1  # the spec's and the messages' form: a child of another version refuses to run
READY = b"ready\n"  # what a child writes once it has built its signer
_READY_TIMEOUT = 60.0  # seconds: a child's interpreter start and key loading, under load
_PARK_LIMIT = 5.0  # seconds: messages wait for a restart due this soon, else get a 451
_CLOSE_GRACE = 30.0  # seconds: signatures in flight at a stop or reload get this long
_STALL = 30.0  # seconds: a process that owes answers and gives none this long is killed


def _child_env() -> dict[str, str]:
    # The child imports the very tree this node runs (a source checkout, a benchmark
    # snapshot), wherever its working directory is.
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mta.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class _Child:
    """One signing process, the messages sent to it that await their answer, and the task
    reading its answers."""

    def __init__(self, proc: asyncio.subprocess.Process,
                 on_exit: Callable[[_Child, int | None], None]) -> None:
        self.proc = proc
        self.started = time.monotonic()
        self.waiting: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self.alive = True
        self.progress = self.started  # the last answer, or the first message owed since
        self.stalled = False
        self._on_exit = on_exit
        self.reader = asyncio.create_task(self._read())
        self._watch = asyncio.create_task(self._watchdog())

    @classmethod
    async def spawn(cls, spec: bytes, on_exit: Callable[[_Child, int | None], None]) -> _Child:
        # -P: not the working directory first on sys.path (an `mta` there would be handed
        # the keys); the node's own tree comes first through PYTHONPATH (_child_env).
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "mta.dkim.child", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=_child_env())
        except OSError as exc:  # no interpreter there, out of processes or descriptors
            raise SigningStartError(f"cannot start a DKIM signing process: "
                                    f"{exc.strerror or exc}") from None
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(spec)
        # Ready once it has read its keys: a process that cannot start (a bad install, a
        # version mismatch) fails the start that spawned it, not the first messages.
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), _READY_TIMEOUT)
        except (TimeoutError, ValueError):
            ready = b""
        if ready != READY:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
            raise SigningStartError(f"the DKIM signing process (pid {proc.pid}) did not start"
                                    f" (exit code {code}; its reason is on the node's stderr)")
        return cls(proc, on_exit)

    def send(self, items: list[tuple[int, bytes, asyncio.Future[bytes]]]) -> None:
        """Write ``items`` (seq, message, future) in one write."""
        assert self.proc.stdin is not None
        frames = []
        if not self.waiting:
            self.progress = time.monotonic()
        for seq, message, future in items:
            self.waiting[seq] = (message, future)
            frames.append(msgpack.packb([seq, message]))
        self.proc.stdin.write(b"".join(frames))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME)
        try:
            while data := await self.proc.stdout.read(1 << 20):
                unpacker.feed(data)
                for answer in unpacker:
                    self._settle(answer)
                    self.progress = time.monotonic()
        except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as exc:
            # KeyError: an answer for a message it was not sent; IndexError: a short one.
            log.error("dkim.signing_process_garbled", pid=self.proc.pid,
                      error=f"{type(exc).__name__}: {exc}")
        finally:
            self.alive = False
            self._watch.cancel()
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # it may hang on after garbled output: not answered again
            code = await self.proc.wait()
            _fail(self.waiting.values(), f"the DKIM signing process (pid {self.proc.pid}) "
                  + (f"gave no answer for {_STALL:g}s and was killed" if self.stalled
                     else f"exited with code {code}"))
            self.waiting.clear()
            self._on_exit(self, code)

    async def _watchdog(self) -> None:
        """Kill the process when it owes answers and has given none for _STALL seconds
        (stopped, frozen, stuck): its messages then fail (4xx) and a new one is started,
        instead of every message sent to it waiting until its client gives up."""
        interval = min(_STALL / 4, 1.0)
        seen, quiet = self.progress, 0
        while True:
            await asyncio.sleep(interval)
            if not self.waiting or self.progress != seen:
                seen, quiet = self.progress, 0
                continue
            # Counted in this loop's own turns, not read off the clock: after the node
            # itself was frozen or starved a while, answers may be waiting unread in the
            # pipe, and this wake-up may come before the reader's.
            quiet += 1
            if quiet * interval >= _STALL:
                log.error("dkim.signing_process_stalled", pid=self.proc.pid,
                          owed=len(self.waiting), seconds=_STALL)
                self.stalled = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()  # SIGKILL ends a stopped process too
                return

    def _settle(self, answer: list[Any]) -> None:
        message, future = self.waiting.pop(answer[0])
        if future.done():  # its session went away meanwhile
            return
        if answer[1] is None:
            future.set_exception(Unsignable(answer[2], permanent=bool(answer[3])))
            return
        body = message if answer[2] is None else answer[2]
        future.set_result(answer[1] + body if answer[1] else body)

    async def stop(self) -> None:
        """Close its stdin (it ends once it has answered all it read) and wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.reader), timeout=_CLOSE_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.reader


class SigningPool:
    """``count`` signing processes, each given ``spec`` (Signer.spec()); :meth:`sign`
    returns the signed message. A process that dies fails the signatures it owed (a 4xx to
    their clients: nothing was accepted yet) and is started again."""

    def __init__(self, spec: dict[str, Any], count: int) -> None:
        self._spec = msgpack.packb({**spec, "protocol": PROTOCOL})
        self._count = count
        self._children: list[_Child] = []
        self._pending: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._scheduled = False
        self._closed = False
        self._seq = 0
        self._restarts: set[asyncio.Task[None]] = set()
        self._quick_exits = 0  # processes in a row that ended within _QUICK_EXIT
        self._restart_due: float | None = None  # when the next (re)start is tried
        # Messages that found no live process while one was about to be started again.
        self._parked: list[tuple[bytes, asyncio.Future[bytes]]] = []
        self._starting = asyncio.Lock()
        self.started = False  # the first start has ended (later ones only replace)

    @property
    def pids(self) -> list[int]:
        """The live processes' pids."""
        return [c.proc.pid for c in self._children if c.alive]

    async def start(self) -> None:
        """Start the processes not running yet; raises SigningStartError when one cannot
        start."""
        async with self._starting:  # two callers at once must not start two each
            while len(self._children) < self._count and not self._closed:
                self._children.append(await _Child.spawn(self._spec, self._exited))
            self.started = True

    async def sign(self, message: bytes) -> bytes:
        """``message`` signed (Signer.sign) by one of the processes; raises Unsignable."""
        if self._closed:
            raise Unsignable("DKIM signing is stopping", permanent=False)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._pending.append((message, future))
        self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        # Gathered over one turn of the loop: one write per process per turn.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        live = [c for c in self._children if c.alive]
        if not live:
            due = self._restart_due
            dying = len(live) < len(self._children)  # ended, its exit not yet reaped
            if dying or (due is not None and due - time.monotonic() <= _PARK_LIMIT):
                # A process is about to be started again: these wait for it, not 451.
                self._parked += batch
            else:
                _fail(batch, "no DKIM signing process is running")
            return
        parts: dict[int, list[tuple[int, bytes, asyncio.Future[bytes]]]] = {}
        load = [len(c.waiting) for c in live]
        for message, future in batch:
            if future.done():
                continue
            i = load.index(min(load))  # the least busy process
            load[i] += 1
            self._seq += 1
            parts.setdefault(i, []).append((self._seq, message, future))
        for i, items in parts.items():
            live[i].send(items)

    def _exited(self, child: _Child, code: int | None) -> None:
        with contextlib.suppress(ValueError):
            self._children.remove(child)
        if self._closed:
            return
        lived = time.monotonic() - child.started
        # One that keeps dying young (a bad install, a version mismatch) is restarted less
        # and less often, up to once a minute: no log storm, and each restart logs why.
        self._quick_exits = self._quick_exits + 1 if lived < _QUICK_EXIT else 0
        delay = self._backoff() if self._quick_exits else 0.0
        log.error("dkim.signing_process_exited", pid=child.proc.pid, code=code,
                  restart_in=round(delay, 1))
        if delay > _PARK_LIMIT:  # parked while it was dying: too long to wait now
            parked, self._parked = self._parked, []
            _fail(parked, f"the DKIM signing process exited with code {code}; restarting "
                          f"in {delay:.0f}s")
        self._schedule_start(delay)

    def _backoff(self) -> float:
        return min(_MAX_BACKOFF, _QUICK_EXIT * 2 ** (self._quick_exits - 1))

    def _schedule_start(self, delay: float) -> None:
        self._restart_due = time.monotonic() + delay
        keep(self._restarts, self._restart(delay))

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.start()
        except SigningStartError as exc:
            parked, self._parked = self._parked, []
            _fail(parked, str(exc))
            self._quick_exits += 1
            delay = self._backoff()
            log.error("dkim.signing_process_start_failed", error=str(exc),
                      restart_in=round(delay, 1))
            if not self._closed:
                self._schedule_start(delay)
            return
        self._restart_due = None
        if self._parked:
            self._pending[:0], self._parked = self._parked, []
            self._schedule_flush()

    async def aclose(self) -> None:
        """Stop taking messages, let those sent be answered, then end the processes."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._restarts):
            task.cancel()
        parked, self._parked = self._parked, []
        _fail(parked, "DKIM signing is stopping")
        await asyncio.sleep(0)  # a flush scheduled this turn still goes out
        # A start under way (a first message's) ends first: the process it is spawning
        # is appended after, and must be stopped with the others.
        async with self._starting:
            await asyncio.gather(*(c.stop() for c in list(self._children)))
            self._children.clear()


def _fail(batch: Iterable[tuple[bytes, asyncio.Future[bytes]]], detail: str) -> None:
    failure = Unsignable(detail, permanent=False)
    for _, future in batch:
        if not future.done():
            future.set_exception(failure)
