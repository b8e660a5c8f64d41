"""The joining follower fix (c77bcb2) reverted in one of its two places at a time: the test in
test_insync.py goes through forget() and then proposal(), so either half alone passes it.
These pin each half: a join is dropped when proposal() finds its follower unplaced, and
when forget() drops the follower."""

from __future__ import annotations

from mta.replication.insync import OwnerReplica, SyncRecord


def joining_b() -> OwnerReplica:
    """a owns the shard alone; b, a little behind what a acknowledged, has begun joining
    (its acks are required from now on)."""
    rep = OwnerReplica("a", "ca", SyncRecord(5, "a", {"a": "ca"}), 2, 1.0)
    rep.begin((1, 100), 0.0)
    rep.acked("b", (1, 100), 0.0, rep.connected("b", "cb", 0.0))
    rep.wrote((1, 200))
    rep.synced((1, 200))
    assert rep.advance()[0] == (1, 200)
    assert rep.proposal(0.1, placed=("b",), replicas=2) is None
    assert rep.followers["b"].joining is not None and "b" in rep._required()
    return rep


def test_a_proposal_that_finds_the_joiner_unplaced_drops_its_join() -> None:
    # Plant: view.joining = None removed from proposal(). The leader's placement names c,
    # not b, before the owner stopped streaming to b (no forget yet).
    rep = joining_b()
    assert rep.proposal(0.2, placed=("c",), replicas=2) is None  # c not connected yet
    assert rep.followers["b"].joining is None
    rep.wrote((1, 300))
    rep.synced((1, 300))
    assert "b" not in rep._required()
    assert rep.advance()[0] == (1, 300), "acknowledgements wait for an unplaced joiner"


def test_a_forgotten_joiner_holds_nothing_up() -> None:
    # Plant: view.joining = None removed from forget(). The owner stops streaming to b; no
    # proposal has run since (one may be in flight, or the placement be unknown for now).
    rep = joining_b()
    rep.forget("b")
    assert "b" not in rep.followers, "a forgotten non-member's view stays"
    rep.wrote((1, 300))
    rep.synced((1, 300))
    assert rep.advance()[0] == (1, 300), "acknowledgements wait for a forgotten joiner"
    # A proposal that knows no placement (empty) does not bring it back either.
    assert rep.proposal(0.3) is None
    assert "b" not in rep._required()


def test_a_forgotten_joiner_is_dropped_while_another_change_is_in_flight() -> None:
    # The same through the owner's order of calls when a change is in flight: proposal()
    # returns at once then, so only forget() can drop the join. d catches up and its grow
    # is in flight when the placement moves b's copy away.
    rep = joining_b()
    rep.acked("d", (1, 200), 0.1, rep.connected("d", "cd", 0.1))
    grow = rep.proposal(0.15, placed=("b", "d"), replicas=3)
    assert grow is not None and set(grow.members) == {"a", "d"}
    rep.forget("b")
    assert rep.proposal(0.2, placed=("d",), replicas=3) is None  # one change at a time
    rep.wrote((1, 300))
    rep.synced((1, 300))
    rep.acked("d", (1, 300), 0.3, rep.followers["d"].stream)
    assert rep.advance()[0] == (1, 300), "acknowledgements wait for a forgotten joiner"
