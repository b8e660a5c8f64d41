"""Outbound PIPELINING, the cases the first tests left open (found by planting bugs in
mta/delivery/pipelining.py and site.py): replies other than the common ones (251, a 421 in
the middle of a group, 4xx to the message, 354 after a refused MAIL), the first reply's own
deadline, the message's encoding, the timeouts and stall watch of the message, and a reused
connection that answered before it failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH

from mta.delivery import pipelining
from tests.support import World, wait_until
from tests.support.rawsmtp import pipelining_client


def _records(world: World, kind: str) -> list[dict[str, Any]]:
    return [r for r in world.accounting() if r["type"] == kind]


def _metric(world: World, name: str) -> float:
    assert world.node is not None
    return world.node.metrics.registry.get_sample_value(name, {}) or 0.0


# --- replies of a group --------------------------------------------------------------------

async def test_251_to_a_recipient_in_a_group_is_accepted(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=lambda line: b"251 2.1.5 will forward\r\n"
                       if line.upper().startswith(b"RCPT") else None)
    await world.submit(["a@dest.test"])
    [delivery] = await world.wait_records("Delivery", 1)
    assert delivery["recipient"] == "a@dest.test"
    assert len(server.messages) == 1 and not _records(world, "Bounce")


async def test_421_and_gone_after_an_accepted_recipient_defers_both_with_the_421(
        world: World, raw: Callable[..., Any]) -> None:
    # MAIL 250, RCPT a 250, RCPT b 421 and the connection closes: DATA's reply is that 421
    # too. Nobody is delivered (no message went out) and the 421 is what both are told.
    server = await raw(script=lambda line: b"421 4.3.2 shutting down\r\n"
                       if line.upper().startswith(b"RCPT TO:<B@") else None,
                       close_after=b"RCPT TO:<B@")
    await world.submit(["a@dest.test", "b@dest.test"])
    failures = await world.wait_records("TransientFailure", 2)
    first = failures[:2]
    assert {f["recipient"] for f in first} == {"a@dest.test", "b@dest.test"}
    assert all("421 4.3.2 shutting down" in f["response"] for f in first), first
    assert not _records(world, "Delivery") and server.messages == []


async def test_421_left_open_in_a_group_ends_the_connection_before_the_message(
        world: World, raw: Callable[..., Any]) -> None:
    # A server that says 421 to one RCPT and stays: 421 means it is closing, so the client
    # does not go on to send the message on that connection.
    server = await raw(script=lambda line: b"421 4.3.2 shutting down\r\n"
                       if line.upper().startswith(b"RCPT TO:<B@") else None)
    await world.submit(["a@dest.test", "b@dest.test"])
    await world.wait_records("TransientFailure", 2)
    assert not _records(world, "Delivery") and server.messages == []


async def test_a_4xx_to_the_message_defers_it_and_the_site_backs_off(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(message_reply=b"421 4.3.0 try again later\r\n",
                       delivery={"rate": "50/s", "retry_initial": "30s"})
    await world.submit(["a@dest.test"])
    [failure] = await world.wait_records("TransientFailure", 1)
    assert "421 4.3.0 try again later" in failure["response"]
    assert not _records(world, "Delivery") and len(server.messages) == 1
    assert world.node is not None
    assert world.node.engine.sites["mx.dest.test"].backoff.factor == 0.5


BLOCKED = b"550 5.7.1 Client host rejected: blocked using b.barracudacentral.org\r\n"


@pytest.mark.parametrize("verb", [b"MAIL", b"RCPT", b"DATA"])
async def test_a_block_in_a_group_defers_instead_of_bouncing(
        world: World, raw: Callable[..., Any], verb: bytes) -> None:
    refused: list[bytes] = []

    def script(line: bytes) -> bytes | None:
        if line[:4].upper() == verb and not refused:
            refused.append(line)
            return BLOCKED
        return None

    await raw(script=script, sections={"egress": {
        "state": str(world.tmp_path / "egress.json"), "block_backoff": "30s"}})
    await world.submit(["a@dest.test"])
    [first] = await wait_until(lambda: [r for r in world.accounting()
                                        if r["type"] in ("TransientFailure", "Bounce")],
                               10, "the first outcome")
    assert first["type"] == "TransientFailure", first
    assert first["response"].startswith("451 4.7.0") and "block" in first["response"]


class _RefuseMailAccept354:
    """A broken server: refuses MAIL, then answers DATA with 354 all the same."""

    def __call__(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            return b"550 5.7.1 sender refused\r\n"
        if verb == b"RCPT":
            return b"503 5.5.1 need MAIL\r\n"
        return None


async def test_354_after_a_refused_mail_closes_without_writing_a_line(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=_RefuseMailAccept354())
    await world.submit(["a@dest.test"])
    [bounce] = await world.wait_records("Bounce", 1)
    assert "550 5.7.1 sender refused" in bounce["response"]
    await wait_until(lambda: server.cut_in_data == 1, 10, "the connection to end in DATA")
    assert server.partial == [b""] and server.messages == []


async def test_354_with_every_recipient_refused_closes_without_writing_a_line(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=lambda line: b"550 5.1.1 no\r\n"
                       if line.upper().startswith(b"RCPT") else None)
    await world.submit(["gone@dest.test"])
    await world.wait_records("Bounce", 1)
    await wait_until(lambda: server.cut_in_data == 1, 10, "the connection to end in DATA")
    assert server.partial == [b""] and server.messages == []


async def test_a_refused_mail_makes_the_site_back_off(
        world: World, raw: Callable[..., Any]) -> None:
    await raw(script=lambda line: b"421 4.7.0 too many messages, slow down\r\n"
              if line[:4].upper() == b"MAIL" else None, close_after=b"MAIL",
              delivery={"rate": "50/s", "retry_initial": "30s"})
    await world.submit(["a@dest.test"])
    await world.wait_records("TransientFailure", 1)
    assert world.node is not None
    assert world.node.engine.sites["mx.dest.test"].backoff.factor == 0.5


# --- the message ---------------------------------------------------------------------------

async def test_the_message_waits_data_timeout_not_command_timeout(
        world: World, raw: Callable[..., Any]) -> None:
    # A server slow to take the message (content filters): command_timeout does not apply.
    server = await raw(message_delay=0.8,
                       delivery={"command_timeout": "300ms", "data_timeout": "10s"})
    await world.submit(["a@dest.test"])
    await world.wait_records("Delivery", 1)
    assert not _records(world, "TransientFailure") and len(server.messages) == 1


async def test_a_worker_waiting_for_the_messages_reply_does_not_hold_the_site(
        world: World, raw: Callable[..., Any]) -> None:
    # The first message's final dot is never answered (data_timeout 30 s); past
    # stall_timeout its worker leaves its slot and a second connection takes the next one.
    server = await raw(hold_messages=1, delivery={
        "max_connections": 1, "stall_timeout": "200ms", "data_timeout": "30s"})
    await world.submit(["a@dest.test"], n=0)
    await wait_until(lambda: server.dots == 1, 10, "the first message's final dot")
    await world.submit(["b@dest.test"], n=1)
    [delivery] = await world.wait_records("Delivery", 1, timeout=5)
    assert delivery["recipient"] == "b@dest.test" and server.connections == 2
    server.let_go.set()


# --- a reused connection ---------------------------------------------------------------------

async def test_a_reused_connection_that_answered_then_failed_is_no_stale_connection(
        world: World, raw: Callable[..., Any]) -> None:
    # The second message's MAIL is answered, then the connection is gone: the transaction
    # was under way (a failure of the attempt), not a dead pooled connection found idle.
    server = await raw(close_after=b"MAIL FROM:<SECOND@", delivery={"idle_timeout": "30s"})
    await world.submit(["a@dest.test"], n=0)
    await world.wait_records("Delivery", 1)
    await world.submit(["b@dest.test"], sender="second@sender.test", n=1)
    [failure, *_] = await world.wait_records("TransientFailure", 1)
    assert failure["recipient"] == "b@dest.test" and "4.4.2" in failure["response"]
    assert _metric(world, "mta_outbound_stale_connections_total") == 0
    assert server.connections >= 1


# --- the protocol alone ----------------------------------------------------------------------



def _group() -> list[bytes]:
    return [pipelining.mail_command("a@x.test", [], "ascii"),
            pipelining.rcpt_command("b@y.test", "ascii"), b"DATA\r\n"]


async def test_the_first_reply_deadline_is_kept_and_not_the_whole_timeout() -> None:
    smtp, server, _ = await pipelining_client(lambda line: None)
    try:
        start = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await asyncio.wait_for(
                pipelining.envelope(smtp, _group(), timeout=30, first_timeout=0.2), 5)
        assert time.monotonic() - start < 5
    finally:
        smtp.close()
        server.close()


async def test_the_first_reply_deadline_ends_with_the_first_reply() -> None:
    # MAIL answered at once, RCPT later than first_timeout but within timeout: no timeout.
    answers = {b"MAIL": b"250 ok\r\n", b"RCPT": b"250 ok\r\n", b"DATA": b"354 go\r\n"}
    smtp, server, _ = await pipelining_client(lambda line: answers.get(line[:4]), slow=b"RCPT",
                                     delay=0.5)
    try:
        replies = await pipelining.envelope(smtp, _group(), timeout=10, first_timeout=0.2)
        assert [r.code for r in replies] == [250, 250, 354]
    finally:
        smtp.close()
        server.close()


async def test_a_reply_too_long_ends_the_connection_at_once() -> None:
    # An endless line: the client stops reading at aiosmtplib's limit, not at the timeout.
    junk = b"250-" + b"x" * (MAX_RESPONSE_LENGTH + 100)
    smtp, server, _ = await pipelining_client(
        lambda line: junk if line.startswith(b"MAIL") else None)
    try:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="unreadable reply"):
            await asyncio.wait_for(pipelining.envelope(smtp, _group(), timeout=30), 5)
        assert not smtp.is_connected
    finally:
        smtp.close()
        server.close()


async def test_the_message_is_sent_with_crlf_line_endings_and_dot_stuffed() -> None:
    smtp, server, got = await pipelining_client(lambda line: b"250 queued\r\n"
                                       if line == b".\r\n" else None)
    try:
        before = len(got)
        reply = await pipelining.body(smtp, b"a\n.b\r\n..c\r.e\rf", timeout=10)
        assert reply.code == 250
        assert got[before:] == [b"a\r\n", b"..b\r\n", b"...c\r\n", b"..e\r\n", b"f\r\n",
                                b".\r\n"]
    finally:
        smtp.close()
        server.close()


@pytest.mark.parametrize("address", ["a\x01@b.test", "a@b.test\x1f",
                                     "a@b.test\x7f"])
def test_a_control_character_in_an_address_is_never_written(address: str) -> None:
    with pytest.raises(ValueError):
        pipelining.mail_command(address, [], "utf-8")
    with pytest.raises(ValueError):
        pipelining.rcpt_command(address, "utf-8")


def test_a_control_character_in_a_mail_option_is_never_written() -> None:
    with pytest.raises(ValueError):
        pipelining.mail_command("a@b.test", ["SIZE=1\r\nRSET"], "ascii")
    assert pipelining.mail_command("a@b.test", ["SIZE=1", "BODY=8BITMIME"], "ascii") == \
        b"MAIL FROM:<a@b.test> SIZE=1 BODY=8BITMIME\r\n"
