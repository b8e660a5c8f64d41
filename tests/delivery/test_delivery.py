"""The delivery engine against a real DNS server and scripted SMTP servers on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import time
from typing import Any

import pytest

from mta.node import Node
from tests.support import Sink, SinkScript, World, greylisting_script, message, wait_until


def _mx(*hosts: tuple[int, str]) -> dict[str, Any]:
    return {"MX": list(hosts)}


async def test_mx_preference_then_fallback_to_next_mx(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx1.dest.test"), (20, "mx2.dest.test")),
                "mx1.dest.test": {"A": ["127.0.0.2"]}, "mx2.dest.test": {"A": ["127.0.0.3"]}})
    mx1 = world.sink("127.0.0.2")
    mx2 = world.sink("127.0.0.3")
    await world.start()
    await world.submit(["a@dest.test"])
    await mx1.wait_for(1)
    assert mx2.messages == []
    mx1.stop()  # the preferred MX goes away: the next one takes the mail
    world.node.engine.sites.clear()
    await world.submit(["b@dest.test"], n=1)
    got = await mx2.wait_for(1)
    assert got[0].recipients == ["b@dest.test"]
    assert b"X-Test-Id: 1" in got[0].content
    deliveries = await world.wait_records("Delivery", 2)
    assert {d["site"] for d in deliveries} == {"mx1.dest.test", "mx2.dest.test"}
    assert all(d["node"] == "test-node" and d["attempt"] == 1 for d in deliveries)


async def test_no_mx_falls_back_to_address_record(world: World) -> None:
    world.zone({"plain.test": {"A": ["127.0.0.4"]}})
    sink = world.sink("127.0.0.4")
    await world.start()
    mid = await world.submit(["x@plain.test"])
    await sink.wait_for(1)
    await wait_until(lambda: world.node.spool.live_count() == 0, what="message done")
    await world.wait_records("Delivery", 1)
    recs = world.accounting()
    assert [r["type"] for r in recs if r["message_id"] == mid] == ["Reception", "Delivery"]


async def _dsn_for(world: World, sender_sink: Sink, count: int = 1) -> list[Any]:
    got = await sender_sink.wait_for(count)
    out = []
    for rec in got:
        assert rec.sender == "<>"  # DSNs use the null sender (aiosmtpd keeps it as "<>")
        msg = email.message_from_bytes(rec.content, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"
        assert msg.get_param("report-type") == "delivery-status"
        out.append(msg)
    return out


def _status_fields(dsn: Any) -> str:
    part = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    return "\n".join(str(block) for block in part.get_payload())


async def test_5xx_bounces_with_a_dsn_to_the_sender(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    world.sink("127.0.0.2", SinkScript(rcpt={"gone@dest.test": "550 5.1.1 User unknown"}))
    sender_box = world.sink("127.0.0.5")
    await world.start()
    mid = await world.submit(["gone@dest.test"])
    [dsn] = await _dsn_for(world, sender_box)
    assert sender_box.messages[0].recipients == ["app@sender.test"]
    fields = _status_fields(dsn)
    assert "Final-Recipient: rfc822; gone@dest.test" in fields
    assert "Status: 5.1.1" in fields and "Action: failed" in fields
    assert "550 5.1.1 User unknown" in fields
    headers = next(p for p in dsn.walk() if p.get_content_type() == "text/rfc822-headers")
    assert "X-Test-Id: 0" in headers.get_content()
    [bounce] = await world.wait_records("Bounce", 1)
    assert bounce["message_id"] == mid and bounce["bounce_class"] == "bad-mailbox"
    await wait_until(lambda: world.node.spool.live_count() == 0, what="all done")


async def test_null_mx_and_nxdomain_bounce_at_once_and_dsns_never_bounce(world: World) -> None:
    world.zone({"nomail.test": _mx((0, ".")), "gone.test": "NXDOMAIN"})
    sender_box = world.sink("127.0.0.5")
    await world.start()
    await world.submit(["a@nomail.test", "b@gone.test"])
    [dsn] = await _dsn_for(world, sender_box)
    fields = _status_fields(dsn)
    assert "Status: 5.1.10" in fields and "Status: 5.1.2" in fields
    bounces = await world.wait_records("Bounce", 2)
    assert {b["bounce_class"] for b in bounces} == {"dns-failure"}
    # A message from the null sender that bounces produces no DSN at all.
    await world.submit(["c@gone.test"], sender="")
    await world.wait_records("Bounce", 3)
    # A DSN is queued before its message is done, and delivered before the spool is empty.
    await wait_until(lambda: world.node.spool.live_count() == 0, what="all done")
    assert len(sender_box.messages) == 1


async def test_servfail_is_retried_not_bounced(world: World) -> None:
    dns_server = world.zone({"flaky.test": "SERVFAIL", "mx.flaky.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")
    await world.start()
    mid = await world.submit(["a@flaky.test"])
    failures = await world.wait_records("TransientFailure", 1)
    assert "4.4.3" in failures[0]["response"]
    assert world.node.spool.live_count() == 1
    dns_server.zone["flaky.test"] = _mx((10, "mx.flaky.test"))  # DNS recovers
    world.node.engine.router._cache.clear()
    await sink.wait_for(1)
    [delivery] = await world.wait_records("Delivery", 1)
    assert delivery["message_id"] == mid and delivery["attempt"] >= 2


async def test_connection_reuse_follows_messages_per_connection(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", SinkScript(data_delay=0.02))
    await world.start(max_connections=1, max_messages_per_connection=3)
    for n in range(9):
        await world.submit([f"r{n}@dest.test"], n=n)
    got = await sink.wait_for(9)
    per_session: dict[int, int] = {}
    for rec in got:
        per_session[rec.session] = per_session.get(rec.session, 0) + 1
    assert sorted(per_session.values()) == [3, 3, 3], per_session
    assert sink.max_active == 1


async def test_connection_limit_is_never_exceeded(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", SinkScript(data_delay=0.15))
    await world.start(max_connections=3)
    await asyncio.gather(*(world.submit([f"r{n}@dest.test"], n=n) for n in range(15)))
    await sink.wait_for(15)
    assert sink.max_active == 3  # used the pool fully, never more


async def test_domain_throttle_holds_at_the_sink(world: World) -> None:
    world.zone({"slow.test": _mx((10, "mx.slow.test")), "mx.slow.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")
    await world.start(domains={"slow.test": {"rate": "10/s"}})
    await asyncio.gather(*(world.submit([f"r{n}@slow.test"], n=n) for n in range(16)))
    got = await sink.wait_for(16)
    times = sorted(r.at for r in got)
    # 16 messages at 10/s take at least 1.5 s; no 1-second window holds more than 10 (+2:
    # the sink stamps the end of DATA, and on a loaded machine two sends released 0.1 s
    # apart can finish together at the edge of a window).
    assert times[-1] - times[0] >= 1.4
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 12


async def test_retry_then_success_and_partial_success_across_recipients(world: World) -> None:
    world.zone({"a.test": _mx((10, "mx.a.test")), "mx.a.test": {"A": ["127.0.0.2"]},
                "b.test": _mx((10, "mx.b.test")), "mx.b.test": {"A": ["127.0.0.3"]}})
    sink_a = world.sink("127.0.0.2", SinkScript(rcpt={
        "bad@a.test": "550 5.1.1 No such user",
        # Greylisting: the first attempt is deferred, the next accepted.
        "grey@a.test": lambda addr, n: "450 4.2.0 Greylisted, try again" if n == 0 else None,
    }))
    sink_b = world.sink("127.0.0.3")
    sender_box = world.sink("127.0.0.5")
    await world.start()
    mid = await world.submit(["ok@a.test", "bad@a.test", "grey@a.test", "ok@b.test"])
    await sink_b.wait_for(1)
    await wait_until(lambda: len(sink_a.messages) == 2, what="a.test deliveries")
    assert sink_a.messages[0].recipients == ["ok@a.test"]
    assert sink_a.messages[1].recipients == ["grey@a.test"]
    [dsn] = await _dsn_for(world, sender_box)
    fields = _status_fields(dsn)
    assert "bad@a.test" in fields and "grey@a.test" not in fields and "ok@" not in fields
    await wait_until(lambda: any(r["type"] == "Delivery" and r["recipient"] == "grey@a.test"
                                 for r in world.accounting()), what="grey delivered")
    recs = [r for r in world.accounting() if r["message_id"] == mid]
    kinds = sorted((r["type"], r.get("recipient", "")) for r in recs)
    assert kinds == sorted([("Reception", ""), ("Delivery", "ok@a.test"),
                            ("Delivery", "ok@b.test"), ("Bounce", "bad@a.test"),
                            ("TransientFailure", "grey@a.test"), ("Delivery", "grey@a.test")])
    await wait_until(lambda: world.node.spool.live_count() == 0, what="message done")


async def test_expiration_bounces_after_max_age(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    world.sink("127.0.0.2", SinkScript(rcpt={"full@dest.test": "452 4.2.2 Mailbox full"}))
    sender_box = world.sink("127.0.0.5")
    await world.start(max_age="1s")
    await world.submit(["full@dest.test"])
    [dsn] = await _dsn_for(world, sender_box)
    assert "delivery time expired" in dsn["Subject"]
    part = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    [rcpt] = part.get_payload()[1:]
    # Given up on when its retry period ran out: failed, with a class 4 status (RFC 3464
    # 2.3.3; RFC 3463 X.4.7 delivery time expired); the remote's last reply is the diagnostic.
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == (
        "rfc822; full@dest.test", "failed", "4.4.7")
    assert "452 4.2.2 Mailbox full" in " ".join(str(rcpt["Diagnostic-Code"]).split())
    [exp] = await world.wait_records("Expiration", 1)
    assert exp["attempt"] >= 2
    assert any(r["type"] == "TransientFailure" for r in world.accounting())


async def test_circuit_breaker_opens_then_a_probe_recovers(world: World) -> None:
    world.zone({"down.test": _mx((10, "mx.down.test")), "mx.down.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", start=False)  # nothing listens yet: connection refused
    await world.start(breaker_failures=2, breaker_cooldown="500ms")
    for n in range(3):
        await world.submit([f"r{n}@down.test"], n=n)
    await world.wait_records("TransientFailure", 3)
    site = world.node.engine.sites["mx.down.test"]
    await wait_until(lambda: site.breaker.state in ("open", "half-open"), what="breaker open")
    assert world.node.spool.live_count() == 3  # nothing bounced, all still queued
    sink.start()
    await sink.wait_for(3, timeout=15)
    assert site.breaker.state == "closed"


async def test_421_makes_the_site_back_off(world: World) -> None:
    world.zone({"busy.test": _mx((10, "mx.busy.test")), "mx.busy.test": {"A": ["127.0.0.2"]}})
    world.sink("127.0.0.2", SinkScript(
        data_reply=lambda rcpts, n: "421 4.7.0 Too many messages, slow down" if n < 1 else None))
    await world.start(rate="50/s", retry_initial="30s")
    await world.submit(["a@busy.test"])
    await world.wait_records("TransientFailure", 1)
    site = world.node.engine.sites["mx.busy.test"]
    assert site.backoff.factor == 0.5
    assert site._effective_rate() == pytest.approx(25.0)
    # Retry now instead of in 30 s. The record is in the accounting log a moment before the
    # retry is scheduled (the line goes out with the state write): flush once it is.
    await wait_until(lambda: world.node.engine.flush() == 1, what="the retry to flush")
    await world.wait_records("Delivery", 1)
    assert site.backoff.factor > 0.5  # recovering after a success


async def test_suspended_domain_holds_mail_until_resumed(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")
    node = await world.start()
    await node.coordinator.change_runtime(suspended={"dest.test": True})
    began = time.time()
    mid = await world.submit(["a@dest.test"])
    # Its attempt found the domain suspended and put it off, without counting an attempt.
    assert node.engine is not None
    await wait_until(lambda: bool(sink.messages) or (node.engine.next_attempt(mid) or 0) > began,
                     what="the attempt that held it")
    assert (node.spool.live_ref(mid).state or {}).get("att") == 0
    assert sink.messages == [] and node.spool.live_count() == 1
    assert not any(r["type"] == "TransientFailure" for r in world.accounting())
    await node.coordinator.change_runtime(suspended={"dest.test": False})
    await sink.wait_for(1)


async def test_runtime_throttle_override_applies_without_restart(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")
    node = await world.start()
    await node.coordinator.change_runtime(throttles={"dest.test": 5.0})
    await asyncio.gather(*(world.submit([f"r{n}@dest.test"], n=n) for n in range(6)))
    got = await sink.wait_for(6)
    times = sorted(r.at for r in got)
    assert times[-1] - times[0] >= 0.9  # 6 at 5/s


async def test_opportunistic_starttls_and_required_tls(world: World, tls_files: Any) -> None:
    import ssl

    cert, key = tls_files
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    world.zone({"tls.test": _mx((10, "mx.tls.test")), "mx.tls.test": {"A": ["127.0.0.2"]},
                "plain.test": _mx((10, "mx.plain.test")), "mx.plain.test": {"A": ["127.0.0.3"]}})
    tls_sink = world.sink("127.0.0.2", tls_context=ctx)
    world.sink("127.0.0.3")
    await world.start(domains={"plain.test": {"tls": "required"}})
    await world.submit(["a@tls.test"])
    await world.submit(["b@plain.test"], n=1)
    [got] = await tls_sink.wait_for(1)
    assert b"X-Test-Id: 0" in got.content
    assert got.tls, "the sink offers STARTTLS: the message must have gone over TLS"
    fail = await world.wait_records("TransientFailure", 1)
    assert "4.7.5" in fail[0]["response"]


@pytest.mark.parametrize("first", ["policy.test", "other.test"])
async def test_required_tls_holds_per_domain_on_a_shared_site(world: World, first: str) -> None:
    """Two domains on one MX set share a site: whichever reaches it first, the domain that
    requires TLS is never sent in clear, and the other is not held up by that rule."""
    world.zone({"policy.test": _mx((10, "mx.shared.test")),
                "other.test": _mx((10, "mx.shared.test")),
                "mx.shared.test": {"A": ["127.0.0.2"]}})
    plain = world.sink("127.0.0.2")  # offers no STARTTLS
    await world.start(domains={"policy.test": {"tls": "required"}})
    await world.submit([f"a@{first}"])
    await world.wait_records("TransientFailure" if first == "policy.test" else "Delivery", 1)
    later = "other.test" if first == "policy.test" else "policy.test"
    await world.submit([f"b@{later}"], n=1)
    await world.wait_records("Delivery", 1)
    await world.wait_records("TransientFailure", 1)
    assert [r for m in plain.messages for r in m.recipients] == ["a@other.test" if first ==
                                                                 "other.test" else "b@other.test"]
    [fail] = (await world.wait_records("TransientFailure", 1))[:1]
    assert fail["recipient"].endswith("@policy.test") and "4.7.5" in fail["response"]


async def test_smarthost_routes_everything_to_one_relay(world: World) -> None:
    world.zone({})
    relay = world.sink("127.0.0.2")
    await world.start(smarthost=f"127.0.0.2:{world.port}")
    await world.submit(["a@anywhere.example", "b@elsewhere.example"])
    got = await relay.wait_for(2)
    assert sorted(r for m in got for r in m.recipients) == ["a@anywhere.example",
                                                            "b@elsewhere.example"]
    [site] = world.node.engine.sites
    assert site.startswith("smarthost:")


async def test_dropped_connection_is_retried_and_then_delivered(world: World) -> None:
    world.zone({"drop.test": _mx((10, "mx.drop.test")), "mx.drop.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", SinkScript(drop_on_data=True))
    await world.start()
    mid = await world.submit(["a@drop.test"])
    [fail] = await world.wait_records("TransientFailure", 1)
    assert fail["message_id"] == mid and "4.4.2" in fail["response"]
    assert sink.messages == []
    sink.script.drop_on_data = False
    got = await sink.wait_for(1)
    assert got[0].recipients == ["a@drop.test"]
    [delivery] = await world.wait_records("Delivery", 1)
    assert delivery["attempt"] >= 2


async def test_inflight_attempts_are_bounded_and_the_rest_wait_queued(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", SinkScript(data_delay=0.1))
    node = await world.start(max_connections=10, max_inflight=2)
    await asyncio.gather(*(world.submit([f"r{n}@dest.test"], n=n) for n in range(12)))
    engine = node.engine
    assert engine is not None
    peak = 0

    def all_delivered() -> bool:
        nonlocal peak
        peak = max(peak, engine.attempts_in_flight())
        assert len(engine.scheduler) + engine.attempts_in_flight() + len(sink.messages) \
            >= 12 - 1  # nothing dropped while held back
        return len(sink.messages) >= 12

    await wait_until(all_delivered, timeout=30, what="12 deliveries")
    assert peak == 2
    assert sink.max_active <= 2


async def test_a_throttled_domain_does_not_block_others_on_a_shared_site(world: World) -> None:
    world.zone({})
    relay = world.sink("127.0.0.2")
    await world.start(smarthost=f"127.0.0.2:{world.port}", max_connections=1,
                      domains={"slow.test": {"rate": "1/s"}})
    for n in range(4):
        await world.submit([f"s{n}@slow.test"], n=n)
    await world.submit(["fast@quick.test"], n=99)
    await wait_until(lambda: any(m.recipients == ["fast@quick.test"] for m in relay.messages),
                     timeout=2.0, what="the unthrottled domain's message")
    assert sum(1 for m in relay.messages if m.recipients[0].endswith("@slow.test")) <= 2


async def test_a_failed_done_write_never_resends_an_accepted_recipient(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from mta.spool import SpoolWriteError

    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")
    node = await world.start(retry_initial="100ms")
    real_done = node.spool.mark_done
    failures = {"left": 1}

    async def flaky_done(mid: str, lines: bytes | None = None) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise SpoolWriteError(28, "No space left on device")
        await real_done(mid, lines)

    monkeypatch.setattr(node.spool, "mark_done", flaky_done)
    monkeypatch.setattr(node.engine.queue, "_retry_later",
                        lambda mid, delay=60.0: node.engine.scheduler.add(mid, 0.0))
    await world.submit(["a@dest.test"])
    # A re-send could only come from an attempt before the DONE that finishes the message.
    await wait_until(lambda: node.spool.live_count() == 0, what="message finished")
    assert failures["left"] == 0
    assert len(sink.messages) == 1
    assert len([r for r in world.accounting() if r["type"] == "Delivery"]) == 1


async def test_an_undeliverable_idn_domain_bounces_instead_of_sticking(world: World) -> None:
    world.zone({})
    sender_box = world.sink("127.0.0.5")
    await world.start()
    await world.submit(["bob@☃.net"], message(1, 500), mail_options=["SMTPUTF8"])
    [bounce] = await world.wait_records("Bounce", 1)
    assert "5.1.2" in bounce["response"]
    await sender_box.wait_for(1)


async def test_sweep_schedules_a_live_message_that_nothing_scheduled(world: World) -> None:
    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2")
    node = await world.start(retry_initial="1h")
    await world.submit(["a@dest.test"])
    await sink.wait_for(1)
    # A message that reached the spool without being scheduled (the bug class the sweep
    # guards against): it must still go out.
    from mta.envelope import Envelope

    node.spool.on_new_message = None
    mid = await node.spool.submit(Envelope("app@sender.test", ["b@dest.test"]), message(2, 300))
    assert mid not in node.engine.scheduler
    assert node.engine.sweep() == 1
    got = await sink.wait_for(2)
    assert got[1].recipients == ["b@dest.test"]


async def test_mail_that_waited_longest_goes_first_at_a_busy_site(world: World) -> None:
    # A deferred message's retry (like a dead node's backlog after a takeover) must not wait
    # for everything that arrived since: the site's ready queue is oldest first, not FIFO.
    world.zone({})
    relay = world.sink("127.0.0.2", SinkScript(rcpt=greylisting_script().rcpt,
                                               data_delay=0.05))
    await world.start(smarthost=f"127.0.0.2:{world.port}", max_connections=1,
                      retry_initial="300ms", retry_max="300ms")
    first = await world.submit(["a@later.test"], n=0)  # 451 once, then accepted
    await world.wait_records("TransientFailure", 1)
    await asyncio.gather(*(world.submit([f"b{n}@now.test"], n=n) for n in range(1, 21)))
    await wait_until(lambda: len(relay.messages) >= 21, timeout=10.0, what="21 deliveries")
    order = [m.recipients[0] for m in relay.messages]
    assert order.count("a@later.test") == 1, order
    # 20 x 50 ms are queued when its retry comes due after 300 ms: FIFO would deliver it
    # last (position 20); oldest first puts it next in line.
    assert order.index("a@later.test") < 12, (first, order)


async def test_retry_backoff_doubles_up_to_retry_max_and_a_restart_caps_it(
        world: World) -> None:
    """The schedule end to end: each deferral records its next attempt, retry_initial x 2^(n-1)
    (+-10% jitter) capped at retry_max, and the scheduler waits for exactly that. The clock is
    the test's: every next attempt is taken at once (flush) and checked against the window
    the attempt ran in, so the figures are exact however slow the machine."""
    world.zone({})
    relay = world.sink("127.0.0.2", greylisting_script())  # held.test: 451 for ever
    node = await world.start(smarthost=f"127.0.0.2:{world.port}", retry_initial="100s",
                             retry_max="250s")
    engine = node.engine
    assert engine is not None
    mid = ""

    def attempted(n: int) -> bool:
        ref = node.spool.live_ref(mid)
        return (ref is not None and (ref.state or {}).get("att") == n
                and engine.next_attempt(mid) is not None)

    for attempt, delay in enumerate([100, 200, 250, 250], 1):
        began = time.time()
        if attempt == 1:
            mid = await world.submit(["a@held.test"])
        else:
            assert engine.flush() == 1
        await wait_until(lambda n=attempt: attempted(n), what=f"attempt {attempt} recorded")
        ended = time.time()
        ref = node.spool.live_ref(mid)
        assert ref is not None and ref.state is not None
        due = ref.state["next"]
        assert began + 0.9 * delay <= due <= ended + 1.1 * delay, (
            attempt, delay, due - began, due - ended)
        assert engine.next_attempt(mid) == due
    assert len(relay.refused) == 4
    assert [r["attempt"] for r in world.accounting() if r["type"] == "TransientFailure"] == [
        1, 2, 3, 4]

    # A recorded next attempt is never trusted beyond one retry_max from now: a restart with
    # a lower retry_max (or a clock that jumped back) does not leave the message waiting.
    await node.stop()
    world.node = None
    cfg = dataclasses.replace(node.cfg, delivery=dataclasses.replace(node.cfg.delivery,
                                                                     retry_max=60.0))
    began = time.time()
    world.node = again = Node(cfg)
    await again.start()
    assert again.engine is not None
    await wait_until(lambda: again.engine.next_attempt(mid) is not None, what="rescheduled")
    due = again.engine.next_attempt(mid)
    assert due is not None and began + 60 <= due <= time.time() + 60, due - began


async def test_a_delete_after_a_failed_state_write_keeps_the_delivery_line(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from mta.spool import SpoolWriteError

    world.zone({"dest.test": _mx((10, "mx.dest.test")), "mx.dest.test": {"A": ["127.0.0.2"]}})
    sink = world.sink("127.0.0.2", SinkScript(rcpt={"b@dest.test": "451 4.3.0 try later"}))
    node = await world.start()
    assert node.engine is not None
    queue = node.engine.queue
    failed: list[str] = []

    async def full_disk(mid: str, state: dict[str, Any], lines: bytes | None = None) -> None:
        failed.append(mid)
        raise SpoolWriteError(28, "No space left on device")

    monkeypatch.setattr(node.spool, "update_state", full_disk)
    mid = await world.submit(["a@dest.test", "b@dest.test"])
    await sink.wait_for(1)  # a accepted, b deferred: the state write with a's line fails
    await wait_until(lambda: bool(failed) and mid in queue._unsaved
                     and mid not in queue._inflight, what="the failed state write")
    assert [r for r in world.accounting() if r["type"] == "Delivery"] == []
    assert await queue.delete(mid) == 1  # the operator drops b
    records = await world.wait_records("AdminDelete", 1)
    assert [r["recipient"] for r in records if r["type"] == "AdminDelete"] == ["b@dest.test"]
    assert [r["recipient"] for r in world.accounting()
            if r["type"] == "Delivery"] == ["a@dest.test"]
    assert node.spool.live_count() == 0
