"""A TCP proxy the test controls, standing for the network between node processes.

:class:`NetProxy` forwards ``127.0.0.1:port`` to an upstream address from an event loop in its
own thread, so sync test code (and node processes, which are separate processes) can use it.
Its mode applies to every connection through it, and each mode method returns once it is in
force (bytes read after the call obey it):

- :meth:`~NetProxy.heal`: pass everything through (the start mode).
- :meth:`~NetProxy.delay`: hold every chunk ``seconds`` before forwarding it (latency, not a
  throughput cap: chunks in flight overlap, order is kept).
- :meth:`~NetProxy.drop`: reset (RST) every open connection, and reset each new one as soon as
  it is accepted (a refused peer, a crashed middlebox).
- :meth:`~NetProxy.blackhole`: forward nothing, either way, and close nothing: the peers hear
  silence (an iptables DROP rule). New connections are accepted and then left silent. By
  default the bytes are lost: a connection that was open during the blackhole stays silent
  for ever, after :meth:`~NetProxy.heal` too (the connection state is gone, as when a NAT or
  firewall forgets it), so only a peer that times the silence out and reconnects gets
  through again. With ``hold=True`` the bytes are kept and flow again after ``heal()``, as
  TCP retransmission delivers them after a short partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NetProxy"]

_CHUNK = 64 * 1024


@dataclass
class _Pipe:
    """One direction of one connection: chunks read, waiting to be written."""

    writer: asyncio.StreamWriter
    queue: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)


@dataclass(eq=False)  # kept in a set: hashed by identity
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False  # crossed a lossy blackhole: never forwards again
    ended: int = 0  # directions that saw their EOF forwarded
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class NetProxy:
    """Forwards ``127.0.0.1:``:attr:`port` to ``upstream`` (``host:port`` or a port on
    127.0.0.1); switch its mode with :meth:`heal`, :meth:`delay`, :meth:`drop` and
    :meth:`blackhole`. Counters: :attr:`accepted`, :attr:`reset`, :attr:`forwarded` (bytes,
    both ways), :attr:`lost` (bytes a lossy blackhole swallowed)."""

    def __init__(self, upstream: str | int, host: str = "127.0.0.1") -> None:
        if isinstance(upstream, int):
            self.upstream = ("127.0.0.1", upstream)
        else:
            up_host, up_port = upstream.rsplit(":", 1)
            self.upstream = (up_host, int(up_port))
        self.host = host
        self.port = 0
        self.mode = "pass"  # pass | delay | drop | blackhole
        self.accepted = 0
        self.reset = 0
        self.forwarded = 0
        self.lost = 0
        self._delay = 0.0
        self._hold = False
        self._flowing: asyncio.Event | None = None  # set unless a holding blackhole is on
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy",
                                        daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` to give peers instead of the upstream's."""
        return f"{self.host}:{self.port}"

    def start(self) -> NetProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- modes (from the test's thread) -----------------------------------------------------

    def heal(self) -> None:
        """Pass everything through again (held bytes first, in order)."""
        self._call(self._set("pass"))

    def delay(self, seconds: float) -> None:
        """Forward each chunk read from now on ``seconds`` after it was read."""
        self._call(self._set("delay", delay=seconds))

    def drop(self) -> None:
        """Reset every connection now, and every new one as it is accepted."""
        self._call(self._set("drop"))

    def blackhole(self, hold: bool = False) -> None:
        """Forward nothing and close nothing; ``hold``: keep the bytes for after the heal,
        else lose them (those connections then stay silent for ever)."""
        self._call(self._set("blackhole", hold=hold))

    def close(self) -> None:
        """Close every connection and the listener, and stop the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # --- the loop's side ----------------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set(self, mode: str, delay: float = 0.0, hold: bool = False) -> None:
        assert self._flowing is not None
        self.mode, self._delay, self._hold = mode, delay, hold
        if mode == "blackhole" and hold:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode == "blackhole" and not hold:
            for conn in self._conns:
                conn.dead = True
        elif mode == "drop":
            for conn in list(self._conns):
                self._reset(conn)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._reset(conn)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    def _reset(self, conn: _Conn) -> None:
        """Close both sides with RST (SO_LINGER 0), not FIN."""
        self._conns.discard(conn)
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in conn.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.reset += 1

    async def _accept(self, creader: asyncio.StreamReader,
                      cwriter: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(cwriter, dead=self.mode == "blackhole" and not self._hold)
        self._conns.add(conn)
        if self.mode == "drop":
            self._reset(conn)
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._reset(conn)  # the upstream is down: so is the path to it
            return
        if conn not in self._conns:  # dropped while connecting
            uwriter.transport.abort()
            return
        conn.upstream = uwriter
        up, down = _Pipe(uwriter), _Pipe(cwriter)
        loop = asyncio.get_running_loop()
        conn.tasks = [loop.create_task(self._read(conn, creader, up)),
                      loop.create_task(self._write(conn, up)),
                      loop.create_task(self._read(conn, ureader, down)),
                      loop.create_task(self._write(conn, down))]
        for task in conn.tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _ended(self, conn: _Conn, writer: asyncio.StreamWriter) -> None:
        """Forward an EOF; once both ways ended, the connection is closed."""
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
        conn.ended += 1
        if conn.ended == 2:
            self._conns.discard(conn)
            for w in (conn.client, conn.upstream):
                if w is not None:
                    w.close()
            for task in conn.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _read(self, conn: _Conn, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        """Read one direction into its pipe (EOF too), or lose it in a lossy blackhole."""
        try:
            while True:
                data = await reader.read(_CHUNK)
                if self.mode == "blackhole" and not self._hold:
                    conn.dead = True
                if conn.dead:
                    self.lost += len(data)
                    if not data:
                        return  # its EOF is lost too: the other side hears nothing
                    continue
                delay = self._delay if self.mode == "delay" else 0.0
                pipe.queue.put_nowait((time.monotonic() + delay, data))
                if not data:
                    return
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            if not conn.dead and conn in self._conns:
                self._reset(conn)  # the peer reset: so does the other side

    async def _write(self, conn: _Conn, pipe: _Pipe) -> None:
        """Write one direction's chunks when due and the path is open; after the EOF, or
        when the far side is gone, close the connection as the peer did (FIN, or RST)."""
        assert self._flowing is not None
        try:
            while True:
                due, data = await pipe.queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if conn.dead:
                    self.lost += len(data)
                    continue
                if not data:
                    self._ended(conn, pipe.writer)
                    return
                pipe.writer.write(data)
                self.forwarded += len(data)
                await pipe.writer.drain()
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            if not conn.dead and conn in self._conns:
                self._reset(conn)  # the peer reset: so does the other side
