"""Mail loops: the hop limit at both doors and at delivery, and routes back to ourselves.

Real parts only: in-process nodes on fixed loopback ports, a DNS server on loopback for the
MX cases, aiosmtpd sinks for the DSNs.
"""

from __future__ import annotations

import json
import smtplib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import pytest

from mta.config import ConfigError
from mta.delivery.loops import received_count
from mta.node import Node
from tests.support import (
    DNSServer,
    EtcdServer,
    NodeProcess,
    Sink,
    free_port,
    make_config,
    message,
    node_config,
    wait_until,
)

FAST = {"retry_initial": "200ms", "retry_max": "1s", "connect_timeout": "2s",
        "command_timeout": "5s", "idle_timeout": "1s"}


def _with_received(n: int, folded: bool = True) -> bytes:
    """A test message arriving with ``n`` Received: headers (folded, as real ones are)."""
    hops = "".join(
        (f"Received: from relay{i}.example ([192.0.2.{i % 250}])\r\n\tby relay{i + 1}.example;"
         f"\r\n\tMon, 23 Nov 2026 10:00:00 +0000\r\n") if folded and i % 2 == 0
        else f"received: from relay{i}.example by relay{i + 1}.example; Mon, 1 Jan 2026\r\n"
        for i in range(n))
    # Look-alikes that are not trace fields: a prefixed name, a continuation line, and a
    # body line; none may count.
    lookalikes = "X-Received: by gateway.example\r\nX-Note: one\r\n Received: folded text\r\n"
    return (hops + lookalikes).encode() + message(1, 600) + b"Received: in the body\r\n"


def _accounting(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Only whole lines: the node may be appending one right now.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


async def _send(port: int, sender: str, rcpts: list[str], body: bytes) -> str:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await smtp.connect()
    try:
        _, reply = await smtp.sendmail(sender, rcpts, body)
    finally:
        await smtp.quit()
    return reply.rsplit(" ", 1)[1]


@pytest.fixture
def sink() -> Iterator[Sink]:
    """Where DSNs to the sender go."""
    s = Sink("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def test_received_count_reads_the_header_block_only() -> None:
    assert received_count(_with_received(7)) == 7
    assert received_count(b"Subject: x\r\n\r\nReceived: body\r\n") == 0
    assert received_count(b"RECEIVED : a\nReceived:b\n\nReceived: c\n") == 2  # bare LF too


def test_max_hops_is_validated_with_file_and_key(tmp_path: Path) -> None:
    assert make_config(tmp_path / "s").smtp.max_hops == 50
    for bad in (0, -1, "50", True):
        with pytest.raises(ConfigError, match=r"^<test>: \[smtp\] max_hops: expected a positive"):
            make_config(tmp_path / "s", smtp={"max_hops": bad})


async def test_too_many_received_headers_refused_at_data_and_over_http(
        start_node: Callable[..., Any]) -> None:
    node = await start_node()
    port = node.ingress.port
    # Exactly max_hops passes (our own Received: header is not one it arrived with).
    mid = await _send(port, "a@example.com", ["b@example.org"], _with_received(50))
    assert node.spool.live_ref(mid) is not None
    for hops in (51, 200):
        with pytest.raises(aiosmtplib.SMTPDataError) as err:
            await _send(port, "a@example.com", ["b@example.org"], _with_received(hops))
        assert err.value.code == 554 and "5.4.6 Too many hops" in err.value.message
    assert node.spool.live_count() == 1  # nothing of the refused ones was stored

    url = f"http://127.0.0.1:{node.admin.port}/api/v1/messages"
    headers = {"Authorization": "Bearer t0ken"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for hops, status in ((200, 422), (50, 202)):
            content = _with_received(hops).decode()
            async with http.post(url, json={"from": "a@example.com", "to": ["b@example.org"],
                                            "content": content}) as resp:
                body = await resp.json()
                assert resp.status == status, body
                if status == 422:
                    assert "554 5.4.6 Too many hops" in body["error"]
    assert node.spool.live_count() == 2


async def test_queued_message_above_a_lowered_limit_bounces_at_delivery(
        tmp_path: Path, sink: Sink) -> None:
    spool, acct = tmp_path / "spool", tmp_path / "acct.jsonl"
    first = Node(make_config(spool, delivery={"accounting_log": str(acct)}))
    await first.start()
    try:
        assert first.ingress is not None
        mid = await _send(first.ingress.port, "app@sender.test", ["user@far.test"],
                          _with_received(10))
    finally:
        await first.stop()
    # The operator lowers the limit; delivery is on now, everything relays to the sink.
    second = Node(make_config(spool, smtp={"max_hops": 5}, delivery={
        "enabled": True, "smarthost": f"127.0.0.1:{sink.port}", "accounting_log": str(acct),
        **FAST}))
    await second.start()
    try:
        await wait_until(lambda: any(r["type"] == "Bounce" and r["message_id"] == mid
                                     for r in _accounting(acct)), 15, "the Bounce record")
        [bounce] = [r for r in _accounting(acct) if r["type"] == "Bounce"]
        assert bounce["response"].startswith("554 5.4.6 Too many hops"), bounce
        [dsn] = await sink.wait_for(1)
        assert dsn.sender == "<>" and dsn.recipients == ["app@sender.test"]
        assert b"5.4.6" in dsn.content
        assert not [r for r in _accounting(acct) if r["type"] == "Delivery"
                    and r["message_id"] == mid]
    finally:
        await second.stop()


async def _loop_bounces(acct: Path, mid: str, sink: Sink) -> None:
    """The message bounced with 5.4.6, its DSN reached ``sink``, and nothing went round."""
    def settled_or_looping() -> bool:
        records = _accounting(acct)
        return (any(r["type"] == "Bounce" and r["message_id"] == mid for r in records)
                or sum(r["type"] == "Reception" for r in records) > 2)

    # A loop shows within milliseconds as new Receptions: fail on it at once.
    await wait_until(settled_or_looping, 15, "the loop Bounce")
    records = _accounting(acct)
    assert not [r for r in records if r["type"] == "Delivery" and r["message_id"] == mid]
    bounces = [r for r in records if r["type"] == "Bounce" and r["message_id"] == mid]
    assert bounces, f"no Bounce, the message went round: {len(records)} records"
    assert bounces[0]["response"] == "554 5.4.6 mail for loop.test loops back to myself"
    [dsn] = await sink.wait_for(1)
    assert dsn.sender == "<>" and b"5.4.6" in dsn.content and b"loops back to myself" in dsn.content
    # Two Receptions: the message and its DSN. A loop would have made one per round.
    assert sum(r["type"] == "Reception" for r in _accounting(acct)) == 2


async def test_smarthost_that_is_ourselves_bounces(start_node: Callable[..., Any],
                                                   tmp_path: Path, sink: Sink) -> None:
    port, acct = free_port(), tmp_path / "acct.jsonl"
    node = await start_node(smtp={"listen": f"127.0.0.1:{port}"}, delivery={
        "enabled": True, "smarthost": f"127.0.0.1:{sink.port}", "accounting_log": str(acct),
        "domains": {"loop.test": {"smarthost": f"127.0.0.1:{port}"}}, **FAST})
    mid = await _send(node.ingress.port, "app@sender.test", ["user@loop.test"], message(1))
    await _loop_bounces(acct, mid, sink)


@pytest.mark.parametrize(("listen", "mx_addr"), [("127.0.0.1", "127.0.0.1"),
                                                 ("0.0.0.0", "127.0.0.3")])
async def test_mx_that_is_ourselves_bounces(start_node: Callable[..., Any], tmp_path: Path,
                                            sink: Sink, listen: str, mx_addr: str) -> None:
    """An MX record naming this node's listener, on the outbound port it listens on; a
    wildcard listener answers on every local address."""
    port, acct = free_port(), tmp_path / "acct.jsonl"
    dns = DNSServer({"loop.test": {"MX": [(10, "mx.loop.test")]},
                     "mx.loop.test": {"A": [mx_addr]}})
    try:
        node = await start_node(smtp={"listen": f"{listen}:{port}"}, delivery={
            "enabled": True, "nameservers": [f"127.0.0.1:{dns.port}"], "mx_port": port,
            "accounting_log": str(acct), **FAST,
            "domains": {"sender.test": {"smarthost": f"127.0.0.1:{sink.port}"}}})
        mid = await _send(node.ingress.port, "app@sender.test", ["user@loop.test"], message(1))
        await _loop_bounces(acct, mid, sink)
    finally:
        dns.close()


async def test_lower_preference_mx_that_is_ourselves_is_skipped(
        start_node: Callable[..., Any], tmp_path: Path) -> None:
    """We are a backup MX of the domain: mail goes to the better MX, never back to us."""
    port, acct = free_port(), tmp_path / "acct.jsonl"
    primary = Sink("127.0.0.2", port)
    primary.start()
    dns = DNSServer({"backup.test": {"MX": [(10, "mx1.backup.test"), (20, "mx2.backup.test")]},
                     "mx1.backup.test": {"A": ["127.0.0.2"]},
                     "mx2.backup.test": {"A": ["127.0.0.1"]}})
    try:
        node = await start_node(smtp={"listen": f"127.0.0.1:{port}"}, delivery={
            "enabled": True, "nameservers": [f"127.0.0.1:{dns.port}"], "mx_port": port,
            "accounting_log": str(acct), **FAST})
        mid = await _send(node.ingress.port, "app@sender.test", ["user@backup.test"],
                          message(1))
        [got] = await primary.wait_for(1, 15)
        assert got.recipients == ["user@backup.test"]
        await wait_until(lambda: any(r["type"] == "Delivery" and r["message_id"] == mid
                                     for r in _accounting(acct)), 10, "the Delivery record")
    finally:
        primary.stop()
        dns.close()


def test_smarthost_that_is_a_cluster_peer_bounces(tmp_path: Path, etcd: EtcdServer,
                                                  sink: Sink) -> None:
    """Each node relays loop.test to the other: whichever delivers it finds a member's
    advertised SMTP address in the route, and bounces instead of starting a ping-pong."""
    name, spool = f"t{uuid.uuid4().hex[:8]}", tmp_path / "spool"
    ports = {"n1": free_port(), "n2": free_port()}
    other = {"n1": "n2", "n2": "n1"}
    nodes: dict[str, NodeProcess] = {}
    try:
        for node_id in ("n1", "n2"):
            work = tmp_path / node_id
            work.mkdir()
            raw = node_config(spool, node={"id": node_id}, spool={"shards": 8},
                              cluster={"etcd": [etcd.endpoint], "name": name,
                                       "lease_ttl": 3.0},
                              delivery={"enabled": True, "accounting_log": str(work / "acct"),
                                        "smarthost": f"127.0.0.1:{sink.port}", **FAST,
                                        "domains": {"loop.test": {
                                            "smarthost": f"127.0.0.1:{ports[other[node_id]]}"}}})
            nodes[node_id] = NodeProcess(work, raw, smtp_port=ports[node_id]).start(timeout=30)
        deadline = time.monotonic() + 20
        while len(etcd.get_prefix(f"/mta/{name}/nodes/")) < 2:  # n1 sees n2 as a member
            assert time.monotonic() < deadline, "n2 never registered"
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", ports["n1"], timeout=10) as smtp:
            reply = smtp.sendmail("app@sender.test", ["user@loop.test"], message(1))
        assert reply == {}

        def records() -> list[dict[str, Any]]:
            return [r for n in nodes for r in _accounting(tmp_path / n / "acct")]

        deadline = time.monotonic() + 20
        while not any(r["type"] == "Bounce" for r in records()):
            assert sum(r["type"] == "Reception" for r in records()) <= 2, "mail went round"
            assert time.monotonic() < deadline, "no Bounce"
            time.sleep(0.05)
        [bounce] = [r for r in records() if r["type"] == "Bounce"]
        assert bounce["response"] == "554 5.4.6 mail for loop.test loops back to myself"
        assert not [r for r in records() if r["type"] == "Delivery"
                    and r["message_id"] == bounce["message_id"]]
        deadline = time.monotonic() + 20
        while not sink.messages:
            assert time.monotonic() < deadline, "the DSN never reached the sink"
            time.sleep(0.05)
        assert sum(r["type"] == "Reception" for r in records()) == 2  # message + DSN
    finally:
        for node in nodes.values():
            node.kill()
