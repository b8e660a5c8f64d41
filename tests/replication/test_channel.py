"""The replication peer channel on real loopback sockets: framing, order, caps, bad frames,
tampering in the middle, close and backpressure (each test runs on asyncio and uvloop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from structlog.testing import capture_logs

from mta.replication.channel import Connection, connect, serve
from mta.replication.frames import (
    MAC_LEN,
    MAGIC,
    MAX_HEADER,
    PREFIX,
    AuthError,
    ConnectionClosed,
    Decoder,
    Encoder,
    FrameError,
    FrameMac,
    decode_header,
    encode_header,
)
from mta.replication.peerauth import PeerAuth
from tests.support import wait_until
from tests.support.wireproxy import HANDSHAKE_FRAMES, FrameProxy

SECRET = b"s" * 32
MIB = 1024 * 1024
MODES = {
    "secret": (PeerAuth("a", secret=SECRET), PeerAuth("b", secret=SECRET)),
    "insecure": (PeerAuth("a", insecure=True), PeerAuth("b", insecure=True)),
}


@contextlib.asynccontextmanager
async def linked(mode: str = "secret", port: int | None = None,
                 **serve_kw: Any) -> AsyncIterator[tuple[Connection, Connection]]:
    """A client connection and its server side (through ``port`` when given, a proxy)."""
    client_auth, server_auth = MODES[mode]
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)
        await release.wait()

    listener = await serve("127.0.0.1", 0, server_auth, handler, **serve_kw)
    client = None
    try:
        async with asyncio.timeout(5):
            client = await connect("127.0.0.1", port or listener.port, client_auth, "b", 5)
            server = await accepted.get()
        yield client, server
    finally:
        release.set()
        if client is not None:
            await client.close()
        await listener.close()


def _raw(conn: Connection, data: bytes) -> None:
    """Bytes straight onto the socket, past the encoder (what a broken peer would send)."""
    conn._transport.write(data)


# -- the codec, without sockets ------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 70_000, MIB])
@pytest.mark.parametrize("mac", [False, True])
def test_codec_round_trip_in_pieces(size: int, mac: bool) -> None:
    key = b"k" * 32
    enc = Encoder(mac=FrameMac(key, b"c2s") if mac else None)
    dec = Decoder(mac=FrameMac(key, b"c2s") if mac else None)
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    wire = b"".join(bytes(p) for i in range(3)
                    for p in enc.encode({"i": i, "b": b"\x00", "l": [1, "z"]}, payload))
    buf = bytearray(wire[:5])
    assert dec.next(buf) is None and dec.need == PREFIX.size
    buf += wire[5:20]
    assert dec.next(buf) is None and dec.need > PREFIX.size  # waits for the whole body
    buf += wire[20:]
    for i in range(3):
        frame = dec.next(buf)
        assert frame is not None
        assert frame == ({"i": i, "b": b"\x00", "l": [1, "z"]}, payload)
    assert dec.next(buf) is None and not buf


def test_codec_refuses_caps_on_the_prefix_alone() -> None:
    dec = Decoder(max_payload=1000)
    with pytest.raises(FrameError, match="payload length 1001"):
        dec.next(bytearray(PREFIX.pack(MAGIC, 2, 1001)))
    with pytest.raises(FrameError, match="header length"):
        dec.next(bytearray(PREFIX.pack(MAGIC, MAX_HEADER + 1, 0)))
    with pytest.raises(FrameError, match="magic"):
        dec.next(bytearray(b"GET / HTTP/1.1\r\n"))
    with pytest.raises(FrameError, match="over the peer's cap"):
        Encoder(max_payload=10).encode({}, b"x" * 11)


@pytest.mark.parametrize("raw", [
    msgpack.packb([1, 2]),                 # not a map
    msgpack.packb({1: "x"}),               # int keys
    msgpack.packb({"a": msgpack.ExtType(5, b"x")}),
    b"\xc1",                               # never used byte
    msgpack.packb({"a": 1}) + b"\x00",     # trailing bytes
    b"\x82\xa1a",                          # truncated map
])
def test_undecodable_or_wrong_headers_are_frame_errors(raw: bytes) -> None:
    with pytest.raises(FrameError):
        decode_header(raw)
    frame = PREFIX.pack(MAGIC, len(raw), 0) + raw
    with pytest.raises(FrameError):
        Decoder().next(bytearray(frame))


def test_unencodable_headers_are_frame_errors() -> None:
    for header in ({1: 2}, {"a": object()}, [("a", 1)], {"a": b"x" * (MAX_HEADER + 1)}):
        with pytest.raises(FrameError):
            encode_header(header)  # type: ignore[arg-type]


# -- real sockets ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES))
async def test_many_frames_both_ways_in_order(mode: str) -> None:
    sizes = [0, 1, MIB]
    payloads = {s: bytes([s % 251]) * s for s in sizes}
    async with linked(mode) as (client, server), asyncio.timeout(5):
        assert client.peer == "b" and server.peer == "a"
        assert client.mac == server.mac == (mode == "secret")

        async def echo() -> None:
            for _ in range(30):
                header, payload = await server.recv()
                server.send({**header, "echo": True}, payload)
                await server.drain()

        task = asyncio.create_task(echo())
        for i in range(30):
            client.send({"i": i, "size": sizes[i % 3]}, payloads[sizes[i % 3]])
        await client.drain()
        for i in range(30):
            header, payload = await client.recv()
            assert header == {"i": i, "size": sizes[i % 3], "echo": True}
            assert payload == payloads[sizes[i % 3]]
        await task


async def test_order_is_kept_under_concurrent_senders() -> None:
    async with linked() as (client, server), asyncio.timeout(5):
        sent: list[tuple[int, int]] = []

        async def sender(k: int) -> None:
            for i in range(200):
                client.send({"k": k, "i": i}, b"p" * (i * 37 % 3000))
                sent.append((k, i))
                if i % 7 == k % 7:
                    await client.drain()
                    await asyncio.sleep(0)

        await asyncio.gather(*(sender(k) for k in range(20)))
        got = []
        for _ in range(len(sent)):
            header, payload = await server.recv()
            assert len(payload) == header["i"] * 37 % 3000
            got.append((header["k"], header["i"]))
        assert got == sent


@pytest.mark.parametrize("prefix", [
    PREFIX.pack(MAGIC, 2, 1025),                 # payload over the listener's cap
    PREFIX.pack(MAGIC, 2, 0xFFFFFFFF),           # 4 GiB
    PREFIX.pack(MAGIC, MAX_HEADER + 1, 0),       # header over the cap
])
async def test_oversize_frames_are_refused_before_the_body_arrives(prefix: bytes) -> None:
    async with linked(max_payload=1024) as (client, server), asyncio.timeout(2):
        with pytest.raises(FrameError, match="over the peer's cap"):
            client.send({}, b"x" * 1025)  # the sender knows the peer's cap: refused locally
        assert not client.closed
        client.send({"ok": 1}, b"x" * 1024)
        assert await server.recv() == ({"ok": 1}, b"x" * 1024)
        # Only the prefix is sent: a receiver that waited for (or allocated) the announced
        # body would hang here instead of refusing at once.
        _raw(client, prefix)
        with pytest.raises(FrameError, match="over the cap"):
            await server.recv()
        assert server.closed
        with pytest.raises(ConnectionClosed):
            await server.recv()
        with pytest.raises(ConnectionClosed):
            await client.recv()


async def test_garbage_after_the_handshake_closes_the_connection() -> None:
    async with linked("insecure") as (client, server), asyncio.timeout(2):
        client.send({"before": 1})
        _raw(client, b"\x16\x03\x01 this is not a frame at all")
        assert await server.recv() == ({"before": 1}, b"")  # frames before it still arrive
        with pytest.raises(FrameError, match="magic"):
            await server.recv()
        with pytest.raises(ConnectionClosed):
            await server.recv()
        with pytest.raises(ConnectionClosed):
            await client.recv()
        with pytest.raises(ConnectionClosed):
            client.send({"after": 1})


@pytest.mark.parametrize("mode", list(MODES))
async def test_a_truncated_frame_is_a_closed_connection_not_a_hang(mode: str) -> None:
    async with linked(mode) as (client, server), asyncio.timeout(2):
        header = encode_header({"x": 1})
        _raw(client, PREFIX.pack(MAGIC, len(header), 100) + header + b"y" * 50)
        client._transport.write_eof()
        with pytest.raises(ConnectionClosed, match="mid-frame"):
            await server.recv()


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    PREFIX.pack(MAGIC, 5000, 0),              # a handshake frame over its 4 KiB cap
    PREFIX.pack(MAGIC, 10, 1),                # handshake frames carry no payload
])
async def test_listener_drops_a_peer_speaking_garbage(raw: bytes) -> None:
    called = []

    async def handler(conn: Connection) -> None:
        called.append(conn)

    with capture_logs() as logs:
        listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                writer.write(raw)
                assert await reader.read() == b""  # closed on us, not left hanging
                writer.close()
                refused = await wait_until(
                    lambda: [e for e in logs if e["event"] == "replication.peer_refused"])
        finally:
            await listener.close()
    assert len(refused) == 1 and not called
    assert refused[0]["address"].startswith("127.0.0.1:")
    assert "cap" in refused[0]["reason"] or "magic" in refused[0]["reason"]
    assert "exc_info" not in refused[0]


def _flip_payload(index: int, frame: bytes) -> list[bytes]:
    if index != HANDSHAKE_FRAMES + 3:
        return [frame]
    data = bytearray(frame)
    data[-MAC_LEN - 1] ^= 0x01  # last payload byte
    return [bytes(data)]


def _flip_header(index: int, frame: bytes) -> list[bytes]:
    if index != HANDSHAKE_FRAMES + 3:
        return [frame]
    data = bytearray(frame)
    data[PREFIX.size + 2] ^= 0x01  # inside the msgpack header
    return [bytes(data)]


def _replay(index: int, frame: bytes) -> list[bytes]:
    return [frame, frame] if index == HANDSHAKE_FRAMES + 3 else [frame]


def _drop(index: int, frame: bytes) -> list[bytes]:
    return [] if index == HANDSHAKE_FRAMES + 3 else [frame]


def _swap(index: int, frame: bytes) -> list[bytes]:
    if index == HANDSHAKE_FRAMES + 3:
        _swap.held = frame  # type: ignore[attr-defined]
        return []
    if index == HANDSHAKE_FRAMES + 4:
        return [frame, _swap.held]  # type: ignore[attr-defined]
    return [frame]


@pytest.mark.parametrize(("tamper", "good"), [
    (_flip_payload, 3), (_flip_header, 3), (_replay, 4), (_drop, 3), (_swap, 3),
])
async def test_a_man_in_the_middle_is_detected(tamper: Any, good: int) -> None:
    """Frames 0-2 pass untouched; frame 3 is altered, repeated, dropped or swapped with 4."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)
        await release.wait()

    listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
    proxy = await FrameProxy(listener.port, tamper).start()
    try:
        async with asyncio.timeout(3):
            client = await connect("127.0.0.1", proxy.port, MODES["secret"][0], "b", 3)
            server = await accepted.get()
            for i in range(10):
                client.send({"i": i}, b"payload %d" % i)
            for i in range(good):
                assert await server.recv() == ({"i": i}, b"payload %d" % i)
            with pytest.raises(AuthError, match="MAC"):
                await server.recv()
            assert server.closed
            with pytest.raises(ConnectionClosed):
                await server.recv()
            with pytest.raises(ConnectionClosed):
                await client.recv()
    finally:
        release.set()
        await proxy.close()
        await listener.close()


async def test_a_frame_moved_from_another_connection_is_detected() -> None:
    """Same secret, same sequence number, same direction: only the per-connection key
    (derived from both nonces) tells the frames apart."""
    seen = {"conns": 0}
    recorded: list[bytes] = []

    def tamper(index: int, frame: bytes) -> list[bytes]:
        if index == 0:
            seen["conns"] += 1
        if index == HANDSHAKE_FRAMES:
            if seen["conns"] == 1:
                recorded.append(frame)
            else:
                return [recorded[0]]
        return [frame]

    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(conn: Connection) -> None:
        await accepted.put(conn)
        await release.wait()

    listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
    proxy = await FrameProxy(listener.port, tamper).start()
    try:
        async with asyncio.timeout(3):
            frames = []
            for _ in range(2):
                client = await connect("127.0.0.1", proxy.port, MODES["secret"][0], "b", 3)
                server = await accepted.get()
                client.send({"same": "header"}, b"same payload")
                try:
                    frames.append(await server.recv())
                except AuthError:
                    frames.append(None)  # type: ignore[arg-type]
                await client.close()
            assert frames == [({"same": "header"}, b"same payload"), None]
    finally:
        release.set()
        await proxy.close()
        await listener.close()


async def test_listener_close_closes_every_connection() -> None:
    finished = asyncio.Event()
    conns: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(conn: Connection) -> None:
        await conns.put(conn)
        try:
            await conn.recv()
        finally:
            finished.set()

    listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
    async with asyncio.timeout(3):
        client = await connect("127.0.0.1", listener.port, MODES["secret"][0], "b", 3)
        server = await conns.get()
        # A peer stuck in its handshake is dropped too.
        _, silent = await asyncio.open_connection("127.0.0.1", listener.port)
        await listener.close()
        assert finished.is_set() and server.closed
        with pytest.raises(ConnectionClosed):
            await client.recv()
        assert client.closed
        with pytest.raises(ConnectionClosed):
            client.send({"late": 1})
        await client.close()  # idempotent
        silent.close()


async def test_drain_waits_while_the_peer_does_not_read() -> None:
    async with linked(high_water=64 * 1024) as (client, server), asyncio.timeout(5):
        client._transport.set_write_buffer_limits(high=64 * 1024)
        chunk = b"z" * 256 * 1024
        n = 0
        drain = None
        # Fill the peer's read-ahead and both kernel buffers, until drain() has to wait.
        while drain is None or drain.done():
            assert n < 400, "drain() never waited"
            client.send({"n": n}, chunk)
            n += 1
            drain = asyncio.create_task(client.drain())
            await asyncio.wait([drain], timeout=0.05)
        assert client.buffered() > 64 * 1024  # nobody reads: above the high-water mark
        for i in range(n):
            header, payload = await server.recv()
            assert header == {"n": i} and payload == chunk
        await drain


async def test_connect_to_a_closed_port_fails_fast() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with asyncio.timeout(2):
        with pytest.raises(ConnectionClosed):
            await connect("127.0.0.1", port, MODES["secret"][0], "b", 1)


async def test_frames_sent_by_the_server_at_once_are_read_after_the_handshake() -> None:
    """The server's first frames may arrive with its handshake 'ok', in one segment: they
    must be read with the session's MAC, not as handshake messages."""

    async def handler(conn: Connection) -> None:
        for i in range(50):
            conn.send({"i": i}, b"early")
        with contextlib.suppress(ConnectionClosed):
            await conn.recv()

    listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
    try:
        async with asyncio.timeout(3):
            client = await connect("127.0.0.1", listener.port, MODES["secret"][0], "b", 3)
            for i in range(50):
                assert await client.recv() == ({"i": i}, b"early")
            await client.close()
    finally:
        await listener.close()


async def test_a_failing_handler_is_logged_and_its_connection_closed() -> None:
    async def handler(conn: Connection) -> None:
        await conn.recv()
        raise RuntimeError("protocol bug")

    with capture_logs() as logs:
        listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
        try:
            async with asyncio.timeout(3):
                client = await connect("127.0.0.1", listener.port, MODES["secret"][0], "b", 3)
                client.send({"x": 1})
                with pytest.raises(ConnectionClosed):
                    await client.recv()
        finally:
            await listener.close()
    [failed] = [e for e in logs if e["event"] == "replication.handler_failed"]
    assert failed["peer"] == "a"


async def test_a_frame_moved_to_the_other_direction_is_detected() -> None:
    """The server's first frame, sent back to it as the client's first: same key, same
    sequence number; only the direction label tells them apart."""
    proxy: FrameProxy | None = None

    def tamper(index: int, frame: bytes) -> list[bytes]:
        assert proxy is not None
        return [proxy.server_frames[0]] if index == HANDSHAKE_FRAMES else [frame]

    accepted: asyncio.Queue[Connection] = asyncio.Queue()
    release = asyncio.Event()

    async def handler(conn: Connection) -> None:
        conn.send({"from": "server"})
        await accepted.put(conn)
        await release.wait()

    listener = await serve("127.0.0.1", 0, MODES["secret"][1], handler)
    proxy = await FrameProxy(listener.port, tamper).start()
    try:
        async with asyncio.timeout(3):
            client = await connect("127.0.0.1", proxy.port, MODES["secret"][0], "b", 3)
            server = await accepted.get()
            assert await client.recv() == ({"from": "server"}, b"")
            client.send({"from": "client"})
            with pytest.raises(AuthError, match="MAC"):
                await server.recv()
    finally:
        release.set()
        await proxy.close()
        await listener.close()
