"""Where a replicated shard's copies go, and who may own it: the leader's decisions.

Owners are spread by :func:`cluster.rendezvous.assign` as before replication. Then:

- :func:`place_followers` gives each shard ``replicas - 1`` followers on other nodes: other
  zones first (a zone that fails takes at most one copy), then the rendezvous order, each
  node's follower count within the same bound as owners, and the followers a shard already
  has kept while they still fit (every change of follower is a full copy over the network).
- :func:`promotable_assignment` changes the owners' assignment so that a shard whose record
  exists only ever goes to a live member of its in-sync set: a dead owner's shard to a copy
  that has every acknowledged message, a balanced move only once the new node has caught up
  and joined (it is placed as a follower first). A shard with no live member keeps its old
  owner in the assignment and waits, like Kafka with unclean election off. A draining owner
  hands its shard at once to a live member in service, if it has one.
- :func:`add_handoff_targets` makes the node a shard is to move to a follower of it while it
  catches up (beyond ``replicas - 1``: the copies in sync never drop during a move), and keeps
  the node it is moving to placed until the handover is done. The owner prunes the extra copy
  from the in-sync set once the placed ones are in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cluster.rendezvous import score

__all__ = ["Node", "add_handoff_targets", "place_followers", "promotable_assignment"]


class Node:
    """A member in service: its weight and its zone ("" when zones are not used)."""

    __slots__ = ("weight", "zone")

    def __init__(self, weight: float = 1.0, zone: str = "") -> None:
        self.weight = weight
        self.zone = zone


def place_followers(assignment: Mapping[int, str], nodes: Mapping[str, Node], replicas: int,
                    previous: Mapping[int, Sequence[str]] | None = None
                    ) -> dict[int, list[str]]:
    """``replicas - 1`` followers per assigned shard (fewer if there are not enough nodes)."""
    want = replicas - 1
    if want <= 0 or not nodes:
        return {}
    previous = previous or {}
    total = sum(n.weight for n in nodes.values())
    copies = len(assignment) * min(want, max(len(nodes) - 1, 0))
    cap = {n: math.ceil(copies * v.weight / total) + 1 for n, v in nodes.items()}
    load = dict.fromkeys(nodes, 0)
    out: dict[int, list[str]] = {}
    for shard in sorted(assignment):
        owner = assignment[shard]
        kept = set(previous.get(shard, ()))
        chosen: list[str] = []
        zones = {nodes[owner].zone} if owner in nodes else set()
        for _ in range(want):
            candidates = [n for n in nodes if n != owner and n not in chosen
                          and load[n] < cap[n]]
            if not candidates:
                break
            best = min(candidates, key=lambda n: (
                bool(nodes[n].zone) and nodes[n].zone in zones,  # another zone first
                n not in kept,  # then what it has (no new copy)
                -score(n, shard, nodes[n].weight)))
            chosen.append(best)
            zones.add(nodes[best].zone)
            load[best] += 1
        out[shard] = chosen
    return out


def promotable_assignment(desired: Mapping[int, str], current: Mapping[int, str],
                          members: Mapping[int, Sequence[str]], live: set[str],
                          weights: Mapping[str, float] | None = None) -> dict[int, str]:
    """``desired`` (the balanced assignment), changed so no shard goes to a node outside its
    in-sync set. ``members[shard]``: the live-or-dead members of shards that have a record
    (absent: never replicated, anything goes)."""
    weights = weights or {}
    out = dict(desired)
    for shard, want in desired.items():
        names = members.get(shard)
        if names is None or want in names:
            continue
        now = current.get(shard)
        alive = [n for n in names if n in live]
        serving = [n for n in alive if n in weights] or alive  # in service: not draining
        if now in serving:
            out[shard] = now  # stays until the balanced node has caught up and joined
        elif alive:
            # A dead owner's shard, or a draining one's: to an in-sync copy now (no data copy
            # on the critical path); the balanced node gets it once it has caught up.
            out[shard] = max(serving, key=lambda n: score(n, shard, weights.get(n, 1.0)))
        elif now is not None:
            out[shard] = now  # no live copy with every acknowledged message: wait
        else:
            del out[shard]
    return out


def add_handoff_targets(placed: dict[int, list[str]], owners: Mapping[int, str],
                        balanced: Mapping[int, str], holders: Mapping[int, str],
                        nodes: Mapping[str, Node]) -> None:
    """Add to each shard's followers the node it is to move to (``balanced``, while the owner
    stays where it is until that node has caught up) and the node it is being handed to
    (``owners``, while ``holders`` still holds it), so the holder keeps streaming to it."""
    for shard, followers in placed.items():
        holder = holders.get(shard, owners.get(shard))
        for target in (balanced.get(shard), owners.get(shard)):
            if target in nodes and target != holder and target not in followers:
                followers.append(target)
