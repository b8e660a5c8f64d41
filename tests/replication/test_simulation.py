"""The replication protocol against thousands of seeded schedules (tests/support/replsim.py).

Each schedule runs owner, followers, the leader's promotion rule and an in-memory etcd over a
network that delays, breaks and partitions, with crashes, disk losses and stalls past the
lease; after every step it checks that every acknowledged batch is on every member's disk,
that a 250 had ``min_insync`` copies, that tokens only grow, that one token is one acker and
that copies never fork; after healing, that nothing acknowledged is lost, the shard accepts
mail again and every member's copy is the owner's log. A failure names its seed: replay it
with ``replsim.run(seed, params)``. ``MTA_SIM_SEEDS`` runs more seeds per shape.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from tests.support.replsim import Params, run

SEEDS = int(os.environ.get("MTA_SIM_SEEDS", "250"))

SHAPES = {
    "3 nodes, 3 copies, min 2": Params(),
    "4 nodes, 3 copies, min 2": Params(nodes=4),
    "3 nodes, 2 copies, min 2": Params(replicas=2),
    "3 nodes, 2 copies, min 1, no disk loss": Params(replicas=2, min_insync=1, wipes=False),
}


def run_seeds(params: Params, seeds: range) -> tuple[int, int, int]:
    """Acknowledged batches, takeovers and disk losses over ``seeds`` (in a worker process)."""
    acked = takeovers = wipes = 0
    for seed in seeds:
        result = run(seed, params)
        acked += result.acked
        takeovers += result.takeovers
        wipes += result.faults.get("disk_lost", 0)
    return acked, takeovers, wipes


# The schedules are pure computation: one worker per core halves the suite's wait.
WORKERS = max(1, min(len(os.sched_getaffinity(0)), 4))


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    """Worker processes for every shape (spawned once: each spawn imports the protocol)."""
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn")) as p:
        yield p


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_no_schedule_breaks_an_invariant(shape: str, pool: ProcessPoolExecutor) -> None:
    params = SHAPES[shape]
    parts = list(pool.map(run_seeds, [params] * WORKERS,
                          [range(w, SEEDS, WORKERS) for w in range(WORKERS)]))
    acked, takeovers, wipes = (sum(p[i] for p in parts) for i in range(3))
    # The schedules must exercise what they claim to: mail acknowledged, owners replaced,
    # disks lost (where allowed).
    assert acked > SEEDS * 50
    assert takeovers > SEEDS
    assert wipes > 0 or not params.wipes


def test_a_schedule_replays_exactly_from_its_seed() -> None:
    assert run(7, Params(steps=120, settle_steps=80)) == run(7, Params(steps=120,
                                                                      settle_steps=80))
