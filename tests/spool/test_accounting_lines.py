"""The Reception line (mta/accounting.py ``reception``, written out field by field) is the
line the general path makes of the same record (``line()``: a dict through the JSON
encoder): the same bytes, for any sender, recipients, address, size, time and labels.
Recovery, reconciliation, the SLO's count and the events webhook read these bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mta.accounting import AccountingLog
from mta.envelope import Envelope

_MID = "01KBC4Z5R8000G2X6Y5N3P7QAB"


@pytest.mark.parametrize("envelope", [
    Envelope("app@sender.test", ["r@dest.test"], client_ip="192.0.2.7"),
    Envelope("", ["postmaster@dest.test", "b@dest.test", "c@dest.test"], client_ip=""),
    Envelope('"odd \\"quoted\\" local"@x.test', ["tab\there@x.test", "ctl\x01\x1f@x.test"],
             client_ip="2001:db8::1"),
    Envelope("jörg@bücher.example", ["用户@例子.广告", "\u2028\u2029@x.test", "😀@x.test"],
             smtputf8=True, client_ip="127.0.0.1"),
    Envelope("a@b.test", ["r@dest.test"], client_ip="127.0.0.1", tenant="acme"),
    Envelope("a@b.test", ["r@dest.test"], client_ip="127.0.0.1", campaign="spring-sale"),
    Envelope("a@b.test", ["r@dest.test"], client_ip="127.0.0.1", tenant="acme",
             campaign="spring.2026_a-b"),
])
@pytest.mark.parametrize("now", [1764590000.123456, 1764590000.5, 1764590000.1234567, 0.0])
@pytest.mark.parametrize("size", [0, 5321, 2**40])
def test_the_reception_line_is_the_general_lines_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, envelope: Envelope, now: float,
        size: int) -> None:
    accounting = AccountingLog(tmp_path / "accounting.log", "node-é\"1")
    monkeypatch.setattr("time.time", lambda: now)
    ours = accounting.reception(_MID, envelope, size)
    general = accounting.line("Reception", _MID, sender=envelope.sender,
                              recipients=envelope.recipients, size=size,
                              client_ip=envelope.client_ip, **envelope.labels())
    assert ours == general
    record = json.loads(general)
    assert [k for k in record if k in ("tenant", "campaign")] == list(envelope.labels())
    assert record["time"] == round(now, 6)
