"""Outbound PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write when the server
offers it, one command at a time when it does not; every reply of a group judged as the
one-at-a-time path judges it. Against a raw scripted server (tests/support/rawsmtp.py) that
shows how the client grouped its commands, and the protocol alone on a loopback socket."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.email import quote_address

from mta.delivery import pipelining
from tests.support import World, wait_until
from tests.support.rawsmtp import pipelining_client


def _records(world: World, kind: str) -> list[dict[str, Any]]:
    return [r for r in world.accounting() if r["type"] == kind]


async def test_the_envelope_goes_in_one_group_when_the_server_offers_pipelining(
        world: World, raw: Callable[..., Any]) -> None:
    # No reply before DATA is read: a client waiting for MAIL's reply would never send more.
    server = await raw(hold_until=b"DATA")
    await world.submit(["a@dest.test", "b@dest.test"])
    await world.wait_records("Delivery", 2)
    assert server.verbs()[:5] == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA"]
    assert len(server.messages) == 1 and b"X-Test-Id: 0" in server.messages[0]


async def test_one_command_at_a_time_when_the_server_does_not_offer_it(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(pipelining=False, hold_until=b"DATA")
    await world.submit(["a@dest.test"])
    # The client waits for MAIL's reply, which this server holds back: nothing follows MAIL.
    await wait_until(lambda: b"MAIL" in server.verbs(), 10, "MAIL")
    await asyncio.sleep(0)  # a pipelining client's RCPT would be in the same write
    assert server.verbs() == [b"EHLO", b"MAIL"]
    server.release()
    await world.wait_records("Delivery", 1)
    assert server.verbs()[:4] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]


async def test_a_refused_recipient_in_a_group_bounces_and_the_others_get_the_message(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=lambda line: b"550 5.1.1 no such user\r\n"
                       if line.upper().startswith(b"RCPT TO:<GONE@") else None)
    await world.submit(["gone@dest.test", "ok@dest.test"])
    [bounce] = await world.wait_records("Bounce", 1)
    deliveries = await world.wait_records("Delivery", 2)  # and the DSN's
    assert "ok@dest.test" in {d["recipient"] for d in deliveries}
    assert bounce["recipient"] == "gone@dest.test" and "550 5.1.1" in bounce["response"]
    assert len(server.messages) == 1


class _Strict:
    """A server that answers as RFC 2920 asks after a refused MAIL: 503 to what follows."""

    def __init__(self, mail: bytes) -> None:
        self.mail = mail
        self.refused = False

    def __call__(self, line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            self.refused = True
            return self.mail
        if verb in (b"RCPT", b"DATA") and self.refused:
            return b"503 5.5.1 need MAIL\r\n"
        if verb == b"RSET":
            self.refused = False
        return None


async def test_a_refused_mail_defers_everyone_with_its_reply_and_resets(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=_Strict(b"451 4.7.1 try later\r\n"))
    await world.submit(["a@dest.test", "b@dest.test"])
    failures = await world.wait_records("TransientFailure", 2)
    assert all("451 4.7.1 try later" in f["response"] for f in failures[:2])
    await wait_until(lambda: b"RSET" in server.verbs(), 10, "RSET")
    assert server.messages == [] and server.cut_in_data == 0




async def test_a_refused_data_is_every_accepted_recipients_result(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=lambda line: b"554 5.7.1 not from you\r\n"
                       if line.upper().startswith(b"DATA") else None)
    await world.submit(["a@dest.test", "b@dest.test"])
    bounces = await world.wait_records("Bounce", 2)
    assert {b["recipient"] for b in bounces} == {"a@dest.test", "b@dest.test"}
    assert all("554 5.7.1" in b["response"] for b in bounces)
    await wait_until(lambda: b"RSET" in server.verbs(), 10, "RSET")
    assert server.messages == []


async def test_a_refused_message_after_354_bounces(world: World, raw: Callable[..., Any]
                                                  ) -> None:
    await raw(message_reply=b"554 5.6.0 content rejected\r\n")
    await world.submit(["a@dest.test"])
    [bounce] = await world.wait_records("Bounce", 1)
    assert "554 5.6.0 content rejected" in bounce["response"]


async def test_421_and_gone_in_a_group_defers_with_the_421(
        world: World, raw: Callable[..., Any]) -> None:
    await raw(script=lambda line: b"421 4.3.2 shutting down\r\n"
              if line.upper().startswith(b"MAIL") else None, close_after=b"MAIL")
    await world.submit(["a@dest.test"])
    [failure, *_] = await world.wait_records("TransientFailure", 1)
    assert "421 4.3.2 shutting down" in failure["response"]


async def test_a_connection_lost_in_a_group_defers_as_lost(
        world: World, raw: Callable[..., Any]) -> None:
    server = await raw(script=lambda line: b"" if line.upper().startswith(b"RCPT") else None,
                       close_after=b"RCPT")
    await world.submit(["a@dest.test"])
    [failure, *_] = await world.wait_records("TransientFailure", 1)
    assert "4.4.2" in failure["response"] and "lost" in failure["response"]
    assert server.messages == []


# --- the protocol alone ------------------------------------------------------------------



def _group() -> list[bytes]:
    return [pipelining.mail_command("a@x.test", [], "ascii"),
            pipelining.rcpt_command("b@y.test", "ascii"), b"DATA\r\n"]


async def test_replies_split_a_byte_at_a_time_and_multi_line_are_read_in_order() -> None:
    answers = {b"MAIL": b"250-first\r\n250 sender ok\r\n", b"RCPT": b"251 will forward\r\n",
               b"DATA": b"354 go\r\n", b"NOOP": b"250 fine\r\n"}
    smtp, server, got = await pipelining_client(lambda line: answers.get(line[:4]), drip=True)
    try:
        replies = await pipelining.envelope(smtp, _group(), timeout=10)
        assert [(r.code, r.message) for r in replies] == [
            (250, "first\nsender ok"), (251, "will forward"), (354, "go")]
        assert got[-3:] == [b"MAIL FROM:<a@x.test>\r\n", b"RCPT TO:<b@y.test>\r\n",
                            b"DATA\r\n"]
        # Commands one at a time still work on the same connection afterwards.
        reply = await smtp.noop()
        assert reply.code == 250
    finally:
        smtp.close()
        server.close()


async def test_a_group_that_gets_no_reply_times_out_and_closes_the_connection() -> None:
    smtp, server, _ = await pipelining_client(lambda line: b"250 ok\r\n" if line[:4] == b"NOOP"
                                     else None)
    try:
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await pipelining.envelope(smtp, _group(), timeout=0.2)
        assert not smtp.is_connected
    finally:
        server.close()


async def test_the_first_reply_has_its_own_deadline() -> None:
    smtp, server, _ = await pipelining_client(lambda line: None)
    try:
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await pipelining.envelope(smtp, _group(), timeout=30, first_timeout=0.2)
        assert not smtp.is_connected
    finally:
        server.close()


async def test_an_unreadable_reply_ends_the_connection() -> None:
    smtp, server, _ = await pipelining_client(lambda line: b"hello there\r\n")
    try:
        with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="unreadable reply"):
            await pipelining.envelope(smtp, _group(), timeout=10)
        assert not smtp.is_connected
    finally:
        server.close()


def test_quoting_equals_aiosmtplibs_on_random_addresses() -> None:
    rng = random.Random(20261201)
    alphabet = 'ab.@-+_"<> ()\\,;:[]\x00\x7f\té'
    cases = ["", "a@b", "a.b@c.d", "<a@b>", "a@b c", '"x y"@z', "é@x.test", "a@@b", "@b",
             "a@", ".a@b.", "x@[127.0.0.1]"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
              for _ in range(20_000)]
    for address in cases:
        for encoding in ("ascii", "utf-8"):
            try:
                want: bytes | type[Exception] = quote_address(address).encode(encoding)
            except ValueError as exc:
                want = type(exc)
            try:
                have: bytes | type[Exception] = pipelining._quoted(address, encoding)
            except ValueError as exc:
                have = type(exc)
            assert have == want, (address, encoding)
