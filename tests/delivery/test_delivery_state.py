"""The typed delivery state reads every STATE record the engine has written (golden wire dicts,
as the dict-building engine wrote them) and writes what it reads back unchanged."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mta.queue.state import DeliveryState, FinalResult, RecipientStatus, final_indexes
from mta.spool.index import MessageRef
from mta.spool.record import ScannedRecord, encode_state, scan

D, B = RecipientStatus.DELIVERED, RecipientStatus.BOUNCED

# (wire dict as written, the state it means). Each was built by the engine before the typed
# state existed; the comment says which write.
GOLDEN: list[tuple[dict[str, Any] | None, DeliveryState]] = [
    # A message never attempted has no STATE record at all.
    (None, DeliveryState()),
    # An attempt's end after a deferral: {"att", "next", "r", "last"}.
    ({"att": 1, "next": 1764500000.125, "r": {},
      "last": "451 4.7.1 Greylisted, try again later"},
     DeliveryState(1, 1764500000.125, {}, "451 4.7.1 Greylisted, try again later")),
    # A first attempt's intermediate write ({**state, "r": done} with no state yet): one
    # domain done while another was still in flight.
    ({"r": {"0": ["d", "250 2.0.0 Ok: queued", "", "mx.a.test"]}},
     DeliveryState(0, 0.0, {0: FinalResult(D, "250 2.0.0 Ok: queued", "", "mx.a.test")}, "")),
    # Delivered, bounced with a class, expired, an operator's bounce (class "admin", no
    # remote), and a recipient still pending (1).
    ({"att": 3, "next": 1764503600.5,
      "r": {"0": ["d", "250 2.0.0 ok", "", "mx.a.test"],
            "2": ["b", "550 5.1.1 No such user", "bad-mailbox", "mx.b.test"],
            "3": ["b", "451 4.4.7 Message expired after 3 attempts; last error: 451 4.2.0 "
                       "busy", "other", "mx.c.test"],
            "4": ["b", "550 5.0.0 Message bounced by the administrator", "admin", ""]},
      "last": "451 4.2.0 busy"},
     DeliveryState(3, 1764503600.5, {
         0: FinalResult(D, "250 2.0.0 ok", "", "mx.a.test"),
         2: FinalResult(B, "550 5.1.1 No such user", "bad-mailbox", "mx.b.test"),
         3: FinalResult(B, "451 4.4.7 Message expired after 3 attempts; last error: 451 4.2.0 "
                           "busy", "other", "mx.c.test"),
         4: FinalResult(B, "550 5.0.0 Message bounced by the administrator", "admin", "")},
         "451 4.2.0 busy")),
    # Only a suspended domain left: no attempt counted, the earlier last reply kept.
    ({"att": 0, "next": 1764500060.0, "r": {}, "last": ""}, DeliveryState(0, 1764500060.0)),
    # A bounce that found no remote (the route lookup failed for good).
    ({"att": 1, "next": 1764500001.0,
      "r": {"1": ["b", "550 5.1.2 Domain x.test has no mail server (null MX)",
                  "bad-domain", ""]}, "last": ""},
     DeliveryState(1, 1764500001.0, {
         1: FinalResult(B, "550 5.1.2 Domain x.test has no mail server (null MX)",
                        "bad-domain", "")})),
]


def _through_the_spool(wire: dict[str, Any]) -> dict[str, Any]:
    """``wire`` as a STATE record holds it on disk and a scan gives it back (msgpack)."""
    [rec] = [r for r in scan(encode_state("01M8P6A0M20000C68WTX8G0000", wire))
             if isinstance(r, ScannedRecord)]
    return rec.meta[2]


@pytest.mark.parametrize(("wire", "state"), GOLDEN)
def test_golden_wire_dicts_decode(wire: dict[str, Any] | None, state: DeliveryState) -> None:
    assert DeliveryState.from_wire(wire) == state
    if wire is not None:
        assert DeliveryState.from_wire(_through_the_spool(wire)) == state
        assert final_indexes(wire) == frozenset(state.results)


@pytest.mark.parametrize(("wire", "state"), GOLDEN)
def test_round_trip(wire: dict[str, Any] | None, state: DeliveryState) -> None:
    again = state.to_wire()
    assert DeliveryState.from_wire(again) == state
    assert DeliveryState.from_wire(_through_the_spool(again)) == state
    if wire is not None and set(wire) == {"att", "next", "r", "last"}:
        # A complete state is written back exactly as it was read.
        assert again == wire
        assert msgpack.packb(again) == msgpack.packb(wire)


def test_the_wire_keys_and_letters() -> None:
    state = DeliveryState(2, 5.0, {1: FinalResult(D, "250 ok", "", "mx"),
                                   0: FinalResult(B, "550 no", "bad-mailbox", "mx")}, "451 x")
    assert state.to_wire() == {"att": 2, "next": 5.0, "last": "451 x",
                               "r": {"1": ["d", "250 ok", "", "mx"],
                                     "0": ["b", "550 no", "bad-mailbox", "mx"]}}
    assert state.pending(3) == [2]


@pytest.mark.parametrize("bad", [{"r": {"0": ["q", "250 ok", "", ""]}},
                                 {"r": {"0": ["d", "250 ok"]}},
                                 {"r": {"zero": ["d", "250 ok", "", ""]}}])
def test_a_malformed_state_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DeliveryState.from_wire(bad)


def test_the_index_reads_pending_domains_through_the_state_type() -> None:
    wire = GOLDEN[3][0]
    ref = MessageRef("m", 0, 0, 0, wire, domains=("a.test", "b.test", "c.test"),
                     rcpt_map=bytes([0, 1, 1, 2, 0]))
    # Recipient 1 (b.test) is the only one without a final result.
    assert ref.pending_domains() == ("b.test",)
