"""Fencing stops delivery, the pre-send ownership check, dark pooled connections, and the
reply a fencing refusal gets (issue 14, the node side).

Real parts: in-process nodes, a real SMTP sink (tests/mailworld.py) and, between them where a
path must go silent, a TCP proxy on loopback that can stop forwarding while keeping its
sockets open: the receiving side of a dropped-packets partition, without root.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from mta.coordinator import Coordinator, LocalCoordinator
from mta.node import Node
from mta.spool import segment
from mta.spool.ownership import OwnerToken, claim
from tests.support import Sink, SinkScript, make_config, message, read_accounting, wait_until

pytestmark = pytest.mark.timeout(90)


class Proxy:
    """``127.0.0.1:port`` -> ``upstream``, one upstream connection per client connection.

    ``go_dark()``: every open connection stops forwarding, both ways, and stays open (what
    a sender sees when packets to the receiver are dropped); connections made afterwards are
    forwarded (the path healed for them). ``dark_on``: a connection goes dark as soon as the
    client sends these bytes (they are not forwarded). ``hold``: new connections wait for
    ``release()`` before they are connected upstream (the greeting waits with them).
    ``pause_on``: once the client sends these bytes, replies are held back until
    ``release()`` (a command waiting for its answer).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = 0
        self.darkened = 0
        self.forwarded = bytearray()  # every byte passed on from clients to upstream
        self.dark_on: bytes | None = None
        self.pause_on: bytes | None = None
        self.paused = 0
        self._released = asyncio.Event()
        self._released.set()
        self._conns: list[dict[str, Any]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def go_dark(self) -> None:
        for conn in self._conns:
            if not conn["dark"]:
                conn["dark"] = True
                self.darkened += 1

    def cut_dark(self) -> None:
        """Reset the dark connections (the partition ends with the peer's RST)."""
        for conn in self._conns:
            if conn["dark"]:
                for writer in conn["writers"]:
                    writer.transport.abort()

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter
                     ) -> None:
        self.accepted += 1
        conn: dict[str, Any] = {"dark": False, "writers": [cwriter]}
        self._conns.append(conn)
        try:
            await self._released.wait()
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
            conn["writers"].append(uwriter)
            await asyncio.gather(self._pipe(creader, uwriter, conn, True),
                                 self._pipe(ureader, cwriter, conn, False))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in conn["writers"]:
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: dict[str, Any], from_client: bool) -> None:
        while data := await reader.read(65536):
            if from_client and self.dark_on is not None and self.dark_on in data \
                    and not conn["dark"]:
                conn["dark"] = True
                self.darkened += 1
            if conn["dark"]:
                continue  # read and dropped: nothing reaches the other side, no reset
            if from_client and self.pause_on is not None and self.pause_on in data:
                self.pause_on = None
                self._released.clear()
                self.paused += 1
            if not from_client:
                await self._released.wait()
            if from_client:
                self.forwarded += data
            writer.write(data)
            await writer.drain()
        if not conn["dark"]:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self._conns:
            for writer in conn["writers"]:
                writer.transport.abort()


class SwitchCoordinator(LocalCoordinator):
    """Standalone ownership whose lease can be declared past its deadline (``may_send``
    False) without the host being fenced yet: the moment a paused process resumes in."""

    def __init__(self, node_id: str, total_shards: int) -> None:
        super().__init__(node_id, total_shards)
        self.allowed = True

    def may_send(self, shard: int) -> bool:
        return self.allowed and super().may_send(shard)


class Nodes:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Node] = []
        self.cleanups: list[Any] = []

    async def start(self, coordinator: Coordinator | None = None, **delivery: Any) -> Node:
        d = {"enabled": True, "retry_initial": "200ms", "retry_max": "1s",
             "connect_timeout": "10s", "command_timeout": "60s", "data_timeout": "60s",
             "idle_timeout": "60s", "accounting_log": str(self.tmp_path / "acct.jsonl"),
             **delivery}
        cfg = make_config(self.tmp_path / f"spool{len(self.started)}", delivery=d,
                          smtp={"shutdown_grace": "2s"})
        node = Node(cfg, coordinator)
        await node.start()
        self.started.append(node)
        return node

    def accounting(self) -> list[dict[str, Any]]:
        return read_accounting(self.tmp_path / "acct.jsonl")


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    n = Nodes(tmp_path)
    yield n
    for cleanup in n.cleanups:
        await cleanup()
    for node in n.started:
        await node.stop()


@pytest.fixture
def slow_sink() -> Any:
    sink = Sink("127.0.0.1", 0, SinkScript(data_delay=0.3))
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
def sink() -> Any:
    sink = Sink("127.0.0.1", 0)
    sink.start()
    yield sink
    sink.stop()


async def _proxy(nodes: Nodes, sink: Sink) -> Proxy:
    proxy = await Proxy(("127.0.0.1", sink.port)).start()
    nodes.cleanups.append(proxy.close)
    return proxy


async def _submit(node: Node, n: int, rcpt: str = "r@dest.test") -> str:
    assert node.ingress is not None
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=node.ingress.port)
    await smtp.connect()
    _, reply = await smtp.sendmail("app@sender.test", [rcpt], message(n, 1500))
    await smtp.quit()
    return reply.rsplit(" ", 1)[1]


def _metric(node: Node, name: str, **labels: str) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def _test_ids(sink: Sink) -> list[int]:
    ids = []
    for rec in sink.messages:
        for line in rec.content.split(b"\r\n"):
            if line.startswith(b"X-Test-Id: "):
                ids.append(int(line.split(b": ")[1]))
    return ids


# --- 1. fencing stops delivery -------------------------------------------------------------

async def test_fencing_stops_every_delivery_and_unfencing_resumes_without_duplicates(
        nodes: Nodes, slow_sink: Sink) -> None:
    total = 10
    node = await nodes.start(smarthost=f"127.0.0.1:{slow_sink.port}", max_connections=1)
    engine = node.engine
    assert engine is not None
    for n in range(total):
        await _submit(node, n)
    await slow_sink.wait_for(2, timeout=20)

    node.fence("test")
    at_fence = len(slow_sink.messages)
    # Queued jobs go at once; the attempt on the connection stops before its next command.
    # A transaction already in DATA runs to its reply: that one may still land.
    await wait_until(lambda: engine.attempts_in_flight() == 0, 10, "attempts to stop")
    assert len(slow_sink.messages) <= at_fence + 1, (at_fence, len(slow_sink.messages))
    after_stop = len(slow_sink.messages)
    # Stopping is not the remote's fault: no TransientFailure, nothing counted deferred.
    assert not [r for r in nodes.accounting() if r["type"] == "TransientFailure"]
    assert _metric(node, "mta_deferred_recipients_total") == 0
    assert _metric(node, "mta_delivery_not_owner_stops_total", stage="queued") >= 1
    # Everything not recorded delivered is still in the spool, scheduled by nobody.
    delivered = [r for r in nodes.accounting() if r["type"] == "Delivery"]
    assert node.spool.live_count() + len(delivered) == total
    assert len(engine.scheduler) == 0  # dropped, not retried while fenced
    assert len(slow_sink.messages) == after_stop

    node.unfence()  # still the owner: what fencing dropped is scheduled again
    await slow_sink.wait_for(total, timeout=30)
    await wait_until(lambda: node.spool.live_count() == 0, 10, "every message done")
    ids = _test_ids(slow_sink)
    assert sorted(ids) == list(range(total)), ids  # each exactly once
    assert len([r for r in nodes.accounting() if r["type"] == "Delivery"]) == total


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
async def test_fencing_stops_an_attempt_between_commands(nodes: Nodes, pipelining: bool
                                                         ) -> None:
    sink = Sink("127.0.0.1", 0, pipelining=pipelining)
    sink.start()

    async def stop_sink() -> None:
        sink.stop()

    nodes.cleanups.append(stop_sink)
    proxy = await _proxy(nodes, sink)
    node = await nodes.start(smarthost=proxy.address, max_connections=1)
    engine = node.engine
    assert engine is not None
    proxy.pause_on = b"RCPT TO"
    await _submit(node, 1)
    await wait_until(lambda: proxy.paused == 1, 10, "the attempt to wait for its RCPT reply")
    node.fence("test")
    proxy.release()  # the RCPT reply arrives after the fence: the message must not follow
    await wait_until(lambda: engine.attempts_in_flight() == 0, 10, "the attempt to stop")
    assert sink.messages == []
    assert b"X-Test-Id" not in proxy.forwarded
    if pipelining:
        # DATA went with the group, and its 354 came after the fence: the connection is
        # closed instead of sending the message (or any line the server would take as it).
        assert proxy.forwarded.upper().endswith(b"DATA\r\n")
        await wait_until(lambda: sink.active == 0, 10, "the connection to end")
    else:
        assert b"DATA" not in proxy.forwarded.upper()
        await wait_until(lambda: b"QUIT" in proxy.forwarded.upper(), 10,
                         "the connection to end")
    assert _metric(node, "mta_delivery_not_owner_stops_total", stage="before DATA") == 1
    assert not [r for r in nodes.accounting() if r["type"] == "TransientFailure"]
    assert node.spool.live_count() == 1 and len(engine.scheduler) == 0

    node.unfence()
    await sink.wait_for(1, timeout=10)


# --- 1b. the pre-send ownership check -------------------------------------------------------

async def test_nothing_is_sent_when_the_shard_is_not_provably_held_before_mail_from(
        nodes: Nodes, sink: Sink) -> None:
    coordinator = SwitchCoordinator("test-node", 4)
    proxy = await _proxy(nodes, sink)
    node = await nodes.start(coordinator, smarthost=proxy.address, max_connections=1)
    assert node.engine is not None
    proxy.hold()
    mid = await _submit(node, 1)
    # The attempt is past its start and is connecting: only the check before MAIL is left.
    await wait_until(lambda: proxy.accepted >= 1, 10, "the attempt to connect")
    coordinator.allowed = False  # the lease deadline passed (a pause, a partition...)
    proxy.release()
    await wait_until(lambda: node.engine is not None and node.engine.attempts_in_flight() == 0,
                     15, "the attempt to stop")
    assert b"EHLO" in proxy.forwarded  # it did talk to the remote...
    assert b"MAIL FROM" not in proxy.forwarded.upper()  # ...but sent nothing
    assert sink.messages == []
    assert not [r for r in nodes.accounting() if r["type"] == "TransientFailure"]
    assert _metric(node, "mta_deferred_recipients_total") == 0
    assert _metric(node, "mta_delivery_not_owner_stops_total", stage="before MAIL") == 1
    site = next(iter(node.engine.sites.values()))
    assert site.breaker.failures == 0 and site.backoff.factor == 1.0
    assert node.spool.live_ref(mid) is not None  # still in the spool
    # Not fenced, so it is looked at again shortly; each look sends nothing while the
    # shard is not provably ours.
    engine = node.engine
    first = engine.scheduler.due_of(mid)
    assert first is not None
    await wait_until(lambda: (engine.scheduler.due_of(mid) or 0.0) > first, 10, "a second look")
    assert b"MAIL FROM" not in proxy.forwarded.upper() and sink.messages == []

    coordinator.allowed = True
    await sink.wait_for(1, timeout=10)
    await wait_until(lambda: node.spool.live_count() == 0, 10, "the message to be done")
    assert [r["type"] for r in nodes.accounting()] == ["Reception", "Delivery"]


# --- 2. a dark pooled connection does not block its site ------------------------------------

async def test_a_pooled_connection_gone_dark_is_replaced_within_seconds(
        nodes: Nodes, sink: Sink) -> None:
    proxy = await _proxy(nodes, sink)
    node = await nodes.start(smarthost=proxy.address, max_connections=1,
                             reuse_timeout="1s")
    await _submit(node, 0)
    await sink.wait_for(1, timeout=10)
    assert sink.sessions == 1  # the connection stays pooled (idle_timeout 60 s)
    proxy.go_dark()
    await _submit(node, 1)
    # command_timeout is 60 s: waiting it out on the dark connection would fail here.
    await sink.wait_for(2, timeout=8)
    assert sink.sessions == 2  # on a fresh connection
    assert _metric(node, "mta_outbound_stale_connections_total") == 1
    await wait_until(lambda: node.spool.live_count() == 0, 10, "both messages done")
    # The message was never tried on the dark connection: no failure counted against it.
    assert not [r for r in nodes.accounting() if r["type"] == "TransientFailure"]
    assert [r["attempt"] for r in nodes.accounting() if r["type"] == "Delivery"] == [1, 1]


async def test_a_worker_stalled_in_a_command_does_not_hold_the_site(
        nodes: Nodes, sink: Sink) -> None:
    proxy = await _proxy(nodes, sink)
    node = await nodes.start(smarthost=proxy.address, max_connections=1,
                             stall_timeout="1s")
    proxy.dark_on = b"DATA"  # the path goes silent once the first transaction is in DATA
    await _submit(node, 0)
    await wait_until(lambda: proxy.darkened == 1, 10, "the first transaction to go dark")
    proxy.dark_on = None
    await _submit(node, 1)
    # The stalled worker (data_timeout 60 s) leaves its slot: a second connection delivers.
    got = await sink.wait_for(1, timeout=8)
    assert _test_ids(sink) == [1], got
    assert _metric(node, "mta_outbound_stalled_commands_total") >= 1
    # The dark connection is reset at last: the first message is retried and delivered, once.
    proxy.cut_dark()
    await sink.wait_for(2, timeout=15)
    assert sorted(_test_ids(sink)) == [0, 1]


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE") or not os.path.isdir("/proc/self/fd"),
                    reason="Linux socket options")
async def test_tcp_keepalive_is_set_on_outbound_connections(nodes: Nodes, sink: Sink) -> None:
    node = await nodes.start(smarthost=f"127.0.0.1:{sink.port}", keepalive="9s")
    await _submit(node, 0)
    await sink.wait_for(1, timeout=10)
    socks = _connected_to(sink.port)  # the pooled connection (idle_timeout 60 s)
    try:
        assert len(socks) == 1, socks
        sock = socks[0]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 9
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 18000
    finally:
        for sock in socks:
            sock.close()


def _connected_to(port: int) -> list[socket.socket]:
    """This process's TCP sockets whose peer is ``port`` (duplicates of their fds)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.getpeername()[1] == port:
                found.append(sock)
                continue
        except (OSError, IndexError, TypeError):
            pass
        sock.close()
    return found


# --- 3. the reply to a fencing refusal ------------------------------------------------------

async def _inject(node: Node) -> tuple[int, dict[str, Any]]:
    assert node.admin is not None
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{node.admin.port}/api/v1/messages",
            headers={"Authorization": "Bearer t0ken"},
            json={"from": "app@sender.test", "to": ["r@dest.test"],
                  "content": "Subject: x\n\nhello\n"}) as resp:
        return resp.status, await resp.json()


async def _sendmail_error(node: Node, n: int) -> aiosmtplib.SMTPResponseException:
    assert node.ingress is not None
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=node.ingress.port)
    await smtp.connect()
    try:
        with pytest.raises(aiosmtplib.SMTPResponseException) as err:
            await smtp.sendmail("app@sender.test", ["r@dest.test"], message(n))
    finally:
        smtp.close()
    return err.value


async def test_a_shard_taken_over_answers_421_and_503_not_a_disk_error(nodes: Nodes) -> None:
    node = await nodes.start(enabled=False)
    # A peer claimed every shard with a newer token (its own node is not fenced yet): the
    # writer's owner check refuses the append.
    for shard in range(node.spool.total_shards):
        claim(Path(node.spool.root) / f"shard-{shard:03d}", shard, OwnerToken("peer", 2 ** 62))
    err = await _sendmail_error(node, 1)
    assert err.code == 421 and err.message.startswith("4.3.2"), (err.code, err.message)
    status, body = await _inject(node)
    assert status == 503 and "shard" in body["error"] and body["hint"], (status, body)
    assert _metric(node, "mta_fenced_refusals_total", via="smtp") == 1
    assert _metric(node, "mta_fenced_refusals_total", via="http") == 1
    assert _metric(node, "mta_spool_write_errors_total", errno=str(errno.EPERM)) == 0
    assert node.spool.live_count() == 0


async def test_a_fenced_node_answers_421_at_data_and_disk_errors_stay_452(
        nodes: Nodes, monkeypatch: pytest.MonkeyPatch) -> None:
    node = await nodes.start(enabled=False)
    assert node.ingress is not None
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=node.ingress.port)
    await smtp.connect()
    await smtp.mail("app@sender.test")
    await smtp.rcpt("r@dest.test")
    node.fence("test")  # the lease is lost mid-session
    with pytest.raises(aiosmtplib.SMTPResponseException) as err:
        await smtp.data(message(1))
    smtp.close()
    assert err.value.code == 421 and err.value.message.startswith("4.3.2"), err.value
    status, body = await _inject(node)
    assert status == 503, body
    assert _metric(node, "mta_fenced_refusals_total", via="smtp") == 1
    assert _metric(node, "mta_fenced_refusals_total", via="http") == 1

    node.unfence()
    real_write = segment.os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(segment.os, "write", full)
    err2 = await _sendmail_error(node, 2)
    monkeypatch.setattr(segment.os, "write", real_write)
    assert err2.code == 452 and err2.message.startswith("4.3.1"), (err2.code, err2.message)
    assert _metric(node, "mta_spool_write_errors_total", errno=str(errno.ENOSPC)) == 1
    assert _metric(node, "mta_fenced_refusals_total", via="smtp") == 1
