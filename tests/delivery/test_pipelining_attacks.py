"""Outbound PIPELINING against hostile and broken servers: replies that do not pair with
the commands sent (an extra one, one the client did not ask for, a success code that
accepts nothing), a 421 that does not close, a server that takes its time per recipient,
and a connection closed under a pooled worker. Whatever a server answers, a recipient is
recorded delivered only on a 250 to the final dot of a message it received."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.mail import message
from tests.support import World, wait_until


async def _first_record(world: World, rcpt: str, timeout: float = 10.0) -> dict[str, Any]:
    """The first accounting record (Delivery, Bounce or TransientFailure) for ``rcpt``."""
    def found() -> list[dict[str, Any]]:
        return [r for r in world.accounting() if r.get("recipient") == rcpt
                and r["type"] in ("Delivery", "Bounce", "TransientFailure")]

    await wait_until(lambda: bool(found()), timeout, f"a record for {rcpt}")
    return found()[0]


def _delivered(world: World, domain: str = "@dest.test") -> int:
    return len([r for r in world.accounting() if r["type"] == "Delivery"
                and r["recipient"].endswith(domain)])


# --- a success code that accepts nothing -------------------------------------------------

@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
@pytest.mark.parametrize(("verb", "reply"), [
    (b"DATA", b"250 2.0.0 ok\r\n"),          # DATA answered 250 instead of 354
    (b"RCPT", b"252 2.1.5 cannot verify\r\n"),  # the only RCPT answered 252
    (b"MAIL", b"251 2.1.0 whatever\r\n"),    # MAIL answered 251
], ids=["data-250", "rcpt-252", "mail-251"])
async def test_a_2xx_to_a_command_that_was_not_accepted_is_no_delivery(
        world: World, raw: Callable[..., Any], pipelining: bool, verb: bytes, reply: bytes
        ) -> None:
    # The message never went out: recording the reply's 2xx code would mark it delivered.
    server = await raw(pipelining=pipelining,
                       script=lambda line: reply if line[:4].upper() == verb else None)
    await world.submit(["a@dest.test"])
    record = await _first_record(world, "a@dest.test")
    assert server.messages == []
    assert record["type"] == "TransientFailure", record
    assert reply.decode().strip() in record["response"]


# --- replies the client did not ask for --------------------------------------------------

def _ehlo_and_an_extra_reply(line: bytes) -> bytes | None:
    if line[:4].upper() == b"EHLO":
        return b"250-raw\r\n250-PIPELINING\r\n250 8BITMIME\r\n250 2.0.0 unasked\r\n"
    return None


async def test_an_unsolicited_reply_is_not_taken_for_the_groups_first(
        world: World, raw: Callable[..., Any]) -> None:
    # The extra 250 came with EHLO's reply: read as MAIL's, every reply after it belongs to
    # the command before (DATA's "reply" is RCPT's 250, taken for a refused DATA's 250).
    server = await raw(script=_ehlo_and_an_extra_reply)
    await world.submit(["a@dest.test"])
    record = await _first_record(world, "a@dest.test")
    assert record["type"] == "TransientFailure", record
    assert server.messages == [] and _delivered(world) == 0


async def test_two_replies_to_a_message_do_not_answer_the_next_transaction(
        world: World, raw: Callable[..., Any]) -> None:
    # The second 250 stays in the client's buffer: on the reused connection the next
    # group's MAIL would get it, and DATA the RCPT's 250.
    server = await raw(message_reply=b"250 2.0.0 queued\r\n250 2.0.0 queued again\r\n")
    await world.submit(["a@dest.test"], n=0)
    await world.wait_records("Delivery", 1)
    await world.submit(["b@dest.test"], n=1)
    record = await _first_record(world, "b@dest.test")
    assert record["type"] == "Delivery", record
    assert len(server.messages) == 2 and b"X-Test-Id: 1" in server.messages[1]
    assert _delivered(world) == 2


async def test_an_extra_reply_after_354_stops_the_message(
        world: World, raw: Callable[..., Any]) -> None:
    # "354" and then a reply nobody asked for: the replies are out of step, and the next
    # one read would be taken for the message's.
    server = await raw(script=lambda line: b"354 go\r\n250 2.0.0 not asked\r\n"
                       if line[:4].upper() == b"DATA" else None)
    await world.submit(["a@dest.test"])
    record = await _first_record(world, "a@dest.test")
    assert record["type"] == "TransientFailure", record
    assert server.messages == []
    await wait_until(lambda: server.cut_in_data >= 1, 10, "the connection to end in DATA")


# --- 421 ---------------------------------------------------------------------------------

class _ShutsDownOnce:
    """421 to the first MAIL, then (connection left open) silence until the client leaves;
    a well-behaved server afterwards."""

    def __init__(self) -> None:
        self.said = False
        self.mails = 0

    def __call__(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            self.mails += 1
            if self.mails == 1:
                self.said = True
                return b"421 4.3.2 going down\r\n"
        if self.said and verb in (b"RCPT", b"DATA"):
            return b""
        self.said = False
        return None


async def test_a_421_that_does_not_close_ends_the_group_at_once(
        world: World, raw: Callable[..., Any]) -> None:
    # One at a time, the 421 is MAIL's reply and the client leaves; pipelined, waiting for
    # RCPT's and DATA's replies would sit out the command timeout and record a timeout.
    await raw(script=_ShutsDownOnce(), delivery={"command_timeout": "30s"})
    await world.submit(["a@dest.test"])
    record = await _first_record(world, "a@dest.test", timeout=5)
    assert record["type"] == "TransientFailure", record
    assert "421 4.3.2 going down" in record["response"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_a_connection_closed_after_a_421_is_not_reused_for_smtputf8_mail(
        world: World, raw: Callable[..., Any], pipelining: bool) -> None:
    # The client closes the connection on a 421 and keeps it pooled: the retry found no
    # SMTPUTF8 on the dead connection and bounced the message for good.
    mails = 0

    def script(line: bytes) -> bytes | None:
        nonlocal mails
        if line[:4].upper() == b"MAIL":
            mails += 1
            if mails == 1:
                return b"421 4.3.2 busy\r\n"
        return None

    server = await raw(pipelining=pipelining, script=script)
    await world.submit(["jörg@dest.test"], message(0, 500), mail_options=["SMTPUTF8"])

    def final() -> list[str]:
        return [r["type"] for r in world.accounting() if r["type"] in ("Delivery", "Bounce")
                and r.get("recipient") == "jörg@dest.test"]

    # The record, not the server's copy: the node writes it after the remote's 250 reached it.
    await wait_until(lambda: bool(final()), 10, "a delivery or a bounce recorded")
    assert final() == ["Delivery"]
    assert len(server.messages) == 1


# --- a refusal, and the server hangs up ----------------------------------------------------

@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_a_refused_mail_and_a_hang_up_is_the_refusal(
        world: World, raw: Callable[..., Any], pipelining: bool) -> None:
    # One at a time, MAIL's 554 is read before the connection is found gone: a bounce.
    # Pipelined, the replies owed for RCPT and DATA made it "connection lost", a deferral.
    await raw(pipelining=pipelining, close_after=b"MAIL",
              script=lambda line: b"554 5.7.1 you are not welcome\r\n"
              if line[:4].upper() == b"MAIL" else None)
    await world.submit(["a@dest.test"])
    record = await _first_record(world, "a@dest.test")
    assert record["type"] == "Bounce", record
    assert "554 5.7.1 you are not welcome" in record["response"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
@pytest.mark.parametrize("verb", [b"MAIL", b"RCPT"])
async def test_a_block_reply_and_a_hang_up_blocks_the_source(
        world: World, raw: Callable[..., Any], tmp_path: Path, pipelining: bool, verb: bytes
        ) -> None:
    # A blocklisted address refused and the door shut: the site refuses this source (one at
    # a time it is seen before the loss); pipelined, the block went unseen and the same
    # source was tried again and again.
    await raw(pipelining=pipelining, close_after=verb,
              sections={"egress": {"state": str(tmp_path / "egress.json")}},
              script=lambda line: b"554 5.7.1 Client host blocked using zen.spamhaus.org\r\n"
              if line[:4].upper() == verb else None)
    await world.submit(["a@dest.test", "b@dest.test"])
    record = await _first_record(world, "a@dest.test")
    assert record["type"] == "TransientFailure", record
    assert world.node is not None
    assert world.node.metrics.egress_blocks.labels("")._value.get() == 1
    site = next(iter(world.node.engine.sites.values()))
    assert site.blocked()


# --- a slow server -----------------------------------------------------------------------

async def test_each_reply_of_a_group_has_the_command_timeout(
        world: World, raw: Callable[..., Any]) -> None:
    # A server that takes 150 ms per RCPT (a tarpit): well within a 500 ms command timeout
    # for every reply, but not for six of them together.
    rcpts = [f"r{i}@dest.test" for i in range(5)]
    server = await raw(delay=lambda line: 0.15 if line[:4].upper() == b"RCPT" else 0,
                       delivery={"command_timeout": "500ms"})
    await world.submit(rcpts)
    records = [await _first_record(world, rcpt) for rcpt in rcpts]
    assert [r["type"] for r in records] == ["Delivery"] * 5, records
    assert len(server.messages) == 1


# --- pinned: a hundred recipients, every kind of reply, each paired with its RCPT ---------

def _per_recipient(line: bytes) -> bytes | None:
    if line[:4].upper() != b"RCPT":
        return None
    name = line.split(b"<", 1)[1].split(b"@", 1)[0]
    i = int(name[1:])
    if i % 7 == 3:
        return b"550-5.1.1 unknown " + name + b"\r\n550 5.1.1 no such user " + name + b"\r\n"
    if i % 11 == 5:
        return b"451 4.2.0 later " + name + b"\r\n"
    return b"250-2.1.5 ok\r\n250-2.1.5 still ok\r\n250 2.1.5 ok " + name + b"\r\n"


async def test_a_hundred_recipients_in_one_group_each_get_their_own_reply(
        world: World, raw: Callable[..., Any]) -> None:
    rcpts = [f"r{i}@dest.test" for i in range(100)]
    server = await raw(script=_per_recipient)
    await world.submit(rcpts)
    records = {rcpt: await _first_record(world, rcpt) for rcpt in rcpts}
    assert server.verbs()[1:103] == [b"MAIL"] + [b"RCPT"] * 100 + [b"DATA"]
    for i, rcpt in enumerate(rcpts):
        record = records[rcpt]
        if i % 7 == 3:
            assert record["type"] == "Bounce", record
            assert f"no such user r{i}" in record["response"]
        elif i % 11 == 5:
            assert record["type"] == "TransientFailure", record
            assert record["response"].endswith(f"later r{i}")
        else:
            assert record["type"] == "Delivery", record
    assert len(server.messages) == 1


async def test_a_slow_group_is_not_a_stalled_command(
        world: World, raw: Callable[..., Any]) -> None:
    # Every reply well within stall_timeout, as one at a time: no command stalled. Counted
    # as one wait, the group stalled, and a stalled worker leaves its connection slot to
    # another (a tarpit got twice max_connections).
    rcpts = [f"r{i}@dest.test" for i in range(5)]
    server = await raw(delay=lambda line: 0.15 if line[:4].upper() == b"RCPT" else 0,
                       delivery={"stall_timeout": "400ms"})
    await world.submit(rcpts)
    records = [await _first_record(world, rcpt) for rcpt in rcpts]
    assert [r["type"] for r in records] == ["Delivery"] * 5, records
    assert len(server.messages) == 1
    assert world.node is not None
    assert world.node.metrics.stalled_commands._value.get() == 0


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_a_server_that_hangs_up_after_ehlo_is_a_failed_connection_not_a_loop(
        world: World, raw: Callable[..., Any], pipelining: bool) -> None:
    # A fresh connection found closed before its first transaction must not be replaced at
    # once (that reconnects as fast as the server answers EHLO, for ever): it failed.
    server = await raw(pipelining=pipelining, close_after=b"EHLO")
    await world.submit(["a@dest.test"])
    record = await _first_record(world, "a@dest.test")
    assert record["type"] == "TransientFailure"
    assert "4.4.2" in record["response"] or "4.4.1" in record["response"]
    assert server.connections < 5, server.connections
    assert server.messages == []
