"""Shard assignment: weighted rendezvous hashing with a load bound.

Plain rendezvous hashing moves few shards when a node joins or leaves, but with 64 shards and
3 nodes one node often gets 26+. Processing shards in a fixed order and skipping nodes that are
full (at most ceil(shards / total weight * weight)) keeps the spread even while staying close
to the unbounded choice, so joins and leaves still move only a fraction of the shards.
"""

from __future__ import annotations

import hashlib
import math

__all__ = ["assign", "score"]


def score(node: str, shard: int, weight: float) -> float:
    """How much ``node`` wants ``shard``: the higher, the sooner it is chosen."""
    digest = hashlib.blake2b(f"{node}/{shard}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest) + 1) / 2.0**64  # in (0, 1]
    return -weight / math.log(h) if h < 1.0 else math.inf


def assign(shards: int, nodes: dict[str, float]) -> dict[int, str]:
    """Map every shard to one of ``nodes`` (node id -> weight > 0); empty if no nodes."""
    if not nodes:
        return {}
    total = sum(nodes.values())
    cap = {n: math.ceil(shards * w / total) for n, w in nodes.items()}
    load = dict.fromkeys(nodes, 0)
    out: dict[int, str] = {}
    for shard in range(shards):
        ranked = sorted(nodes, key=lambda n: score(n, shard, nodes[n]), reverse=True)
        for node in ranked:
            if load[node] < cap[node]:
                out[shard] = node
                load[node] += 1
                break
    return out
