"""The owner's in-sync set rules and the catch-up plan, case by case (mta.replication.insync).

The simulation (test_simulation.py) runs these rules against random schedules; these tests
pin each rule to the case that motivated it, so a change that breaks one says which.
"""

from __future__ import annotations

import pytest

from mta.replication.insync import (
    NOTHING,
    CatchUp,
    OwnerReplica,
    SegmentInfo,
    SyncRecord,
    plan_catch_up,
    promotable,
    takeover_record,
)


def seg(seq: int, token: int, size: int) -> SegmentInfo:
    return SegmentInfo(seq, token, size)


# --- the catch-up plan ---------------------------------------------------------------------

OWNER = [seg(1, 7, 500), seg(2, 7, 300), seg(4, 9, 120)]


@pytest.mark.parametrize(("follower", "plan"), [
    # Nothing yet: a full copy from the owner's oldest segment.
    ([], CatchUp(None, NOTHING)),
    # A prefix of the owner's log: resume where it ends.
    ([seg(1, 7, 500), seg(2, 7, 100)], CatchUp(None, (2, 100))),
    ([seg(1, 7, 500), seg(2, 7, 300), seg(4, 9, 120)], CatchUp(None, (4, 120))),
    # Longer than the owner's copy of a segment (the old owner's unacknowledged tail).
    ([seg(1, 7, 500), seg(2, 7, 380)], CatchUp((2, 300), (2, 300))),
    # A segment the owner got from another token (a short-lived owner's): cut from there.
    ([seg(1, 7, 500), seg(2, 7, 300), seg(4, 8, 40)], CatchUp((4, 0), (2, 300))),
    # A segment number the owner never had: cut from there.
    ([seg(1, 7, 500), seg(2, 7, 300), seg(3, 7, 60)], CatchUp((3, 0), (2, 300))),
    # A short segment followed by one from elsewhere: keep the prefix, cut what follows.
    ([seg(1, 7, 200), seg(3, 8, 60)], CatchUp((3, 0), (1, 200))),
    # Segments the owner compacted away are left for its drop; the rest is compared.
    ([seg(0, 5, 900), seg(1, 7, 500)], CatchUp(None, (1, 500))),
])
def test_catch_up_keeps_the_longest_common_prefix(follower: list[SegmentInfo],
                                                  plan: CatchUp) -> None:
    assert plan_catch_up(OWNER, follower) == plan


def test_a_copy_whose_every_segment_was_compacted_away_starts_afresh() -> None:
    # Appending the owner's log after segments it no longer has would leave a hole; the
    # copy is cut whole and gets a full copy.
    assert plan_catch_up([seg(3, 7, 100)], [seg(1, 7, 500)]) == CatchUp((1, 0), NOTHING)




# --- promotion -----------------------------------------------------------------------------

RECORD = SyncRecord(12, "a", {"a": "ca", "b": "cb"})


def test_only_a_member_with_its_own_copy_is_promotable() -> None:
    assert promotable(RECORD, "b", "cb")
    assert not promotable(RECORD, "c", "cc"), "not a member"
    assert not promotable(RECORD, "b", "cb2"), "a member whose disk was replaced"
    assert not promotable(RECORD, "b", None), "a member with no copy at all"
    assert promotable(None, "c", None), "a shard never replicated goes anywhere"


def test_the_record_round_trips_and_refuses_garbage() -> None:
    assert SyncRecord.decode(RECORD.encode()) == RECORD
    with pytest.raises(ValueError):
        SyncRecord.decode(b'{"token": 1, "owner": "a", "members": ["a"]}')


def test_takeover_keeps_the_live_members_and_names_the_new_owner() -> None:
    rec = SyncRecord(12, "a", {"a": "ca", "b": "cb", "c": "cc"})
    new = takeover_record(rec, "b", "cb", 20, live={"b", "c"})
    assert new == SyncRecord(20, "b", {"b": "cb", "c": "cc"})
    assert takeover_record(None, "b", "cb", 3, live={"a", "b"}) == SyncRecord(3, "b", {"b": "cb"})


# --- the owner's rules ---------------------------------------------------------------------


def owner(members: dict[str, str], min_insync: int = 2) -> OwnerReplica:
    rep = OwnerReplica("a", "ca", SyncRecord(5, "a", {"a": "ca", **members}), min_insync, 1.0)
    rep.wrote((1, 100))
    rep.synced((1, 100))
    return rep


def test_a_position_is_acknowledged_only_once_every_member_has_it() -> None:
    rep = owner({"b": "cb", "c": "cc"})
    sb = rep.connected("b", "cb", 0.0)
    sc = rep.connected("c", "cc", 0.0)
    rep.acked("b", (1, 100), 0.1, sb)
    assert rep.advance() == (NOTHING, NOTHING), "c has not acked"
    rep.acked("c", (1, 60), 0.1, sc)
    assert rep.advance() == ((1, 60), (1, 60))
    rep.acked("c", (1, 100), 0.2, sc)
    assert rep.advance() == ((1, 100), (1, 100))
    rep.wrote((1, 150))
    assert rep.advance()[0] == (1, 100), "not durable on the owner yet"


def test_an_ack_from_before_the_current_plan_does_not_count() -> None:
    rep = owner({"b": "cb"})
    stream = rep.connected("b", "cb", 0.0)
    rep.acked("b", (3, 44), 0.1, stream - 1)  # its old copy's end, before the cut
    assert rep.frontier == NOTHING
    rep.acked("b", (1, 100), 0.2, stream)
    assert rep.frontier == (1, 100)


def test_acks_from_a_replaced_disk_do_not_count_for_the_member() -> None:
    rep = owner({"b": "cb"})
    stream = rep.connected("b", "cb-new", 0.0)
    rep.acked("b", (1, 100), 0.1, stream)
    assert rep.frontier == NOTHING
    assert rep.proposal(0.2) == SyncRecord(5, "a", {"a": "ca"}), "proposed out at once"


def test_a_silent_member_is_proposed_out_and_counted_until_that_commits() -> None:
    rep = owner({"b": "cb", "c": "cc"}, min_insync=2)
    sb = rep.connected("b", "cb", 0.0)
    sc = rep.connected("c", "cc", 0.0)
    rep.acked("b", (1, 100), 0.0, sb)
    rep.acked("c", (1, 50), 0.0, sc)
    rep.acked("b", (1, 100), 1.5, sb)
    assert rep.proposal(0.5) is None, "not silent for replica_timeout yet"
    shrink = rep.proposal(1.5)
    assert shrink == SyncRecord(5, "a", {"a": "ca", "b": "cb"})
    assert rep.proposal(1.6) is None, "one change at a time"
    assert rep.advance()[0] == (1, 50), "c still counts while the change is in flight"
    rep.settled(None)
    assert rep.advance()[0] == (1, 50), "the change failed: c still counts"
    assert rep.proposal(1.7) == shrink
    rep.settled(shrink)
    assert rep.advance() == ((1, 100), (1, 100))


def test_below_min_insync_the_shard_is_read_only_but_records_still_settle() -> None:
    rep = owner({}, min_insync=2)
    assert not rep.accepting
    assert rep.advance() == ((1, 100), None)


def test_a_follower_joins_once_it_has_everything_acknowledged_and_counts_from_then() -> None:
    rep = owner({}, min_insync=1)
    assert rep.advance() == ((1, 100), (1, 100))
    stream = rep.connected("b", "cb", 0.0)
    rep.acked("b", (1, 90), 0.1, stream)
    assert rep.proposal(0.1) is None, "behind what was acknowledged"
    rep.acked("b", (1, 100), 0.2, stream)
    grow = rep.proposal(0.2)
    assert grow == SyncRecord(5, "a", {"a": "ca", "b": "cb"})
    rep.wrote((1, 200))
    rep.synced((1, 200))
    assert rep.advance()[0] == (1, 100), "from the proposal on, b's ack is required"
    rep.settled(grow)
    rep.acked("b", (1, 200), 0.3, stream)
    assert rep.advance()[0] == (1, 200)


def test_a_disconnected_member_still_holds_what_it_acked() -> None:
    rep = owner({"b": "cb"})
    stream = rep.connected("b", "cb", 0.0)
    rep.acked("b", (1, 100), 0.0, stream)
    assert rep.advance()[0] == (1, 100)
    rep.disconnected("b")
    assert rep.frontier == (1, 100), "its disk did not forget; the frontier never goes back"
    rep.acked("b", (1, 300), 0.1, stream)
    assert rep.frontier == (1, 100), "nothing is taken from a closed link"


def test_a_new_term_lets_in_only_a_follower_that_has_the_whole_log() -> None:
    rep = OwnerReplica("a", "ca", SyncRecord(5, "a", {"a": "ca", "b": "cb"}), 2, 1.0)
    rep.begin((5, 100), now=0.0)
    far = rep.connected("f", "cf", 0.1)
    rep.acked("f", (1, 50), 0.1, far)
    # b has not answered yet, so the frontier says nothing; f must still not join: the
    # earlier owner may have acknowledged anything up to (5, 100).
    assert rep.proposal(0.2) is None
    rep.acked("f", (5, 100), 0.3, far)
    assert rep.proposal(0.3) is not None and "f" in rep.proposed.members  # type: ignore


def test_a_new_term_gives_members_time_to_answer() -> None:
    rep = OwnerReplica("a", "ca", SyncRecord(5, "a", {"a": "ca", "b": "cb"}), 2, 1.0)
    rep.begin((5, 100), now=10.0)
    assert rep.proposal(10.5) is None, "not silent yet: it has not been asked long"
    assert rep.proposal(11.5) == SyncRecord(5, "a", {"a": "ca"})


def test_a_replaced_disk_is_not_proposed_back_before_it_caught_up() -> None:
    rep = owner({"b": "cb"})
    first = rep.connected("b", "cb", 0.0)
    rep.acked("b", (1, 100), 0.0, first)
    assert rep.advance()[0] == (1, 100)
    again = rep.connected("b", "cb2", 0.1)  # the same node, a new disk
    drop = rep.proposal(0.1)
    assert drop == SyncRecord(5, "a", {"a": "ca"})
    rep.settled(drop)
    assert rep.proposal(0.2) is None, "the new disk has acked nothing"
    rep.acked("b", (1, 100), 0.3, again)
    assert rep.proposal(0.3) == SyncRecord(5, "a", {"a": "ca", "b": "cb2"})


def test_a_copy_the_placement_moved_away_is_pruned_only_above_replicas() -> None:
    # The leader replaced follower b by c (or the shard moved here from b): b stays in the
    # set, its acks required, until c has joined; then b goes and the set is back at two.
    rep = owner({"b": "cb"}, min_insync=2)
    sb = rep.connected("b", "cb", 0.0)
    sc = rep.connected("c", "cc", 0.0)
    rep.acked("b", (1, 100), 0.1, sb)
    assert rep.proposal(0.1, placed=("c",), replicas=2) is None, "c has not caught up"
    assert rep.advance()[0] == (1, 100), "b still counts"
    rep.acked("c", (1, 100), 0.2, sc)
    grow = rep.proposal(0.2, placed=("c",), replicas=2)
    assert grow == SyncRecord(5, "a", {"a": "ca", "b": "cb", "c": "cc"})
    rep.settled(grow)
    prune = rep.proposal(0.3, placed=("c",), replicas=2)
    assert prune == SyncRecord(5, "a", {"a": "ca", "c": "cc"})
    rep.settled(prune)
    assert rep.proposal(0.4, placed=("c",), replicas=2) is None, "never below replicas"
    rep.forget("b")
    rep.wrote((1, 200))
    rep.synced((1, 200))
    rep.acked("c", (1, 200), 0.5, sc)
    assert rep.advance()[0] == (1, 200), "b is no longer waited for"


def test_an_unplaced_follower_is_not_added_and_an_unknown_placement_prunes_nothing() -> None:
    rep = owner({"b": "cb", "c": "cc"}, min_insync=2)
    for node in ("b", "c", "d"):
        rep.acked(node, (1, 100), 0.1, rep.connected(node, f"c{node}", 0.0))
    assert rep.proposal(0.1, placed=("b",), replicas=2) == SyncRecord(
        5, "a", {"a": "ca", "b": "cb"}), "c is beyond replicas and unplaced"
    rep.settled(rep.proposed)
    assert rep.proposal(0.2, placed=("b",), replicas=2) is None, "d is not placed: not added"
    other = owner({"b": "cb", "c": "cc"}, min_insync=2)
    for node in ("b", "c"):
        other.acked(node, (1, 100), 0.1, other.connected(node, f"c{node}", 0.0))
    assert other.proposal(0.2, placed=(), replicas=2) is None, "no placement known yet"


def test_a_follower_needs_nothing_compaction_deleted_to_join() -> None:
    rep = OwnerReplica("a", "ca", SyncRecord(5, "a", {"a": "ca"}), 2, 1.0)
    rep.begin((3, 500), now=0.0)  # the earlier owner may have acknowledged all of it
    stream = rep.connected("b", "cb", 0.1)
    assert rep.proposal(0.1) is None, "b has none of the log yet"
    rep.compacted((3, 0))
    assert rep.proposal(0.2) is None, "segment 3 is still there: b needs it"
    rep.compacted((4, 0))  # every segment up to 3 was dead and is deleted
    assert rep.proposal(0.3) == SyncRecord(5, "a", {"a": "ca", "b": "cb"})
    rep.settled(rep.proposed)
    rep.wrote((4, 100))
    rep.synced((4, 100))
    assert rep.advance()[0] == NOTHING, "from its joining on, b's acks are required"
    rep.acked("b", (4, 100), 0.4, stream)
    assert rep.advance()[0] == (4, 100)


@pytest.mark.parametrize(("write_every", "lag"), [(0.05, 0.2), (0.02, 0.1), (0.1, 0.2)])
def test_a_follower_a_little_behind_joins_under_steady_writes(write_every: float,
                                                              lag: float) -> None:
    """What is acknowledged moves on with every batch the near member acks; a joiner ``lag``
    behind must still get in (the owner waits for it once it is close), and the wait is
    bounded: acknowledgements never stall longer than replica_timeout for it."""
    rep = OwnerReplica("a", "ca", SyncRecord(1, "a", {"a": "ca", "b": "cb"}), 1, 1.0)
    rep.begin((1, 0), 0.0)
    sb, sc = rep.connected("b", "cb", 0.0), rep.connected("c", "cc", 0.0)
    history: list[tuple[float, tuple[int, int]]] = []
    end, t, next_write, next_tick, joined = (1, 0), 0.0, 0.0, 0.0, None
    last_progress, worst_stall, acked = 0.0, 0.0, NOTHING
    while t < 30 and joined is None:
        if t >= next_write:
            end = (1, end[1] + 500)
            rep.wrote(end)
            rep.synced(end)
            history.append((t, end))
            next_write += write_every
        rep.acked("b", end, t, sb)  # the near member: at once
        if seen := [e for (w, e) in history if w <= t - lag]:
            rep.acked("c", seen[-1], t, sc)
        frontier = rep.advance()[0]
        if frontier > acked:
            acked, last_progress = frontier, t
        worst_stall = max(worst_stall, t - last_progress)
        if t >= next_tick:  # the owner's tick: replica_timeout / 4
            if (p := rep.proposal(t)) is not None:
                rep.settled(p)
                joined = t if "c" in p.members else None
            next_tick += 0.25
        t = round(t + 0.01, 2)
    assert joined is not None and joined < 5, "never joined"
    assert worst_stall <= 1.0 + lag, worst_stall


def test_prune_drops_one_copy_at_a_time_and_never_below_replicas() -> None:
    # Four copies in sync, replicas 3, and the placement moved two of them away (c, d) for
    # one new node (e): one of them goes, the other stays until the set is back to three.
    rep = owner({"b": "cb", "c": "cc", "d": "cd"})
    for node in ("b", "c", "d"):
        rep.acked(node, (1, 100), 0.1, rep.connected(node, f"c{node}", 0.0))
    prune = rep.proposal(0.1, placed=("b", "e"), replicas=3)
    assert prune == SyncRecord(5, "a", {"a": "ca", "b": "cb", "d": "cd"}), prune
    rep.settled(prune)
    assert rep.proposal(0.2, placed=("b", "e"), replicas=3) is None, "never below replicas"


def test_no_prune_is_proposed_while_another_change_is_in_flight() -> None:
    # The set holds three copies (replicas 2) and d, placed too, catches up: its grow is in
    # flight when the placement drops c. Nothing else may be proposed until the grow settles,
    # else the grow's member would no longer be required while its change can still commit.
    rep = owner({"b": "cb", "c": "cc"})
    for node in ("b", "c", "d"):
        rep.acked(node, (1, 100), 0.1, rep.connected(node, f"c{node}", 0.0))
    grow = rep.proposal(0.1, placed=("b", "c", "d"), replicas=2)
    assert grow is not None and set(grow.members) == {"a", "b", "c", "d"}
    assert rep.proposal(0.2, placed=("b", "d"), replicas=2) is None, "one change at a time"
    assert rep.proposed == grow
    assert "d" in rep._required()


def test_forget_keeps_a_member_and_it_is_not_taken_for_silent() -> None:
    rep = owner({"b": "cb"})
    rep.acked("b", (1, 100), 0.1, rep.connected("b", "cb", 0.0))
    rep.forget("b")  # still a member: its view (acks, last heard) stays
    assert rep.frontier == (1, 100)
    assert rep.proposal(0.2, placed=("b",), replicas=2) is None, "b is not silent"
    # Nor one that is being added.
    rep = owner({})
    rep.acked("b", (1, 100), 0.1, rep.connected("b", "cb", 0.0))
    grow = rep.proposal(0.1, placed=("b",), replicas=2)
    assert grow is not None and "b" in grow.members
    rep.forget("b")
    assert "b" in rep.followers


# A real loss of liveness found under load (the SIGSTOPped-owner cluster test, 2 runs in 11
# with survivors paused ~1 s at random): a follower dropped as silent came back and began
# joining, the leader then placed the copy elsewhere, and the owner kept requiring the acks
# of a node it no longer streamed to. Every later write on the shard waited for ever.

def test_a_joiner_the_placement_moved_away_holds_nothing_up() -> None:
    # a owns the shard alone (its follower b was dropped as silent); b comes back a little
    # behind and starts joining (its acks are required from now on) ...
    rep = OwnerReplica("a", "ca", SyncRecord(5, "a", {"a": "ca"}), 2, 1.0)
    rep.begin((1, 100), 0.0)
    rep.acked("b", (1, 100), 0.0, rep.connected("b", "cb", 0.0))
    rep.wrote((1, 200))
    rep.synced((1, 200))
    rep.advance()
    assert rep.proposal(0.1, placed=("b",), replicas=2) is None
    assert rep.followers["b"].joining is not None
    # ... when the leader places the shard's copy on c instead: the owner stops streaming to
    # b (owner.py _follow_placement) and c catches up and joins.
    rep.forget("b")
    rep.acked("c", (1, 200), 0.2, rep.connected("c", "cc", 0.2))
    rep.settled(rep.proposal(0.3, placed=("c",), replicas=2))
    assert dict(rep.record.members) == {"a": "ca", "c": "cc"}
    # Every later write is durable on a and c: it must be acknowledged, whatever b did.
    rep.wrote((1, 300))
    rep.synced((1, 300))
    rep.acked("c", (1, 300), 2.0, 1)
    rep.proposal(2.0, placed=("c",), replicas=2)
    assert "b" not in rep._required()
    assert rep.advance()[0] == (1, 300)
