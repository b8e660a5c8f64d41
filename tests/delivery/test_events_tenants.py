"""Delivery events per tenant (issue 18): a tenant with ``[tenants."<name>"] events_url`` gets
its own records (every kind, none of anyone else's) at its own webhook, signed with its
``events_secret`` (else ``[events] secret``), from a cursor of its own; ``[events] url`` still
gets every record. A tenant's receiver that is down holds up neither the global webhook nor
another tenant's, gets its backlog when it comes back, and a restart resumes from the tenant's
cursor without losing a record. Real aiohttp receivers and a real node on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest

from harness.mail import message
from harness.poll import wait_until
from mta.config import config_from_dict
from mta.events import EventCursor, event_id
from mta.node import needs_restart
from tests.support.webhook import SECRET, Receiver
from tests.support.world import World

ACME_SECRET = "acme-0123456789abcdef0123456789ab"
ZONE = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}
KINDS = ["Reception", "Delivery"]

# Like tests/delivery/test_events.py: uvloop only, the loop a node picks when it is installed.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


class Hooks:
    """The three webhooks: the global one (every record, [events] secret), acme's (its own
    secret) and beta's (no secret of its own: [events] secret). Tenant gamma has none."""

    def __init__(self) -> None:
        self.all = Receiver()
        self.acme = Receiver(secret=ACME_SECRET)
        self.beta = Receiver()

    def sections(self, global_url: bool = True) -> dict[str, Any]:
        return {
            "events": {"url": self.all.url if global_url else "", "secret": SECRET,
                       "batch_size": 3, "timeout": "2s", "retry_max": "100ms"},
            "tenants": {"acme": {"events_url": self.acme.url, "events_secret": ACME_SECRET},
                        "beta": {"events_url": self.beta.url},
                        "gamma": {"weight": 2}},
        }


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    h = Hooks()
    for r in (h.all, h.acme, h.beta):
        await r.start()
    yield h
    for r in (h.all, h.acme, h.beta):
        await r.stop()


def tagged(n: int, tenant: str) -> bytes:
    return message(n, 600, extra_headers=f"X-MTA-Tenant: {tenant}\r\n" if tenant else "")


async def send(world: World, tenant: str, numbers: range) -> list[str]:
    """One message per number for ``tenant`` ("": none), one recipient each."""
    return [await world.submit([f"{tenant or 'none'}{n}@dest.test"], body=tagged(n, tenant))
            for n in numbers]


def log_lines(world: World, tenant: str | None = None) -> list[tuple[int, bytes]]:
    """(offset, line) of the accounting log's records (of ``tenant``'s only, if given)."""
    out, offset = [], 0
    for line in (world.tmp_path / "acct.jsonl").read_bytes().splitlines(keepends=True):
        if tenant is None or json.loads(line).get("tenant") == tenant:
            out.append((offset, line))
        offset += len(line)
    return out


def ids(world: World, tenant: str | None = None) -> set[str]:
    return {event_id(line) for _, line in log_lines(world, tenant)}


def cursor(world: World, suffix: str = "") -> EventCursor:
    return EventCursor(str(world.tmp_path / f"acct.jsonl.events-cursor{suffix}"))


def log_size(world: World) -> int:
    return (world.tmp_path / "acct.jsonl").stat().st_size


async def cursors_at_end(world: World, *suffixes: str) -> None:
    """Each of these cursors (``""``: the global one) reaches the end of the log."""
    size = log_size(world)
    for suffix in suffixes:
        path = cursor(world, suffix)
        await wait_until(partial(lambda c: c.load()[1] == size, path), 10,
                         f"{path.path} at the end of the log")


async def all_arrived(receiver: Receiver, mids: list[str], what: str) -> None:
    await wait_until(lambda: all(receiver.kinds(m) == KINDS for m in mids), 15, what)


def metric(world: World, name: str, target: str) -> float:
    assert world.node is not None
    return float(getattr(world.node.metrics, name).labels(target)._value.get())


def settled(world: World, target: str, receiver: Receiver) -> bool:
    """The destination's series count what its receiver took, and nothing waits."""
    return (metric(world, "events_sent", target) == len(receiver.events)
            and metric(world, "events_backlog", target) == 0)


@ONE_LOOP
async def test_each_tenant_webhook_gets_exactly_its_records_signed_with_its_secret(
        world: World, hooks: Hooks) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start(hooks.sections())
    mids = {t: await send(world, t, range(i * 10, i * 10 + 4))
            for i, t in enumerate(("acme", "beta", "gamma", ""))}
    await sink.wait_for(16)
    await all_arrived(hooks.all, [m for ms in mids.values() for m in ms], "every record, global")
    await all_arrived(hooks.acme, mids["acme"], "acme's Reception and Delivery records")
    await all_arrived(hooks.beta, mids["beta"], "beta's Reception and Delivery records")
    # Then only mail of tenants without a webhook, or none: each tenant's cursor still
    # reaches the end of the log, moved past those records without a POST.
    posts = hooks.acme.posts, hooks.beta.posts
    late = await send(world, "gamma", range(50, 52)) + await send(world, "", range(60, 62))
    await all_arrived(hooks.all, late, "the late records, global")
    await cursors_at_end(world, "", ".acme", ".beta")
    assert (hooks.acme.posts, hooks.beta.posts) == posts, "a POST without a record of its own"
    assert set(hooks.all.unique()) == ids(world)
    assert set(hooks.acme.unique()) == ids(world, "acme"), "acme got another's records"
    assert set(hooks.beta.unique()) == ids(world, "beta"), "beta got another's records"
    assert {e["type"] for e in hooks.acme.events} >= set(KINDS)
    for r in (hooks.all, hooks.acme, hooks.beta):
        assert r.bad_signatures == 0 and r.refused == 0
        assert len(r.events) == len(r.unique()), "a record sent twice to a receiver that was up"
    # The same events (body and event_id) as the global webhook's.
    everything = hooks.all.unique()
    for event in [*hooks.acme.events, *hooks.beta.events]:
        assert event == everything[event["event_id"]]
    # Each destination's own series (counted once the shipper has saved its cursor).
    for target, receiver in (("all", hooks.all), ("tenant:acme", hooks.acme),
                             ("tenant:beta", hooks.beta)):
        await wait_until(partial(settled, world, target, receiver), 5,
                         f"{target}: {len(receiver.events)} sent, backlog 0")
        assert metric(world, "events_last_success", target) > 0, target


@ONE_LOOP
async def test_a_tenant_receiver_down_holds_up_nobody_and_gets_its_backlog_after(
        world: World, hooks: Hooks) -> None:
    hooks.acme.down = True
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start(hooks.sections())
    mids: dict[str, list[str]] = {"acme": [], "beta": [], "": []}
    for n in range(9):  # interleaved: acme's records sit between the others'
        tenant = ("acme", "beta", "")[n % 3]
        mids[tenant] += await send(world, tenant, range(n, n + 1))
    await sink.wait_for(9)
    await all_arrived(hooks.all, [m for ms in mids.values() for m in ms], "every record, global")
    await all_arrived(hooks.beta, mids["beta"], "beta's records while acme's receiver is down")
    await wait_until(lambda: hooks.acme.refused >= 3, 10, "acme's POSTs refused")
    assert hooks.acme.events == []
    # acme's cursor never passed its first unacknowledged record (nor did it move into
    # acme's records on a refusal).
    first_acme = log_lines(world, "acme")[0][0]
    assert cursor(world, ".acme").load()[1] <= first_acme
    assert metric(world, "events_backlog", "tenant:acme") > 0
    await wait_until(lambda: metric(world, "events_failures", "tenant:acme") >= 3, 5,
                     "acme's failures counted")
    assert metric(world, "events_failures", "all") == 0
    assert metric(world, "events_failures", "tenant:beta") == 0
    hooks.acme.down = False
    await all_arrived(hooks.acme, mids["acme"], "acme's backlog once its receiver is back")
    await cursors_at_end(world, "", ".acme", ".beta")
    assert set(hooks.acme.unique()) == ids(world, "acme")
    assert hooks.acme.bad_signatures == 0


@ONE_LOOP
async def test_a_restart_resumes_from_the_tenants_own_cursor(
        world: World, hooks: Hooks) -> None:
    hooks.acme.down = True
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start(hooks.sections())
    acme = await send(world, "acme", range(5))  # 10 records: 4 batches at least
    others = await send(world, "", range(10, 12))
    await sink.wait_for(7)
    await all_arrived(hooks.all, acme + others, "every record, global")
    await wait_until(lambda: hooks.acme.refused >= 3, 10, "acme's POSTs refused")
    await cursors_at_end(world, "")  # the global webhook has everything: it sends no more
    assert cursor(world, ".acme").load()[1] <= log_lines(world, "acme")[0][0]
    assert world.node is not None
    await world.node.stop()
    world.node = None
    hooks.acme.down = False
    await world.start(hooks.sections())
    acme += await send(world, "acme", range(20, 22))
    others += await send(world, "gamma", range(30, 31))
    await all_arrived(hooks.acme, acme, "acme's records from before and after the restart")
    await all_arrived(hooks.all, acme + others, "every record, global")
    await cursors_at_end(world, "", ".acme", ".beta")
    assert set(hooks.acme.unique()) == ids(world, "acme")
    # The global webhook resumed from its own cursor: nothing sent to it twice.
    assert len(hooks.all.events) == len(hooks.all.unique()) == len(log_lines(world))
    assert hooks.beta.events == []


@ONE_LOOP
async def test_tenant_webhooks_without_a_global_one(world: World, hooks: Hooks) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start(hooks.sections(global_url=False))
    acme = await send(world, "acme", range(2))
    beta = await send(world, "beta", range(10, 12))
    await send(world, "", range(20, 21))
    await sink.wait_for(5)
    await all_arrived(hooks.acme, acme, "acme's records")
    await all_arrived(hooks.beta, beta, "beta's records")
    assert set(hooks.acme.unique()) == ids(world, "acme")
    assert set(hooks.beta.unique()) == ids(world, "beta")
    await cursors_at_end(world, ".acme", ".beta")
    assert hooks.all.posts == 0 and cursor(world).load() == ("", 0), "no global shipper"


def test_a_reload_that_changes_a_tenant_webhook_needs_a_restart() -> None:
    def cfg(**acme: Any) -> Any:
        return config_from_dict({"events": {"secret": SECRET},
                                 "tenants": {"acme": {"weight": 1, **acme}}})

    base = cfg(events_url="https://a.example/hook")
    assert needs_restart(base, cfg(events_url="https://a.example/hook")) == []
    assert needs_restart(base, cfg(events_url="https://a.example/hook", weight=3)) == []
    for changed in (cfg(), cfg(events_url="https://b.example/hook"),
                    cfg(events_url="https://a.example/hook", events_secret=ACME_SECRET)):
        assert needs_restart(base, changed) == ["tenants.events"]
    assert needs_restart(cfg(), cfg(events_url="https://a.example/hook")) == ["tenants.events"]
