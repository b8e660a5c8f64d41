"""Throttle, breaker, back-off, bounce classification and DSN format, with injected clocks."""

from __future__ import annotations

import email
import email.policy

import pytest

from mta.bounce.classify import CLASSES, classify
from mta.bounce.dsn import FailedRecipient, build_dsn
from mta.config import ConfigError, config_from_dict, parse_rate
from mta.delivery.breaker import Breaker
from mta.delivery.routes import policy_for
from mta.delivery.throttle import Backoff, Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("spec", "per_second"), [
    ("100/s", 100.0), ("20/m", 20 / 60), ("5000/h", 5000 / 3600), ("2.5/s", 2.5),
    ("86400/d", 1.0)])
def test_rate_specs(spec: str, per_second: float) -> None:
    assert parse_rate(spec) == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["100", "fast", "0/s", "-1/s", "10/w", ""])
def test_bad_rate_specs_name_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"\[delivery\] rate: expected a rate"):
        config_from_dict({"delivery": {"rate": bad or "x"}})


def test_gcra_spaces_events_at_the_rate() -> None:
    clock = Clock()
    throttle = Throttle(10.0, clock=clock)
    waits = [throttle.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    clock.now += 10  # idle time does not build up an unbounded burst
    assert throttle.reserve() == 0.0
    assert throttle.reserve() == pytest.approx(0.1)


def test_gcra_counts_in_a_window() -> None:
    clock = Clock()
    throttle = Throttle(5000 / 3600, burst=10, clock=clock)  # "5000/h", bursts of 10
    sent = 0
    for _ in range(3600 * 4):  # four simulated seconds per tick for an hour
        clock.now += 0.25
        while throttle.reserve() == 0.0:
            sent += 1
        throttle._tat -= 1 / throttle.rate  # undo the refused reservation
    assert 5000 <= sent <= 5010


def test_unlimited_throttle_never_waits() -> None:
    assert all(Throttle(None).reserve() == 0 for _ in range(1000))


def test_backoff_halves_on_421_and_runs_of_4xx_then_recovers() -> None:
    b = Backoff(run=3)
    assert b.on_temp_failure(421) and b.factor == 0.5
    assert not b.on_temp_failure(450) and not b.on_temp_failure(451)
    assert b.on_temp_failure(452) and b.factor == 0.25
    for _ in range(10):
        b.on_success()
    assert b.factor == pytest.approx(0.45)
    for _ in range(100):
        b.on_success()
    assert b.factor == 1.0


def test_breaker_opens_probes_once_and_recovers() -> None:
    clock = Clock()
    br = Breaker(threshold=3, cooldown=10, clock=clock)
    assert br.allow()
    assert not br.on_failure() and not br.on_failure()
    assert br.on_failure() and br.state == "open"
    assert not br.allow()
    clock.now += 10
    assert br.allow() and br.state == "half-open"
    assert not br.allow()  # one probe only
    br.on_failure()  # the probe failed: open again, longer
    assert br.state == "open" and br.cooldown == 20
    clock.now += 20
    assert br.allow()
    br.on_success()
    assert br.state == "closed" and br.cooldown == 10 and br.allow()


@pytest.mark.parametrize(("code", "text", "cls"), [
    (550, "5.1.1 <x@y>: Recipient address rejected: User unknown", "bad-mailbox"),
    (550, "5.2.1 The email account that you tried to reach is disabled", "inactive-mailbox"),
    (552, "5.2.2 Mailbox full", "mailbox-full"),
    (452, "4.2.2 The email account that you tried to reach is over quota", "mailbox-full"),
    (554, "5.7.1 Service unavailable; Client host blocked using Spamhaus", "spam-related"),
    (550, "5.7.1 Message rejected due to local policy", "policy"),
    (550, "5.1.2 Domain gone.test does not exist (NXDOMAIN)", "dns-failure"),
    (556, "5.1.10 Domain accepts no mail (null MX)", "dns-failure"),
    (552, "5.3.4 Message size exceeds fixed maximum", "message-too-large"),
    (451, "4.4.1 Connection timed out", "routing"),
    (500, "something odd", "other"),
])
def test_bounce_classes(code: int, text: str, cls: str) -> None:
    assert cls in CLASSES
    assert classify(code, text) == cls


def test_dsn_is_a_valid_multipart_report() -> None:
    raw = build_dsn(
        reporting_mta="mx.example", postmaster="MAILER-DAEMON@mx.example",
        original_sender="app@example.com",
        original_headers=b"Subject: hello\r\nMessage-ID: <m1@example.com>\r\n",
        arrival=1795000000.0, expired=False, message_id="01TESTID",
        recipients=[FailedRecipient("gone@example.org", "550 5.1.1 User unknown", "mx.org"),
                    FailedRecipient("jörg@exämple.org", "554 5.7.1 Blocked")])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == "app@example.com"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    kinds = [p.get_content_type() for p in msg.iter_parts()]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = msg.get_payload()[1].get_payload()
    per_msg, rcpt1, rcpt2 = status[0], status[1], status[2]
    assert per_msg["Reporting-MTA"] == "dns; mx.example"
    assert rcpt1["Final-Recipient"] == "rfc822; gone@example.org"
    assert rcpt1["Status"] == "5.1.1" and rcpt1["Remote-MTA"] == "dns; mx.org"
    assert rcpt2["Final-Recipient"] == "utf-8; jörg@exämple.org"
    assert "Subject: hello" in msg.get_payload()[2].get_content()


@pytest.mark.parametrize(("expired", "replies", "statuses"), [
    # A bounce is permanent: class 5, even when the remote's reply claims class 4.
    (False, ["550 5.1.1 User unknown", "550 4.1.1 Odd but final", "554 No code given"],
     ["5.1.1", "5.1.1", "5.0.0"]),
    # An expiry gives up on a transient failure: class 4 (RFC 3464 2.3.3, RFC 3463 X.4.7);
    # recipients that bounced permanently in the same attempt keep class 5.
    (True, ["452 4.4.7 Message expired after 9 attempts; last error: 452 4.2.2 Mailbox full",
            "451 Try again later", "550 5.1.1 User unknown", "550 4.1.1 Odd but final"],
     ["4.4.7", "4.4.7", "5.1.1", "5.1.1"]),
])
def test_dsn_status_class_says_why_delivery_stopped(expired: bool, replies: list[str],
                                                    statuses: list[str]) -> None:
    raw = build_dsn(
        reporting_mta="mx.example", postmaster="MAILER-DAEMON@mx.example",
        original_sender="app@example.com", original_headers=b"Subject: hello\r\n",
        arrival=1795000000.0, expired=expired, message_id="01TESTID",
        recipients=[FailedRecipient(f"r{i}@example.org", reply)
                    for i, reply in enumerate(replies)])
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    blocks = msg.get_payload()[1].get_payload()[1:]
    assert [(b["Action"], b["Status"]) for b in blocks] == [("failed", s) for s in statuses]


def test_domain_policy_wildcards() -> None:
    cfg = config_from_dict({"delivery": {"domains": {
        "example.com": {"rate": "1/s"}, "*.example.com": {"rate": "2/s"}, "*": {"rate": "3/s"}}}})
    pol = cfg.delivery.domains
    assert policy_for("example.com", pol).rate == 1.0
    assert policy_for("eu.mail.example.com", pol).rate == 2.0
    assert policy_for("other.org", pol).rate == 3.0
    with pytest.raises(ConfigError, match=r"'x.test'.speed: unknown key"):
        config_from_dict({"delivery": {"domains": {"x.test": {"speed": 3}}}})
