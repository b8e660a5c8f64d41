"""Delivery events (issue 18, webhooks): every accounting record reaches the sending
application's webhook, signed, at least once, in order per message, whatever the receiver
does (a real aiohttp server on loopback that fails and stalls at random), and nothing is
lost or re-ordered across a restart: the cursor on disk moves only after a 2xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.poll import wait_until
from mta.config import ConfigError, config_from_dict
from mta.events import EventCursor
from tests.support.webhook import SECRET, Receiver
from tests.support.world import World

ZONE = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}

# Slow (seconds of waiting on throttles, timeouts and retries): uvloop only, the loop a node
# picks when it is installed; what the loop changes is covered by the faster tests.
ONE_LOOP = pytest.mark.asyncio(loop_factories=["uvloop"])


@pytest.fixture
async def receiver() -> Any:
    r = Receiver(fail=0.3, stall=0.1)
    await r.start()
    yield r
    await r.stop()


def events_section(receiver: Receiver) -> dict[str, Any]:
    return {"events": {"url": f"http://127.0.0.1:{receiver.port}/hook", "secret": SECRET,
                       "batch_size": 7, "timeout": "300ms", "retry_max": "200ms"}}


@ONE_LOOP
async def test_every_record_arrives_signed_in_order_despite_a_flaky_receiver(
        world: World, receiver: Receiver) -> None:
    world.zone(ZONE)
    sink = world.sink("127.0.0.2")
    await world.start(events_section(receiver))
    mids = [await world.submit([f"r{i}@dest.test"], n=i) for i in range(20)]
    await sink.wait_for(20)
    await wait_until(lambda: all(receiver.kinds(m) == ["Reception", "Delivery"] for m in mids),
                     30, "a Reception then a Delivery event for every message")
    assert receiver.refused > 0 and receiver.duplicated, "the receiver never failed"
    assert receiver.bad_signatures == 0
    # What came twice came with the same id: one event per line of the file.
    lines = (world.tmp_path / "acct.jsonl").read_bytes().splitlines()
    assert len(receiver.unique()) == len(lines)
    assert world.node is not None
    await wait_until(lambda: world.node is not None
                     and world.node.metrics.events_backlog.labels("all")._value.get() == 0, 10,
                     "the backlog drained")


@ONE_LOOP
async def test_nothing_is_lost_across_a_restart_while_the_receiver_is_down(
        world: World, tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        receiver.down = True
        world.zone(ZONE)
        sink = world.sink("127.0.0.2")
        await world.start(events_section(receiver))
        first = [await world.submit([f"a{i}@dest.test"], n=i) for i in range(5)]
        await sink.wait_for(5)
        await wait_until(lambda: receiver.refused >= 2, 10, "posts refused while down")
        cursor = EventCursor(str(tmp_path / "acct.jsonl.events-cursor"))
        assert cursor.load()[1] == 0, "the cursor moved without an acknowledgement"
        assert world.node is not None
        await world.node.stop()
        world.node = None
        receiver.down = False
        await world.start(events_section(receiver))
        second = [await world.submit([f"b{i}@dest.test"], n=10 + i) for i in range(3)]
        await wait_until(lambda: all(receiver.kinds(m) == ["Reception", "Delivery"]
                                     for m in first + second), 30, "every event")
        size = (tmp_path / "acct.jsonl").stat().st_size
        await wait_until(lambda: cursor.load()[1] == size, 10, "the cursor at the end")
    finally:
        await receiver.stop()


def test_a_webhook_needs_a_secret_and_an_http_url() -> None:
    with pytest.raises(ConfigError, match=r"\[events\] secret"):
        config_from_dict({"events": {"url": "https://app.example/hook"}})
    with pytest.raises(ConfigError, match=r"\[events\] url"):
        config_from_dict({"events": {"url": "ftp://app.example/", "secret": SECRET}})
