"""Where a replicated shard's copies go and who may own it (cluster.placement)."""

from __future__ import annotations

from collections import Counter

from cluster.placement import Node, add_handoff_targets, place_followers, promotable_assignment
from cluster.rendezvous import assign

SHARDS = 64


def nodes(*names: str, zones: str = "") -> dict[str, Node]:
    return {n: Node(1.0, zones[i] if zones else "") for i, n in enumerate(names)}


def test_followers_are_other_nodes_and_evenly_spread() -> None:
    ns = nodes("a", "b", "c", "d")
    owners = assign(SHARDS, {n: 1.0 for n in ns})
    placed = place_followers(owners, ns, replicas=3)
    for shard, followers in placed.items():
        assert len(followers) == 2 and len(set(followers)) == 2
        assert owners[shard] not in followers
    load = Counter(f for fs in placed.values() for f in fs)
    assert max(load.values()) - min(load.values()) <= 2, load


def test_copies_go_to_other_zones_first() -> None:
    ns = nodes("a1", "a2", "b1", "b2", "c1", "c2", zones="aabbcc")
    owners = assign(SHARDS, {n: 1.0 for n in ns})
    placed = place_followers(owners, ns, replicas=3)
    for shard, followers in placed.items():
        zones = {ns[owners[shard]].zone, *(ns[f].zone for f in followers)}
        assert len(zones) == 3, (shard, owners[shard], followers)
    # A small zone cannot take a copy of every shard without overloading its node: every
    # shard still has copies in two zones at least.
    ns = nodes("a1", "a2", "b1", "b2", "c1", zones="aabbc")
    owners = assign(SHARDS, {n: 1.0 for n in ns})
    for shard, followers in place_followers(owners, ns, replicas=3).items():
        assert len({ns[owners[shard]].zone, *(ns[f].zone for f in followers)}) >= 2


def test_a_node_joining_moves_few_followers() -> None:
    before = nodes("a", "b", "c")
    owners = assign(SHARDS, {n: 1.0 for n in before})
    first = place_followers(owners, before, replicas=2)
    after = nodes("a", "b", "c", "d")
    again = place_followers(owners, after, replicas=2, previous=first)
    moved = sum(first[s] != again[s] for s in owners)
    assert 0 < moved <= SHARDS // 2, moved  # d gets its share, the rest stay where they are


def test_fewer_nodes_than_copies_gives_what_there_is() -> None:
    assert place_followers({0: "a"}, nodes("a", "b"), replicas=3) == {0: ["b"]}
    assert place_followers({0: "a"}, nodes("a"), replicas=3) == {0: []}
    assert place_followers({0: "a"}, nodes("a", "b"), replicas=1) == {}


def test_a_dead_owner_s_shard_goes_only_to_a_live_member() -> None:
    desired = {0: "c", 1: "c", 2: "c", 3: "c"}
    current = {0: "a", 1: "a", 2: "a", 3: "b"}
    members = {0: ["a", "b"], 1: ["a"], 2: ["a", "c"]}
    live = {"b", "c"}
    out = promotable_assignment(desired, current, members, live)
    assert out[0] == "b", "the live member, not the balanced choice"
    assert out[1] == "a", "no live member: the shard waits for its owner's copy"
    assert out[2] == "c", "the balanced choice is a member"
    assert out[3] == "c", "never replicated: anywhere"


def test_a_balanced_move_waits_until_the_new_node_joined() -> None:
    out = promotable_assignment({0: "d"}, {0: "a"}, {0: ["a", "b"]}, {"a", "b", "d"})
    assert out[0] == "a"
    out = promotable_assignment({0: "d"}, {0: "a"}, {0: ["a", "b", "d"]}, {"a", "b", "d"})
    assert out[0] == "d"


def test_the_balanced_node_and_the_node_a_shard_is_handed_to_are_placed() -> None:
    ns = nodes("a", "b", "c", "d")
    # a holds shard 0, c is to take it over now (a draining or dead owner's in-sync copy), d
    # is where it belongs once caught up: both are streamed to, besides the follower b.
    placed = {0: ["b"]}
    add_handoff_targets(placed, {0: "c"}, {0: "d"}, {0: "a"}, ns)
    assert sorted(placed[0]) == ["b", "c", "d"]
    # c holds it now: never its own follower; d still catching up.
    placed = {0: ["b"]}
    add_handoff_targets(placed, {0: "c"}, {0: "d"}, {0: "c"}, ns)
    assert sorted(placed[0]) == ["b", "d"]
    # Unowned (no owner key): the node it is assigned to is not its own follower.
    placed = {0: ["b"]}
    add_handoff_targets(placed, {0: "c"}, {0: "c"}, {}, ns)
    assert placed[0] == ["b"]
    # Already placed: not twice. A node out of service (draining): never placed.
    placed = {0: ["b"]}
    add_handoff_targets(placed, {0: "b"}, {0: "e"}, {0: "a"}, ns)
    assert placed[0] == ["b"]
