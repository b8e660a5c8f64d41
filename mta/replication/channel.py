"""The replication peer channel: one long-lived, authenticated TCP connection per
(owner node -> follower node), all shards multiplexed, frames both ways.

The layer carries ``(header, payload)`` frames (:mod:`.frames`) reliably, in order and
authenticated (:mod:`.peerauth`); what the fields mean is the protocol layer's business.

- :func:`connect` dials a peer and returns once both ends are authenticated; :func:`serve`
  accepts peers and runs ``handler(connection)`` for each authenticated one.
- :meth:`Connection.send` only appends to the transport's buffer (no await per frame: the
  owner's writer ships one frame per batch per follower); :meth:`Connection.drain` is the
  backpressure, waiting while more than ``high_water`` bytes are unsent.
- :meth:`Connection.recv` returns frames in the order sent. One reader at a time.

**A bad frame closes the connection.** A frame over a cap, with a bad magic byte or header
(:class:`FrameError`) or a MAC that does not verify (:class:`AuthError`) means the stream can
no longer be trusted or resynchronised: :meth:`~Connection.recv` aborts the connection and
raises the error once (frames that arrived before it were delivered first), then
:class:`ConnectionClosed`. The protocol layer reconnects, and a new handshake starts a fresh
key and sequence numbers; positions and acks make resending idempotent.

Peers that fail the handshake, or say nothing for ``handshake_timeout``, are dropped by the
listener with one ``replication.peer_refused`` line (address, reason), no traceback. Before a
peer is authenticated only small handshake frames are accepted (header <= 4 KiB, no payload).

Works on asyncio's and uvloop's loops alike (plain ``Protocol`` callbacks, ``loop.start_tls``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import structlog

from mta.replication.frames import (
    DEFAULT_MAX_PAYLOAD,
    AuthError,
    ConnectionClosed,
    Decoder,
    Encoder,
    FrameError,
    Header,
    ReplicationError,
)
from mta.replication.peerauth import PeerAuth, Session, client_handshake, server_handshake
from mta.tasks import keep

__all__ = [
    "DEFAULT_HIGH_WATER",
    "AuthError",
    "Connection",
    "ConnectionClosed",
    "FrameError",
    "Listener",
    "ReplicationError",
    "connect",
    "serve",
]

DEFAULT_HIGH_WATER = 4 * 1024 * 1024  # unsent bytes above which drain() waits
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
_READ_AHEAD = 1024 * 1024  # bytes buffered before recv() asks for them; more pauses reading
_HANDSHAKE_READ_AHEAD = 8192  # the same for a peer not yet authenticated
_HANDSHAKE_HEADER = 4096  # the cap on a frame from a peer not yet authenticated
_CLOSE_TIMEOUT = 2.0  # a graceful close (flush, TLS close_notify) longer than this aborts

Handler = Callable[["Connection"], Awaitable[None]]


class _FrameProtocol(asyncio.Protocol):
    """Socket callbacks: a receive buffer with flow control, and write-side backpressure."""

    def __init__(self, on_made: Callable[[_FrameProtocol], None] | None = None,
                 pause_first: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = 0  # bytes the reader waits for
        self.read_ahead = _HANDSHAKE_READ_AHEAD  # raised once the peer is authenticated
        self.eof = False
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.lost_exc: BaseException | None = None
        self._on_made = on_made
        self._pause_first = pause_first
        self._read_paused = False
        self._reader: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Acks are small and latency-bound: never hold them back for Nagle.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._pause_first:
            # TLS starts after this callback: bytes read before start_tls would be lost.
            transport.pause_reading()
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= max(self.read_ahead, self.need) and not self._read_paused:
            assert self.transport is not None
            self._read_paused = True
            self.transport.pause_reading()
        if len(self.buf) >= self.need:
            self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost_exc = exc
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)  # drain() re-checks and raises ConnectionClosed
        self._drainers.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    def _wake(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    @property
    def closed(self) -> bool:
        return self.lost.done() or self.transport is None or self.transport.is_closing()

    def write(self, pieces: list[bytes | memoryview]) -> None:
        assert self.transport is not None
        for piece in pieces:
            self.transport.write(piece)

    async def drain(self) -> None:
        while self._write_paused and not self.closed:
            fut = self.loop.create_future()
            self._drainers.append(fut)
            await fut

    async def read_frame(self, decoder: Decoder) -> tuple[Header, bytes]:
        """The next frame; ConnectionClosed at EOF, the decoder's errors as they are."""
        while True:
            frame = decoder.next(self.buf)
            if frame is not None:
                self.need = decoder.need
                self._resume_reading()
                return frame
            if self.eof:
                if isinstance(self.lost_exc, ssl.SSLError):
                    # A TLS alert after the handshake: the peer refused our certificate.
                    raise AuthError(f"TLS: {self.lost_exc}") from self.lost_exc
                where = "mid-frame" if self.buf else "at a frame boundary"
                raise ConnectionClosed(f"connection closed {where}")
            if self._reader is not None:
                raise RuntimeError("recv() called while another task is waiting in recv()")
            self.need = decoder.need
            self._resume_reading()
            self._reader = self.loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None

    def _resume_reading(self) -> None:
        if self._read_paused and len(self.buf) < max(self.read_ahead, self.need):
            assert self.transport is not None
            self._read_paused = False
            self.transport.resume_reading()


class _Link:
    """The handshake's view of a connection: small, MAC-less frames."""

    def __init__(self, proto: _FrameProtocol) -> None:
        self._proto = proto
        self._encoder = Encoder(max_payload=0, max_header=_HANDSHAKE_HEADER)
        self._decoder = Decoder(max_payload=0, max_header=_HANDSHAKE_HEADER)

    def send_handshake(self, header: Header) -> None:
        if not self._proto.closed:
            self._proto.write(self._encoder.encode(header))

    async def recv_handshake(self) -> Header:
        header, _ = await self._proto.read_frame(self._decoder)
        return header

    def peer_cert(self) -> dict[str, Any] | None:
        assert self._proto.transport is not None
        cert: dict[str, Any] | None = self._proto.transport.get_extra_info("peercert")
        return cert


class Connection:
    """An authenticated connection to the replication peer :attr:`peer`."""

    def __init__(self, proto: _FrameProtocol, session: Session, *, max_payload: int,
                 high_water: int, tls: bool) -> None:
        assert proto.transport is not None
        self._proto = proto
        self._transport = proto.transport
        self.peer = session.peer
        self.tls = tls
        self.mac = session.send_mac is not None
        self.address: Any = self._transport.get_extra_info("peername")
        self._encoder = Encoder(session.peer_max_payload, session.send_mac)
        self._decoder = Decoder(max_payload, session.recv_mac)
        self._failed: BaseException | None = None
        self._transport.set_write_buffer_limits(high=high_water)
        proto.read_ahead = _READ_AHEAD

    def __repr__(self) -> str:
        return f"<Connection peer={self.peer} address={self.address} closed={self.closed}>"

    @property
    def closed(self) -> bool:
        """True once closed by either side (or after a bad frame)."""
        return self._failed is not None or self._proto.closed

    def send(self, header: Mapping[str, Any],
             payload: bytes | bytearray | memoryview = b"") -> None:
        """Append a frame to the send buffer (no await). :class:`ConnectionClosed` when
        closed; :class:`FrameError` (connection intact) for a frame over the peer's caps.
        A bytearray or memoryview payload must not change until the frame is drained."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed")
        self._proto.write(self._encoder.encode(header, payload))

    def buffered(self) -> int:
        """Bytes sent but not yet handed to the kernel."""
        return self._transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait while the send buffer is above the high-water mark."""
        await self._proto.drain()
        if self.closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed")

    async def recv(self) -> tuple[Header, bytes]:
        """The next frame. :class:`ConnectionClosed` at EOF or reset; :class:`FrameError`
        or :class:`AuthError` for a bad frame, after which the connection is closed."""
        if self._failed is not None:
            raise ConnectionClosed(f"connection to {self.peer} is closed") from self._failed
        try:
            return await self._proto.read_frame(self._decoder)
        except ReplicationError as exc:
            self._failed = exc
            self._transport.abort()
            raise

    async def close(self) -> None:
        """Close: flush what is buffered, then the socket (aborted after a short wait)."""
        self._transport.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(self._proto.lost)
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        """Close at once, dropping whatever is unsent."""
        self._transport.abort()


async def _establish(proto: _FrameProtocol, auth: PeerAuth, *, server: bool,
                     expect_node: str | None, max_payload: int, high_water: int) -> Connection:
    """TLS (when configured) then the handshake, on a fresh TCP connection."""
    ctx = auth.ssl_server if server else auth.ssl_client
    if ctx is not None:
        assert proto.transport is not None
        try:
            tls = await proto.loop.start_tls(proto.transport, proto, ctx, server_side=server)
        except ssl.SSLError as exc:
            raise AuthError(f"TLS handshake failed: {exc}") from exc
        except ConnectionError as exc:
            raise ConnectionClosed("connection closed during the TLS handshake (the peer may "
                                   "have refused our certificate)") from exc
        if tls is None:
            raise ConnectionClosed("connection closed during the TLS handshake")
        proto.transport = cast(asyncio.Transport, tls)
    link = _Link(proto)
    try:
        if server:
            session = await server_handshake(link, auth, max_payload)
        else:
            session = await client_handshake(link, auth, expect_node, max_payload)
    except ConnectionClosed as exc:
        hint = " (over TLS: it may have refused our certificate)" if ctx is not None else ""
        raise ConnectionClosed(f"peer closed the connection during the handshake{hint}"
                               ) from exc
    return Connection(proto, session, max_payload=max_payload, high_water=high_water,
                      tls=ctx is not None)


async def connect(host: str, port: int, auth: PeerAuth, expect_node: str | None,
                  timeout: float, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                  high_water: int = DEFAULT_HIGH_WATER) -> Connection:
    """Dial a peer and authenticate both ends within ``timeout`` seconds.

    ``expect_node``: the node id the address should belong to (None: any peer but
    ourselves). Raises only :class:`ReplicationError`\\ s: :class:`AuthError` (refused,
    wrong secret, certificate or node), :class:`FrameError` (not a replication peer),
    :class:`ConnectionClosed` (unreachable, reset, or timed out; the cause is chained)."""
    loop = asyncio.get_running_loop()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, proto = await loop.create_connection(
                lambda: _FrameProtocol(pause_first=auth.tls), host, port)
            return await _establish(proto, auth, server=False, expect_node=expect_node,
                                    max_payload=max_payload, high_water=high_water)
    except BaseException as exc:
        if transport is not None:
            transport.abort()
        if isinstance(exc, TimeoutError):
            raise ConnectionClosed(f"{host}:{port}: no connection within {timeout}s") from exc
        if isinstance(exc, ssl.SSLError):
            raise AuthError(f"{host}:{port}: TLS: {exc}") from exc
        if isinstance(exc, OSError):
            raise ConnectionClosed(f"{host}:{port}: {exc}") from exc
        raise


class Listener:
    """Accepts replication peers; :attr:`port` is the bound port (useful with port 0)."""

    def __init__(self, auth: PeerAuth, handler: Handler, *, handshake_timeout: float,
                 max_payload: int, high_water: int) -> None:
        self._auth = auth
        self._handler = handler
        self._handshake_timeout = handshake_timeout
        self._max_payload = max_payload
        self._high_water = high_water
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshaking: set[asyncio.Task[None]] = set()
        self._conns: set[Connection] = set()
        self._log = structlog.get_logger("mta.replication.channel")
        self.port = 0

    async def _start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _FrameProtocol(self._accepted, pause_first=self._auth.tls), host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    def _accepted(self, proto: _FrameProtocol) -> None:
        keep(self._tasks, self._run(proto))

    async def _run(self, proto: _FrameProtocol) -> None:
        assert proto.transport is not None
        address = proto.transport.get_extra_info("peername")
        task = asyncio.current_task()
        assert task is not None
        self._handshaking.add(task)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                conn = await _establish(proto, self._auth, server=True, expect_node=None,
                                        max_payload=self._max_payload,
                                        high_water=self._high_water)
        except (ReplicationError, OSError) as exc:  # OSError covers TimeoutError, SSLError
            reason = (f"handshake timed out after {self._handshake_timeout}s"
                      if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__)
            self._log.warning("replication.peer_refused", address=_addr(address),
                              reason=reason)
            proto.transport.abort()
            return
        except asyncio.CancelledError:
            proto.transport.abort()
            raise
        except Exception:
            # A bug in the handshake must not leave a stranger's socket open for ever.
            self._log.exception("replication.handshake_failed", address=_addr(address))
            proto.transport.abort()
            return
        finally:
            self._handshaking.discard(task)
        self._log.info("replication.peer_accepted", peer=conn.peer, address=_addr(address))
        self._conns.add(conn)
        try:
            await self._handler(conn)
        except ReplicationError as exc:
            self._log.info("replication.peer_lost", peer=conn.peer, reason=str(exc))
        except Exception:
            self._log.exception("replication.handler_failed", peer=conn.peer)
        finally:
            self._conns.discard(conn)
            await conn.close()

    async def close(self) -> None:
        """Stop accepting, close every open connection and wait for the handlers."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handshaking):
            task.cancel()
        for conn in list(self._conns):
            conn.abort()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)
            for task in pending:  # a handler that ignores ConnectionClosed
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()


def _addr(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


async def serve(host: str, port: int, auth: PeerAuth, handler: Handler, *,
                handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                max_payload: int = DEFAULT_MAX_PAYLOAD,
                high_water: int = DEFAULT_HIGH_WATER) -> Listener:
    """Listen on ``host:port`` and run ``handler(connection)`` for every authenticated peer
    (the connection is closed when the handler returns)."""
    listener = Listener(auth, handler, handshake_timeout=handshake_timeout,
                        max_payload=max_payload, high_water=high_water)
    await listener._start(host, port)
    return listener
