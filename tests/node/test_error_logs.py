"""Error fields name the problem: ``mta.logs.describe`` over real exceptions, and real paths
(a node delivering to a closed port or to a server that hangs up) whose logged reply used to
be a bare class name or carry an errno/tuple repr."""

from __future__ import annotations

import asyncio
import errno
import json
import re
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import aiosmtplib
import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter

from cluster.keys import Keys
from cluster.store import EtcdStore, StoreDown, Timing
from mta.logs import describe
from mta.supervise import supervise
from tests.support import NodeProcess, Sink, SinkScript, free_port, node_config, submit
from tests.support import wait_until_sync as _until

# What an error field must never look like: empty, a tuple or an errno repr, a class name
# alone, or a cancellation.
_TUPLE = re.compile(r"\('[^']*', \d+")


def _readable(text: str) -> None:
    assert text.strip(), "empty error"
    assert not _TUPLE.search(text), text
    assert "[Errno" not in text, text
    assert "CancelledError" not in text, text
    assert not re.fullmatch(r"[A-Za-z]+(Error|Exception|Disconnected)", text), text


async def _raised(coro: Any) -> BaseException:
    try:
        await coro
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


async def test_a_refused_tcp_connect_names_the_errno_and_the_address() -> None:
    port = free_port()
    exc = await _raised(asyncio.open_connection("127.0.0.1", port))
    if "Connect call failed" in str(exc):  # asyncio's loop; uvloop says "Connection refused"
        assert str(exc) == f"[Errno 111] Connect call failed ('127.0.0.1', {port})"  # before
        assert describe(exc) == (
            f"Connection refused (ECONNREFUSED) connecting to 127.0.0.1:{port}")
    else:
        assert describe(exc) == "Connection refused (ECONNREFUSED)"
    _readable(describe(exc))


async def test_library_wrappers_of_a_refused_connect_read_once() -> None:
    port = free_port()
    smtp = await _raised(aiosmtplib.SMTP(hostname="127.0.0.1", port=port).connect())
    assert describe(smtp) == (f"Error connecting to 127.0.0.1 on port {port}: "
                              "Connection refused (ECONNREFUSED)")
    async with aiohttp.ClientSession() as session:
        http = await _raised(session.get(f"http://127.0.0.1:{port}/"))
    assert describe(http) == (f"Cannot connect to host 127.0.0.1:{port} ssl:default "
                              "[Connection refused (ECONNREFUSED)]")


async def test_a_wait_for_timeout_says_timed_out() -> None:
    exc = await _raised(asyncio.wait_for(asyncio.sleep(5), 0.01))
    assert isinstance(exc, TimeoutError) and str(exc) == ""
    assert describe(exc) == "timed out"
    assert describe(TimeoutError("etcd lease refresh")) == "timed out: etcd lease refresh"


def test_os_errors_carry_their_errno_name(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "x"
    with pytest.raises(OSError) as caught:
        missing.open()
    assert describe(caught.value) == f"No such file or directory (ENOENT): '{missing}'"
    assert describe(OSError(errno.ENOSPC, "No space left on device")) == (
        "No space left on device (ENOSPC)")


def test_tuple_args_and_quoted_reprs_are_spelled_out() -> None:
    assert str(ValueError("bad shard", 7)) == "('bad shard', 7)"
    assert describe(ValueError("bad shard", 7)) == "ValueError: bad shard, 7"
    assert describe(KeyError("owner")) == "KeyError: owner"


def test_an_empty_message_gives_the_class_or_its_cause() -> None:
    assert describe(ValueError()) == "ValueError"
    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as inner:
            raise RuntimeError() from inner
    except RuntimeError as exc:
        assert describe(exc) == "RuntimeError: Input/output error (EIO)"


def test_cancellation_and_groups() -> None:
    assert describe(asyncio.CancelledError()) == "cancelled"
    group = ExceptionGroup("two", [ValueError("a"), TimeoutError()])
    assert describe(group) == "a; timed out"


async def test_a_grpc_error_is_one_line_with_its_status() -> None:
    client = aetcd.Client(host="127.0.0.1", port=free_port(), timeout=2)
    try:
        exc = await _raised(client.get(b"k"))
    finally:
        await client.close()
    rpc = exc.__cause__
    assert rpc is not None and "debug_error_string" in str(rpc)  # the before: a dump
    text = describe(rpc)
    assert text.startswith("UNAVAILABLE: ") and "\n" not in text, text
    assert "debug_error_string" not in text
    _readable(describe(exc))


@pytest.mark.parametrize("exc", [
    ValueError(), TimeoutError(), ConnectionResetError(), OSError(), Exception("", ""),
    asyncio.CancelledError(), KeyError(""), OSError(errno.EPIPE, ""),
])
def test_never_empty(exc: BaseException) -> None:
    assert describe(exc).strip()


async def test_a_failing_loop_logs_what_failed() -> None:
    """supervise() logs the traceback and, now, an error field a person can read."""
    errors = Counter("loop_errors", "", ["loop"], registry=CollectorRegistry())
    calls = 0

    async def run() -> None:
        nonlocal calls
        calls += 1
        await asyncio.wait_for(asyncio.sleep(1), 0.001)

    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(supervise("probe", run, node_id="n1", errors=errors, pause=0.01))
        while calls < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    failed = [e for e in logs if e["event"] == "node.loop_failed"]
    assert failed and failed[0]["error"] == "timed out"


def _node_events(node: NodeProcess, event: str) -> list[dict[str, Any]]:
    out = []
    for line in node.log().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


def _delivery_reply(tmp_path: Path, smarthost: str) -> str:
    """The reply a real node logs for its first failed attempt to relay via ``smarthost``."""
    raw = node_config(tmp_path / "spool", node={"log_level": "info"},
                      delivery={"enabled": True, "smarthost": smarthost,
                                "retry_initial": "30s", "connect_timeout": "2s"})
    node = NodeProcess(tmp_path, raw).start()
    try:
        submit(node, ["someone@dest.test"], 1)
        events = _until(lambda: _node_events(node, "delivery.transientfailure"), 15,
                        "a failed delivery attempt")
    finally:
        node.kill()
    return str(events[0]["response"])


def test_a_delivery_to_a_closed_port_logs_connection_refused(tmp_path: Path) -> None:
    port = free_port()
    reply = _delivery_reply(tmp_path, f"127.0.0.1:{port}")
    # Before: "... failed: SMTPConnectError Error connecting to 127.0.0.1 on port N:
    # [Errno 111] Connection refused"
    assert reply == (f"451 4.4.1 Connection to 127.0.0.1 [127.0.0.1]:{port} failed: Error "
                     f"connecting to 127.0.0.1 on port {port}: Connection refused (ECONNREFUSED)")
    _readable(reply.split("failed: ", 1)[1])


def test_a_server_hanging_up_mid_transaction_says_how(tmp_path: Path) -> None:
    sink = Sink("127.0.0.1", free_port(), SinkScript(drop_on_data=True))
    sink.start()
    try:
        reply = _delivery_reply(tmp_path, f"127.0.0.1:{sink.port}")
    finally:
        sink.stop()
    # Before: "451 4.4.2 Connection to 127.0.0.1 lost: SMTPServerDisconnected"
    assert reply.startswith("451 4.4.2 Connection to 127.0.0.1 lost: "), reply
    _readable(reply.split("lost: ", 1)[1])


async def test_an_etcd_call_cancelled_under_us_is_no_cancelled_error() -> None:
    """A gRPC call whose channel closes raises CancelledError into a caller that was not
    cancelled; the store used to report that as StoreDown("CancelledError")."""
    store = EtcdStore([f"127.0.0.1:{free_port()}"], Keys("t"), Timing(3.0), lambda: None)

    async def channel_closed(_client: aetcd.Client) -> None:
        raise asyncio.CancelledError

    async def refused(client: aetcd.Client) -> None:
        await client.get(b"k")

    try:
        with pytest.raises(StoreDown) as cancelled:
            await store._call(channel_closed, 2.0)
        with pytest.raises(StoreDown) as down:
            await store._call(refused, 2.0)
    finally:
        await store.close()
        await asyncio.gather(*store.closing)
    assert str(cancelled.value) == "etcd call aborted: its gRPC channel closed"
    _readable(str(down.value))
