"""Fencing of the etcd coordinator on a real etcd (issue 14, cluster side).

The fence is a timer, not a check after a call: cut the link to etcd silently (a black-hole
proxy, as an iptables DROP rule would) at random points of the keepalive cycle and the host is
fenced at last refresh + fence_after, while etcd still holds its keys. ``may_send`` answers from
the clock, so a paused process says no before any callback has run. Releases run concurrently
and never hold up taking a dead node's shards; a stopping coordinator claims nothing.

The ShardHost here is a test double that records when each call happened (the host is our own
code; what is under test is the coordinator against a real etcd).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aetcd
import pytest

from cluster.coordinator import EtcdCoordinator
from tests.support import BlackHoleProxy, EtcdServer, make_config
from tests.support import wait_until as until

TTL = 2.0

# The slow scenarios (each seconds of waiting on leases, fences and slow hosts) run on uvloop
# only, the loop a node picks when it is installed ([node] loop = "auto"). What the loop
# flavour could change (timers firing, tasks running concurrently, gRPC calls cut off) the
# other tests of this module still check on both loops.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


class Host:
    """A ShardHost whose acquire and release take as long as asked, recording every call."""

    def __init__(self, acquire_delay: float = 0.0, release_delay: float = 0.0) -> None:
        self.acquire_delay = acquire_delay
        self.release_delay = release_delay
        self.owned: set[int] = set()
        self.fenced = False
        self.fence_times: list[float] = []
        self.unfence_times: list[float] = []
        # (monotonic time, "acquire_start" | "acquire_end" | "release_start" | "release_end",
        #  shard)
        self.events: list[tuple[float, str, int]] = []
        self.on_fence: Callable[[], None] | None = None

    def times(self, kind: str, shards: set[int] | None = None) -> list[float]:
        return [t for t, k, s in self.events if k == kind and (shards is None or s in shards)]

    async def acquire_shard(self, shard: int, token: int) -> None:
        self.events.append((time.monotonic(), "acquire_start", shard))
        await asyncio.sleep(self.acquire_delay)
        self.owned.add(shard)
        self.events.append((time.monotonic(), "acquire_end", shard))

    async def release_shard(self, shard: int) -> None:
        self.events.append((time.monotonic(), "release_start", shard))
        await asyncio.sleep(self.release_delay)
        self.owned.discard(shard)
        self.events.append((time.monotonic(), "release_end", shard))

    async def recorded_token(self, shard: int) -> int:
        return 0

    def fence(self, reason: str) -> None:
        self.fence_times.append(time.monotonic())
        self.fenced = True
        if self.on_fence is not None:
            self.on_fence()

    def unfence(self) -> None:
        self.unfence_times.append(time.monotonic())
        self.fenced = False

    def endpoints(self) -> dict[str, str]:
        return {"smtp": "127.0.0.1:25", "admin": ""}


class World:
    """Coordinators of one fresh cluster name on the shared etcd; all stopped at teardown."""

    def __init__(self, tmp_path: Path, etcd: EtcdServer) -> None:
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.name = f"f{uuid.uuid4().hex[:8]}"
        self.prefix = f"/mta/{self.name}/"
        self.coordinators: list[EtcdCoordinator] = []
        self.proxies: list[BlackHoleProxy] = []
        host, port = etcd.endpoint.rsplit(":", 1)
        self.client = aetcd.Client(host=host, port=int(port), timeout=2)

    def coordinator(self, node: str, shards: int, endpoint: str | None = None,
                    ttl: float = TTL, endpoints: list[str] | None = None) -> EtcdCoordinator:
        cfg = make_config(self.tmp_path / node, node={"id": node}, spool={"shards": shards},
                          cluster={"etcd": endpoints or [endpoint or self.etcd.endpoint],
                                   "name": self.name, "lease_ttl": ttl})
        c = EtcdCoordinator(cfg)
        self.coordinators.append(c)
        return c

    async def proxy(self) -> BlackHoleProxy:
        p = await BlackHoleProxy(self.etcd.endpoint).start()
        self.proxies.append(p)
        return p

    async def state(self) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {"assign": {}, "owner": {}}
        for kv in await self.client.get_prefix(self.prefix.encode()):
            kind, _, arg = kv.key.decode()[len(self.prefix):].partition("/")
            if kind in out:
                out[kind][int(arg)] = kv.value.decode()
        return out

    async def wait_state(self, pred: Callable[[dict[str, dict[int, str]]], bool],
                         timeout: float, what: str) -> dict[str, dict[int, str]]:
        deadline = time.monotonic() + timeout
        while True:
            st = await self.state()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {st}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for p in self.proxies:
            p.heal()
        for c in self.coordinators:
            if c._host is not None:
                await asyncio.wait_for(c.stop(), 30)
        # Let the gRPC channels close on this loop: grpc's poller outlives the loop otherwise.
        closing = [t for c in self.coordinators for t in getattr(c.store, "closing", ())]
        if closing:
            await asyncio.wait(closing, timeout=5)
        for p in self.proxies:
            await p.close()
        await self.client.close()


@pytest.fixture
async def world(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[World]:
    w = World(tmp_path, etcd)
    yield w
    await w.close()


def settled(shards: int, owners: dict[int, str] | None = None) -> Callable[[Any], bool]:
    def pred(st: dict[str, dict[int, str]]) -> bool:
        return (len(st["owner"]) == shards and st["owner"] == st["assign"]
                and (owners is None or all(st["owner"][s] == n for s, n in owners.items())))
    return pred


@pytest.mark.slow
@ONE_LOOP
async def test_fence_timer_fires_at_last_refresh_plus_fence_after_while_etcd_is_silent(
        world: World) -> None:
    proxy = await world.proxy()
    host = Host()
    # TTL 2.5 s: fence_after 1.5 s; the refresh cadence (TTL/6) and the call timeout (1 s)
    # are then such that fencing only when a call returns comes about a TTL late.
    c = world.coordinator("n1", shards=4, endpoint=proxy.endpoint, ttl=2.5)
    # What etcd holds at the moment of each fence, read directly (not through the proxy).
    keys_at_fence: list[asyncio.Task[Any]] = []
    host.on_fence = lambda: keys_at_fence.append(asyncio.ensure_future(
        world.client.get_prefix(f"{world.prefix}owner/".encode())))
    await c.start(host)
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    delays: list[float] = []
    for trial in range(6):
        await until(lambda: not host.fenced and len(host.owned) == 4
                    and all(c.may_send(s) for s in range(4)), 10, f"serving (trial {trial})")
        # A random point of the keepalive cycle (one refresh every TTL/6).
        await asyncio.sleep(rng.uniform(0, c.ttl / 3))
        before = len(host.fence_times)
        proxy.cut()
        await until(lambda n=before: len(host.fence_times) > n, c.ttl + 2, "the fence")
        fenced_at, last = host.fence_times[-1], c.last_refresh
        delays.append(fenced_at - last)
        assert fenced_at <= last + c.fence_after + 0.25, (seed, trial, fenced_at - last)
        assert fenced_at < last + c.ttl, (seed, trial, fenced_at - last)
        assert not any(c.may_send(s) for s in range(4))
        held = await keys_at_fence[-1]
        assert len(list(held)) == 4, f"etcd had given keys away before the fence: {seed}"
        proxy.heal()
    print(f"fence delay after the last refresh: {min(delays):.3f}-{max(delays):.3f}s "
          f"(fence_after {c.fence_after:.2f}s, TTL {c.ttl:.1f}s, seed {seed})")


async def test_a_silent_endpoint_costs_a_refresh_retry_not_the_lease(world: World) -> None:
    # The first endpoint goes silent (a black hole) at a random point of the refresh cycle.
    # The refresh in flight there must be abandoned soon enough that its retry on the second
    # endpoint still lands before the fence (1.2 s after the last refresh at TTL 2 s).
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    for trial in range(4):
        proxy = await world.proxy()
        host = Host()
        c = world.coordinator(f"n{trial}", shards=2,
                              endpoints=[proxy.endpoint, world.etcd.endpoint])
        await c.start(host)
        await until(lambda c=c, host=host: len(host.owned) == 2
                    and all(c.may_send(s) for s in range(2)), 10, f"serving (trial {trial})")
        await asyncio.sleep(rng.uniform(0, c.timing.refresh_interval))
        proxy.cut()
        cut_at = time.monotonic()
        # The positive marker: a refresh sent after the cut succeeded (on the other endpoint).
        await until(lambda c=c, t=cut_at: c.last_refresh > t, c.ttl + 2,
                    f"a refresh after the cut (trial {trial}, seed {seed})")
        assert host.fence_times == [], f"fenced by one silent endpoint (trial {trial}, {seed})"
        await c.stop()


async def test_may_send_answers_from_the_clock_after_a_pause(world: World) -> None:
    host = Host()
    c = world.coordinator("n1", shards=4)
    await c.start(host)
    await until(lambda: len(host.owned) == 4, 10, "4 shards owned")
    shard = 2
    token = next(i.token for i in await c.shards() if i.shard == shard)
    assert c.may_send(shard) and not c.may_send(4)
    # Pause the whole process (as SIGSTOP would) past the fence deadline: no callback runs.
    paused_at = time.monotonic()
    time.sleep(max(0.0, c.fence_deadline - time.monotonic()) + 0.05)  # noqa: ASYNC251
    assert not c.may_send(shard)
    assert host.fence_times == []  # the answer came from the clock, not from a callback
    # Back on the loop: the timer fences at once; then the node rejoins with a new lease and
    # claims the shard again with a newer token. may_send stays False until then.
    await until(lambda: bool(host.fence_times), 1, "the fence timer")
    deadline = time.monotonic() + 10
    while not c.may_send(shard):
        assert time.monotonic() < deadline, "never sending again"
        await asyncio.sleep(0.01)
    assert host.unfence_times and host.unfence_times[0] > host.fence_times[0]
    assert c.last_refresh > paused_at
    released = host.times("release_end", {shard})
    assert released and released[0] < host.times("acquire_end", {shard})[-1]
    assert next(i.token for i in await c.shards() if i.shard == shard) > token


async def test_may_send_is_false_once_the_shard_has_another_owner(world: World) -> None:
    host = Host()
    c = world.coordinator("n1", shards=4)
    await c.start(host)
    await until(lambda: len(host.owned) == 4, 10, "4 shards owned")
    key = f"{world.prefix}owner/1".encode()
    token = next(i.token for i in await c.shards() if i.shard == 1)
    await world.client.delete(key)  # deleted by hand, then claimed by someone else
    await world.client.put(key, b"intruder")
    await until(lambda: not c.may_send(1), 2 * c.ttl, "may_send(1) False")
    await until(lambda: 1 not in host.owned, 2 * c.ttl, "shard 1 released")
    assert all(c.may_send(s) for s in (0, 2, 3))
    await world.client.delete(key)
    await until(lambda: c.may_send(1), 2 * c.ttl, "shard 1 claimed again")
    assert next(i.token for i in await c.shards() if i.shard == 1) > token


@ONE_LOOP
async def test_releases_run_at_once_and_never_hold_up_a_dead_nodes_shards(
        world: World) -> None:
    # n1 (leader) and n2 own 6 of 12 shards each. n2 is cut off from etcd (silently) while
    # n3 joins: n1 has shards to hand to n3, each release taking 5 s (a slow in-flight
    # delivery), and must still take n2's shards as soon as n2's lease is gone.
    shards = 12
    ha, hb, hc = Host(), Host(), Host()
    a = world.coordinator("n1", shards)
    await a.start(ha)
    proxy = await world.proxy()
    b = world.coordinator("n2", shards, endpoint=proxy.endpoint)
    await b.start(hb)
    st = await world.wait_state(
        lambda s: settled(shards)(s) and set(s["owner"].values()) == {"n1", "n2"}, 10,
        "n1 and n2 settled")
    dead = {s for s, n in st["owner"].items() if n == "n2"}
    ha.release_delay = 5.0
    ha.events.clear()  # only what follows counts (n2's join had n1 release shards too)
    proxy.cut()
    c = world.coordinator("n3", shards)
    joining = asyncio.create_task(c.start(hc))
    st = await world.wait_state(
        lambda s: settled(shards)(s) and set(s["owner"].values()) == {"n1", "n3"},
        TTL + 2 + 10, "n1 and n3 own every shard")
    await joining
    b_last = b.last_refresh
    took_over = max(ha.times("acquire_end", dead) + hc.times("acquire_end", dead))
    released = {s for _, k, s in ha.events if k == "release_start"}
    assert released, "n1 handed nothing to n3: the scenario did not happen"
    assert dead & {s for _, k, s in ha.events if k == "acquire_end"}, ha.events
    # Concurrent: every release began before the first one ended.
    assert max(ha.times("release_start")) < min(ha.times("release_end")), ha.events
    # n2's shards taken by n1 while n1's releases were still running.
    assert max(ha.times("acquire_end", dead)) < min(ha.times("release_end")), ha.events
    # All of the dead node's shards are served again within TTL + 2 s of its last refresh.
    assert took_over - b_last <= TTL + 2, took_over - b_last
    ha.release_delay = 0.0  # nothing left to show: do not make the teardown wait
    print(f"dead node's {len(dead)} shards served again {took_over - b_last:.2f}s after its "
          f"last refresh; n1 released {len(released)} shards at once")


@ONE_LOOP
async def test_a_stopping_coordinator_claims_nothing_and_releases_what_it_was_claiming(
        world: World) -> None:
    shards = 12
    ha, hd = Host(), Host()
    a = world.coordinator("n1", shards)
    await a.start(ha)
    d = world.coordinator("n4", shards)
    await d.start(hd)
    await world.wait_state(settled(shards), 10, "n1 and n4 settled")
    hb = Host(acquire_delay=2.0, release_delay=0.5)
    b = world.coordinator("n2", shards)
    starting = asyncio.create_task(b.start(hb))
    await until(lambda: bool(hb.times("acquire_start")), 10, "n2 claiming shards")
    began = [0.0]

    async def stop() -> None:
        # Timed in the step that runs stop() up to its first await (where it closes claims):
        # a claim that other tasks start before that step is not "after stop() began".
        began[0] = time.monotonic()
        await b.stop()

    stopping = asyncio.create_task(stop())
    # Meanwhile a peer leaves: the leader hands its shards to n1 and to n2, still a member.
    await d.stop()
    await world.wait_state(lambda s: "n2" in s["assign"].values()
                           and not set(s["assign"].values()) & {"n4"}, 10,
                           "n4's shards offered to n2 while it stops")
    await asyncio.wait_for(stopping, 20)
    await asyncio.wait_for(starting, 10)
    late = [e for e in hb.events if e[1] == "acquire_start" and e[0] >= began[0]]
    assert not late, f"claimed after stop() began: {late}"
    for shard in {s for _, k, s in hb.events if k == "acquire_start"}:
        assert hb.times("acquire_end", {shard}), f"claim of {shard} cut off mid-way"
        assert hb.times("release_end", {shard}), f"shard {shard} never released"
    assert hb.owned == set() and not b._owned
    st = await world.state()
    assert "n2" not in st["owner"].values(), st


async def test_stop_releases_every_shard_at_once(world: World) -> None:
    host = Host(release_delay=1.0)
    c = world.coordinator("n1", shards=8)
    await c.start(host)
    await until(lambda: len(host.owned) == 8, 10, "8 shards owned")
    t0 = time.monotonic()
    await c.stop()
    took = time.monotonic() - t0
    assert host.owned == set()
    assert max(host.times("release_start")) < min(host.times("release_end")), host.events
    assert took < 2 * host.release_delay + 1.0, took  # one release's time, not eight
