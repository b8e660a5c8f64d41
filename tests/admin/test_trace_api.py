"""``GET /api/v1/trace`` over HTTP: a live NDJSON stream of SMTP sessions, filtered, with no
AUTH secret in it; clear refusals; slots given back when clients leave; cluster-wide."""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import EtcdServer, Raw, message, wait_until
from tests.support.cluster import Cluster

TOKEN = {"Authorization": "Bearer t0ken"}
PASSWORD = "s3cret"  # users_file fixture: alice's password


def _send(smtp_port: int, source: str = "127.0.0.1", login: bool = False) -> str:
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        if login:
            s.login("alice", PASSWORD)  # AUTH PLAIN with an initial response
        s.mail("app@example.com")
        s.rcpt("rcpt@example.org")
        code, reply = s.data(message(2, 600))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


class Stream:
    """An open trace: its raw bytes kept, its events read with a deadline."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.raw = b""

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        line = await asyncio.wait_for(self.resp.content.readline(), timeout)
        assert line, "the stream ended"
        self.raw += line
        event = json.loads(line)
        assert isinstance(event, dict)
        return event

    async def until(self, pred: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while not out or not pred(out[-1]):
                out.append(await self.next(timeout))
        return out


async def _open(http: aiohttp.ClientSession, admin_port: int, **query: str) -> Stream:
    resp = await http.get(f"http://127.0.0.1:{admin_port}/api/v1/trace", params=query,
                          headers=TOKEN, timeout=aiohttp.ClientTimeout(total=30))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    stream = Stream(resp)
    assert (await stream.next())["event"] == "trace_started"
    return stream


async def test_stream_of_a_filtered_session_has_no_secret(start_node: Any,
                                                          users_file: str) -> None:
    node = await start_node(smtp={"users_file": users_file})
    smtp_port = node.ingress.port
    async with aiohttp.ClientSession() as http:
        stream = await _open(http, node.admin.port, client="127.0.0.3", local="1")
        await asyncio.to_thread(_send, smtp_port, "127.0.0.1", True)  # filtered out
        mid = await asyncio.to_thread(_send, smtp_port, "127.0.0.3", True)
        events = await stream.until(lambda e: e["event"] == "disconnect")
        stream.resp.close()
    assert {e["node"] for e in events} == {"test-node"} and len({e["session"] for e in events}) == 1
    kinds = [e["event"] for e in events if e["event"] != "reply"]
    assert kinds == ["connect", "command", "command", "auth", "command", "command", "command",
                     "data", "command", "disconnect"]
    assert events[0]["fields"]["client"] == "127.0.0.3"
    data = next(e for e in events if e["event"] == "data")["fields"]
    assert data["queue_id"] == mid and data["size"] == len(message(2, 600))
    assert next(e for e in events if e["event"] == "auth")["fields"] == {"user": "alice",
                                                                         "ok": True}
    assert all(isinstance(e["time"], float) for e in events)
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode())
    for secret in (PASSWORD.encode(), plain, base64.b64encode(PASSWORD.encode())):
        assert secret not in stream.raw
    assert b"AUTH PLAIN ***" in stream.raw
    # The message body is never in the stream either, only its size.
    assert message(2, 600).split(b"\r\n\r\n", 1)[1][:40] not in stream.raw


@pytest.mark.parametrize("query", [{"client": "300.1.1.1"}, {"client": "mail.example"},
                                   {"user": ""}, {"session": "nope"}, {"client": ""},
                                   {"clinet": "127.0.0.1"},
                                   # Which would count? Neither: it is refused.
                                   [("client", "127.0.0.9"), ("client", "0.0.0.0/0")]])
async def test_bad_filter_is_a_400_json(start_node: Any, query: Any) -> None:
    node = await start_node()
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{node.admin.port}/api/v1/trace", params=query,
            headers=TOKEN) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] and body["hint"]
    assert not node.ingress.trace.subscribers


async def test_limit_refused_and_slots_given_back_when_clients_leave(start_node: Any) -> None:
    node = await start_node()
    hub = node.ingress.trace
    async with aiohttp.ClientSession() as http:
        streams = [await _open(http, node.admin.port) for _ in range(hub.max_subscribers)]
        async with http.get(f"http://127.0.0.1:{node.admin.port}/api/v1/trace",
                            headers=TOKEN) as resp:
            assert resp.status == 429
            body = await resp.json()
        assert "16 traces are open" in body["error"] and "close a trace" in body["hint"]
        for stream in streams:
            stream.resp.close()  # the client hangs up: nothing more is written to notice it
        await wait_until(lambda: not hub.subscribers, 5, "every trace slot given back")
        assert not hub.active
        stream = await _open(http, node.admin.port)
        stream.resp.close()


async def test_slow_reader_does_not_stall_sessions(start_node: Any) -> None:
    node = await start_node()
    # A reader that takes nothing: a raw HTTP client with a tiny receive buffer.
    reader, writer = await asyncio.open_connection(
        sock=_small_buffer_socket(node.admin.port))
    writer.write(b"GET /api/v1/trace?local=1 HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer t0ken\r\n\r\n")
    await writer.drain()
    try:
        await _flood_unread_trace(node, reader)
    finally:
        writer.close()
    hub = node.ingress.trace
    await wait_until(lambda: not hub.subscribers, 5, "the trace slot given back")


async def _flood_unread_trace(node: Any, reader: asyncio.StreamReader) -> None:
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
    hub = node.ingress.trace
    await wait_until(lambda: hub.subscribers, 5, "the trace to subscribe")
    # A session of many pipelined commands completes at full speed all the same.
    c = await Raw.connect(node.ingress.port)
    await c.reply()
    c.writer.write(b"NOOP\r\n" * 20000)
    async with asyncio.timeout(10):
        for _ in range(20000):
            assert (await c.reply()).startswith("250")
    await c.close()
    sub = hub.subscribers[0]
    await wait_until(lambda: sub.dropped_total > 0, 5, "events to be dropped")
    # Read what was kept: a "dropped" line says how many were lost.
    seen = b""
    async with asyncio.timeout(20):
        while b'"event":"dropped"' not in seen:
            seen = seen[-200:] + await reader.read(65536)


def _small_buffer_socket(admin_port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", admin_port))
    sock.setblocking(False)
    return sock


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data").start()
    yield server
    server.stop()


async def test_trace_on_one_node_shows_sessions_of_its_peer(tmp_path: Path,
                                                           etcd_server: EtcdServer) -> None:
    cluster = Cluster(tmp_path, etcd_server)
    try:
        a = cluster.start_node("node-a")
        b = cluster.start_node("node-b")
        # B answers 451 until it owns shards: the mail below must be taken.
        await asyncio.to_thread(cluster.wait, cluster.settled({"node-a", "node-b"}), 30,
                                "both nodes own shards")
        async with aiohttp.ClientSession() as http:

            async def both() -> Stream | None:
                # Until B's membership is visible to A, A's trace has no peer to ask.
                stream = await _open(http, a.admin_port, client="127.0.0.4")
                started = await stream.next()
                if started["event"] == "trace_started" and started["node"] == "node-b":
                    return stream
                stream.resp.close()
                return None

            stream = None
            async with asyncio.timeout(20):
                while stream is None:
                    stream = await both()
            mid = await asyncio.to_thread(_send, b.smtp_port, "127.0.0.4")
            events = await stream.until(lambda e: e["event"] == "disconnect")
            assert {e["node"] for e in events} == {"node-b"}
            data = next(e for e in events if e["event"] == "data")
            assert data["fields"]["queue_id"] == mid
            b.kill()  # the peer goes: one line says so, the stream goes on
            lost = await stream.until(lambda e: e["event"] == "peer_unreachable", 15)
            assert lost[-1]["node"] == "node-b" and lost[-1]["fields"]["error"]
            await asyncio.to_thread(_send, a.smtp_port, "127.0.0.4")
            events = await stream.until(lambda e: e["event"] == "disconnect")
            assert events[-1]["node"] == "node-a"
            stream.resp.close()
    finally:
        cluster.stop()


def test_a_peer_line_is_re_encoded_under_the_peer_s_own_name() -> None:
    from mta.admin.routes.trace import from_peer

    raw = b'{"node":"test-node","event":"command","fields":{"line":"\\u001b]0;pwned\\u0007"}}'
    line = from_peer("n2", raw)
    assert line is not None and b"\x1b" not in line and b"\x07" not in line
    assert json.loads(line)["node"] == "n2"  # a peer cannot speak for another node
    assert json.loads(line)["fields"]["line"] == "\x1b]0;pwned\x07"  # as text, escaped
    for junk in (b"not json", b"[1, 2]", b'{"x": NaN}', b'{"line": "\x1b[2J"}'):
        assert from_peer("n2", junk) is None


async def test_a_peer_streaming_an_endless_line_is_cut_off() -> None:
    from aiohttp import web

    from mta.admin.peers import PeerClient, PeerStreamError
    from mta.coordinator import Member

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"event":"ok"}\n')
        while True:
            await resp.write(b"x" * 8192)  # never a newline

    app = web.Application()
    app.router.add_get("/api/v1/trace", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    peer = Member("n2", "", f"http://127.0.0.1:{bound}", False, False, 0, "", 0.0)
    client = PeerClient("token")
    lines = []
    try:
        async with asyncio.timeout(10):
            with pytest.raises(PeerStreamError, match="over"):
                async for line in client.stream(peer, "/api/v1/trace"):
                    lines.append(line)
        assert lines == [b'{"event":"ok"}\n']
    finally:
        await client.close()
        await runner.cleanup()
