"""Node life: a failed start closes what it opened; a failing background loop goes on."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from mta.config import Config
from mta.coordinator import LocalCoordinator, ShardHost
from mta.node import Node, StartupError
from mta.supervise import supervise
from tests.support import free_port, make_config
from tests.support import wait_until as _until


class _CoordinatorThatFailsHalfWay(LocalCoordinator):
    """Takes one shard, then fails as an unreachable etcd does (RuntimeError): the worst case,
    since the host already holds a shard and its segment files when the start fails."""

    async def start(self, host: ShardHost) -> None:
        await host.acquire_shard(0, time.time_ns())
        self._owned = frozenset({0})
        raise RuntimeError("cannot reach etcd at ('127.0.0.1:1',): connection refused")


def _config(tmp_path: Path, **admin: Any) -> Config:
    # Delivery on: its scheduler and reaper tasks are among what a failed start must stop.
    return make_config(tmp_path / "spool", delivery={"enabled": True},
                       admin={"listen": f"127.0.0.1:{free_port()}", **admin},
                       smtp={"listen": f"127.0.0.1:{free_port()}"})


def _fds() -> dict[str, str]:
    """Open fds and what they point at, but /dev/null: uvloop opens it once, lazily."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd of the listdir itself, gone by now
        if target != "/dev/null":
            out[fd] = target
    return out


def _refused(hostport: tuple[str, int]) -> bool:
    try:
        socket.create_connection(hostport, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def _assert_nothing_left(before_tasks: set[asyncio.Task[Any]],
                               before_fds: dict[str, str], cfg: Config) -> None:
    await asyncio.sleep(0)  # let tasks cancelled by the unwinding finish
    tasks = {t for t in asyncio.all_tasks() if not t.done()} - before_tasks
    assert not tasks, f"tasks left running: {[t.get_name() for t in tasks]}"
    writers = [t.name for t in threading.enumerate() if t.name == "spool-writer"]
    assert not writers, "the spool writer thread is still running"
    opened = {fd: target for fd, target in _fds().items() if before_fds.get(fd) != target}
    assert not opened, f"fds left open: {opened}"
    assert _refused(cfg.admin.listen)
    assert _refused(cfg.smtp.listen)


async def _start_fails(node: Node, cfg: Config, message: str) -> None:
    before_tasks = {t for t in asyncio.all_tasks() if not t.done()}
    before_fds = _fds()
    with pytest.raises(StartupError, match=message):
        await node.start()
    await _assert_nothing_left(before_tasks, before_fds, cfg)
    await node.stop()  # what the daemon's finally does: harmless after a failed start
    await _assert_nothing_left(before_tasks, before_fds, cfg)


async def _second_start_works(cfg: Config) -> None:
    node = Node(cfg)  # the spool lock of the failed start was released
    await node.start()
    try:
        assert node.ready()
        assert len(node.spool.owned) == cfg.spool.shards
    finally:
        await node.stop()


async def test_a_coordinator_that_fails_half_way_leaves_nothing_open(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    node = Node(cfg, _CoordinatorThatFailsHalfWay(cfg.node.id, cfg.spool.shards))
    await _start_fails(node, cfg, r"\[cluster\] etcd: cannot reach etcd")
    assert not node.spool.owned  # the shard it had taken was handed back
    await _second_start_works(cfg)


async def test_an_admin_port_in_use_leaves_nothing_open(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        cfg = _config(tmp_path, listen=f"127.0.0.1:{holder.getsockname()[1]}")
        node = Node(cfg)
        before_fds = _fds()
        with pytest.raises(StartupError, match=r"\[admin\] listen"):
            await node.start()
        # The holder still listens on the admin port, so only the other checks apply here.
        opened = {fd: t for fd, t in _fds().items() if before_fds.get(fd) != t}
        assert not opened, f"fds left open: {opened}"
        assert not [t for t in threading.enumerate() if t.name == "spool-writer"]
        assert not [t for t in asyncio.all_tasks()
                    if t.get_name() in ("scheduler", "delivery:reaper") and not t.done()]
    finally:
        holder.close()
    await _second_start_works(_config(tmp_path))


async def test_a_failing_loop_is_logged_counted_and_goes_on(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "spool", spool={"compact_interval": "50ms"},
                      delivery={"enabled": True})
    node = Node(cfg)
    await node.start()
    try:
        assert node.engine is not None
        engine = node.engine
        samples = node.metrics.registry.get_sample_value
        for loop in ("sweep", "compaction", "slo", "probe"):
            assert samples("mta_background_errors_total", {"loop": loop}) == 0.0
        compactions = sweeps = 0
        maintain, sweep = node.spool.maintain, engine.sweep

        async def counting_maintain(ratio: float) -> Any:
            nonlocal compactions
            compactions += 1
            return await maintain(ratio)

        def broken_sweep() -> None:
            raise ValueError("a sweep met something it cannot handle")

        def counting_sweep() -> None:
            nonlocal sweeps
            sweeps += 1
            sweep()

        node.spool.maintain = counting_maintain  # type: ignore[method-assign]
        engine.sweep = broken_sweep  # type: ignore[method-assign]
        await _until(lambda: (samples("mta_background_errors_total", {"loop": "sweep"}) or 0)
                     >= 3)
        # Compaction went on while the sweeps failed, and the sweep loop still runs.
        assert compactions >= 3
        sweeper = next(t for t in node._tasks if t.get_name() == "sweep")
        assert not sweeper.done()
        engine.sweep = counting_sweep  # type: ignore[method-assign]  # fixed: sweeps again
        await _until(lambda: sweeps >= 2)
        assert samples("mta_background_errors_total", {"loop": "compaction"}) == 0.0
    finally:
        await node.stop()
    assert all(t.done() for t in node._tasks) or not node._tasks


async def test_supervise_restarts_a_loop_that_raises_or_ends() -> None:
    registry = CollectorRegistry()
    errors = Counter("errors", "test", ["loop"], registry=registry)
    runs = 0
    again = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise OSError("first pass fails")
        if runs == 2:
            return  # ends: also a failure
        again.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(supervise("flaky", flaky, node_id="n1", errors=errors,
                                         pause=0.01))
    await asyncio.wait_for(again.wait(), 5)
    assert registry.get_sample_value("errors_total", {"loop": "flaky"}) == 2.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

