"""Planted bugs in DKIM signing in child processes (mta.dkim.pool, mta.dkim.child,
mta.dkim.signer's routing, mta.node's start) that test_pool.py, test_pool_attacks.py and
test_signing_node.py let through. Each test names the plant it catches; all pass on the
real code. Real processes and pipes, no mocks; constants shortened with monkeypatch as the
attack tests do; waits by harness.poll (a few wait for a span of time to pass: that span
is what they test, a pause that must not count as a stall)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from harness.config import make_config
from harness.poll import wait_until, wait_until_sync
from mta.dkim import pool as pool_module
from mta.dkim import signer as signer_module
from mta.dkim.errors import SigningStartError
from mta.dkim.keys import SigningKey
from mta.dkim.pool import PROTOCOL, SigningPool
from mta.dkim.signer import _LARGE, DomainKeys, Signer, Unsignable
from mta.node import Node, StartupError
from tests.support.dkim import pooled, write_key
from tests.support.procs import alive, signing_children
from tests.support.world import World

HEAD = b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\nSubject: %d\r\n"
BROKEN_INSTALL = "/nonexistent"  # PYTHONHOME: no interpreter starts (no `encodings`)


@contextlib.asynccontextmanager
async def one_process(keys: dict[str, SigningKey]
                      ) -> AsyncIterator[tuple[Signer, SigningPool, int]]:
    """A signer with one signing process, started: (signer, its pool, the process's pid);
    closed on the way out."""
    signer = pooled(keys, 1)
    try:
        await signer.start()
        pool = signer._pool
        assert pool is not None
        [pid] = pool.pids
        yield signer, pool, pid
    finally:
        await signer.aclose()


def message(n: int) -> bytes:
    return HEAD % n + b"\r\nbody\r\n"


def signed(result: bytes) -> bool:
    return result.startswith(b"DKIM-Signature:")


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# --- the start: READY only from a process that can serve ------------------------------------

async def test_a_process_of_another_protocol_fails_the_start(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plants: the child's protocol check dropped; the node's READY check dropped. The node's
    # code speaks another protocol than the child's (an upgrade under a running node).
    monkeypatch.setattr(pool_module, "PROTOCOL", PROTOCOL + 1)
    signer = pooled(keys, 1)
    try:
        with pytest.raises(SigningStartError, match=r"did not start \(exit code 2"):
            await signer.start()
        assert signer._pool is not None and not signer._pool.pids
    finally:
        await signer.aclose()


async def test_keys_the_process_cannot_use_fail_the_start(keys: dict[str, SigningKey]) -> None:
    # Plant: READY written before the signer is built from the spec.
    spec = pooled(keys, 1).spec()
    spec["domains"]["example.org"][1][0][3] = b"-----BEGIN PRIVATE KEY-----\nnot a key\n"
    pool = SigningPool(spec, 1)
    try:
        with pytest.raises(SigningStartError, match=r"exit code 2"):
            await pool.start()
        assert not pool.pids
    finally:
        await pool.aclose()


async def test_a_node_whose_signing_process_cannot_start_does_not_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant: node._start_signer catching OSError (what it caught before) instead of
    # SigningStartError: the node's start failed with a traceback, not a StartupError line.
    key = write_key(tmp_path, "rsa.pem")
    cfg = make_config(tmp_path / "spool", dkim={"processes": 1, "domains": {
        "example.org": {"selector": "r1", "key": str(key), "algorithm": "rsa-sha256"}}})
    node = Node(cfg)
    monkeypatch.setenv("PYTHONHOME", BROKEN_INSTALL)
    try:
        with pytest.raises(StartupError, match=r"\[dkim\] processes: the DKIM signing process"
                                               r" \(pid \d+\) did not start"):
            await node.start()
    finally:
        await node.stop()


# --- restarts: back-off, parking --------------------------------------------------------------

async def test_a_process_that_died_young_is_restarted_after_a_back_off(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plants: a quick exit restarted at once (no back-off); messages parked however far off
    # the restart is. Any process killed within 30 s of its start died young here: its
    # restart is 30 s away, more than _PARK_LIMIT, so a message gets its 4xx at once.
    monkeypatch.setattr(pool_module, "_QUICK_EXIT", 30.0)
    async with one_process(keys) as (signer, pool, pid):
        with capture_logs() as logs:
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: events(logs, "dkim.signing_process_exited"), 10,
                             "the process's end noticed")
        assert events(logs, "dkim.signing_process_exited")[0]["restart_in"] == 30.0
        assert not pool.pids
        with pytest.raises(Unsignable, match="no DKIM signing process is running") as info:
            await asyncio.wait_for(signer.sign_async(message(1)), 10)
        assert not info.value.permanent
        assert not pool.pids, "restarted before its back-off"


async def test_a_message_waits_for_a_restart_due_soon_and_is_signed(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plants: fail instead of park; parked messages never sent once the process is back.
    monkeypatch.setattr(pool_module, "_QUICK_EXIT", 0.0)  # no exit is young: restart at once
    async with one_process(keys) as (signer, pool, pid):
        os.kill(pid, signal.SIGKILL)
        # Sent in the turn the restart is scheduled: its process cannot be ready yet.
        await wait_until(lambda: pool._restart_due is not None, 10, "the restart", step=0)
        result = await asyncio.wait_for(signer.sign_async(message(1)), 20)
        assert signed(result)
        assert pool.pids and pool.pids != [pid]


async def test_a_stop_fails_the_messages_waiting_for_a_restart(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plants: aclose leaving parked messages waiting (for ever: no restart comes after a
    # stop); fail instead of park (the message must be parked, then refused as stopping).
    monkeypatch.setattr(pool_module, "_QUICK_EXIT", 30.0)  # restart 30 s away ...
    monkeypatch.setattr(pool_module, "_PARK_LIMIT", 60.0)  # ... and waited for
    signer = pooled(keys, 1)
    closed = False
    try:
        await signer.start()
        pool = signer._pool
        assert pool is not None
        [pid] = pool.pids
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: pool._restart_due is not None, 10, "the restart scheduled")
        parked = asyncio.ensure_future(signer.sign_async(message(1)))
        await wait_until(lambda: pool._parked, 10, "the message waiting for the restart")
        await asyncio.wait_for(signer.aclose(), 30)
        closed = True
        with pytest.raises(Unsignable, match="stopping"):
            await asyncio.wait_for(parked, 10)
    finally:
        if not closed:
            await signer.aclose()


async def test_a_process_that_cannot_start_again_is_retried_less_and_less_often(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plants: a failed restart retried without back-off; the back-off not capped; messages
    # parked for a restart that then failed left waiting. A broken install (PYTHONHOME
    # pointing nowhere) after the first start: every restart fails until it is fixed.
    monkeypatch.setattr(pool_module, "_QUICK_EXIT", 0.2)
    monkeypatch.setattr(pool_module, "_MAX_BACKOFF", 0.5)
    async with one_process(keys) as (signer, pool, pid):
        with capture_logs() as logs:
            monkeypatch.setenv("PYTHONHOME", BROKEN_INSTALL)
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: pool._restart_due is not None, 10, "the restart", step=0)
            # Parked for the restart due now; failed with it.
            with pytest.raises(Unsignable, match="did not start") as info:
                await asyncio.wait_for(signer.sign_async(message(1)), 20)
            assert not info.value.permanent

            def delays() -> list[float]:
                return [e["restart_in"] for e in logs if e["event"] in (
                    "dkim.signing_process_exited", "dkim.signing_process_start_failed")]

            await wait_until(lambda: len(delays()) >= 6, 30, "five failed restarts")
            monkeypatch.delenv("PYTHONHOME")
        # The killed process may have counted as young (its back-off then comes first).
        seen = delays()
        seen = seen[1:] if seen[0] == 0.0 else seen
        assert seen[:4] == [0.2, 0.4, 0.5, 0.5], delays()
        await wait_until(lambda: pool.pids, 10, "a process once the install is fixed")
        assert signed(await asyncio.wait_for(signer.sign_async(message(2)), 20))


# --- the watchdog ---------------------------------------------------------------------------

async def test_a_pause_shorter_than_the_stall_limit_kills_nothing(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant: the process killed on the watchdog's first quiet turn (interval 0.75 s here).
    monkeypatch.setattr(pool_module, "_STALL", 3.0)
    async with one_process(keys) as (signer, pool, pid):
        with stopped(pid):
            owed = asyncio.ensure_future(signer.sign_async(message(1)))
            await wait_until(lambda: pool._children and pool._children[0].waiting, 10,
                             "the message in flight")
            paused = time.monotonic()
            # Two thirds of _STALL without an answer (two watchdog turns): the time is the
            # thing tested.
            await wait_until(lambda: time.monotonic() - paused >= 2.0, 10, "a 2 s pause")
            assert pool.pids == [pid] and alive(pid), "killed before _STALL"
        assert signed(await asyncio.wait_for(owed, 20))
        assert pool.pids == [pid]


async def test_an_idle_process_is_not_taken_for_a_stalled_one(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant: the watchdog counting quiet turns while the process owes nothing.
    monkeypatch.setattr(pool_module, "_STALL", 0.5)
    async with one_process(keys) as (signer, pool, pid):
        idle = time.monotonic()
        await wait_until(lambda: time.monotonic() - idle >= 4 * 0.5, 10, "four _STALLs idle")
        assert pool.pids == [pid]
        assert signed(await asyncio.wait_for(signer.sign_async(message(1)), 20))
        assert pool.pids == [pid]


async def test_a_stalled_process_is_named_as_stalled(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant: the stalled flag not set (the 451 said "exited with code -9", the log and the
    # reply then disagree about why).
    monkeypatch.setattr(pool_module, "_STALL", 1.0)
    signer = pooled(keys, 1)
    try:
        await signer.start()
        assert signer._pool is not None
        [pid] = signer._pool.pids
        with stopped(pid), pytest.raises(Unsignable,
                                         match=r"gave no answer for 1s and was killed"):
            await asyncio.wait_for(signer.sign_async(message(1)), 20)
    finally:
        await signer.aclose()


async def test_a_node_frozen_with_its_process_does_not_kill_it_when_thawed(
        keys: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant: the watchdog reading the clock (time since the last answer) instead of counting
    # its turns. Node and process frozen together longer than _STALL (a cgroup freeze, a
    # SIGSTOP to the process group, a suspended VM): thawed, the watchdog's overdue turn
    # runs before the process, thawed too, has answered. One quiet turn is not a stall.
    monkeypatch.setattr(pool_module, "_STALL", 2.0)  # a turn every 0.5 s, killed after 4
    async with one_process(keys) as (signer, pool, pid):
        with capture_logs() as logs:
            with stopped(pid):
                owed = asyncio.ensure_future(signer.sign_async(message(1)))
                await wait_until(lambda: pool._children[0].waiting, 10, "the message sent",
                                 step=0)
                # A watchdog turn passes (0.5 s) with the message owed: the turn that sees
                # it sent is not a quiet one ...
                sent = time.monotonic()
                await wait_until(lambda: time.monotonic() - sent >= 0.75, 10, "a turn")
                # ... then the freeze: this loop does not run for 1.5 x _STALL (the span is the
                # scenario, not a synchronisation) ...
                frozen = time.monotonic()
                wait_until_sync(lambda: time.monotonic() - frozen >= 3.0, 10, "the freeze")
                # ... then runs again a moment (its overdue watchdog turn) before the
                # process does.
                thawed = time.monotonic()
                await wait_until(lambda: time.monotonic() - thawed >= 0.1, 10, "the thaw")
            assert signed(await asyncio.wait_for(owed, 20))
        assert not events(logs, "dkim.signing_process_stalled"), logs
        assert pool.pids == [pid]


# --- where messages go ----------------------------------------------------------------------

async def test_a_batch_is_spread_over_the_processes(keys: dict[str, SigningKey]) -> None:
    # Plants: every message sent to the first process; the load not counted within a batch
    # (a whole batch to the least busy process). One process stopped: the other signs half.
    signer = pooled(keys, 2)
    try:
        await signer.start()
        pool = signer._pool
        assert pool is not None
        first = pool._children[0].proc.pid
        with stopped(first):
            owed = [asyncio.ensure_future(signer.sign_async(message(n))) for n in range(2)]
            done, _ = await asyncio.wait(owed, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, "both messages went to the stopped process"
            assert signed(done.pop().result())
        assert all(signed(r) for r in await asyncio.wait_for(asyncio.gather(*owed), 20))
    finally:
        await signer.aclose()


async def test_a_large_message_is_not_held_up_by_a_stopped_process(
        keys: dict[str, SigningKey]) -> None:
    # Plant: messages over _LARGE sent to the processes (their body hash holds up the rest).
    signer = pooled(keys, 1)
    local = pooled(keys, 0)
    try:
        await signer.start()
        assert signer._pool is not None
        [pid] = signer._pool.pids
        big = HEAD % 1 + b"\r\n" + b"x" * (_LARGE + 1)
        with stopped(pid):
            result = await asyncio.wait_for(signer.sign_async(big), 20)
        assert _normalised(result) == _normalised(local.sign(big))
    finally:
        await signer.aclose()


def _normalised(result: bytes) -> bytes:
    result = re.sub(rb"([tx])=\d+;", rb"\1=0;", result)
    return re.sub(rb"b=[A-Za-z0-9+/=\r\n\t ]*\r\n(?=[^\t ]|$)", b"b=X\r\n", result)


async def test_the_processes_sign_with_every_setting_of_the_signer(
        keys: dict[str, SigningKey]) -> None:
    # Plants: the spec or from_spec dropping expire, headers, oversign, or a key's d=.
    domains = {"example.org": DomainKeys((keys["rsa"], keys["ed"]), "signer.example"),
               "*.example.net": DomainKeys((keys["ed"],))}
    settings: dict[str, Any] = {"headers": ("from", "to", "subject", "x-extra"),
                                "oversign": ("subject", "x-extra"), "expire": 3600.0}
    local = Signer(domains, **settings)
    remote = Signer(domains, processes=1, **settings)
    try:
        for sender in (b"alice@example.org", b"bob@mail.example.net", b"eve@other.test"):
            body = (b"From: " + sender + b"\r\nTo: x@y.test\r\nSubject: s\r\nX-Extra: e\r\n"
                    b"Date: d\r\n\r\nbody\r\n")
            got = await asyncio.wait_for(remote.sign_async(body), 20)
            assert _normalised(got) == _normalised(local.sign(body)), sender
    finally:
        await remote.aclose()


# --- the child's own defences ---------------------------------------------------------------

async def test_a_signal_for_the_service_does_not_end_the_process(
        keys: dict[str, SigningKey]) -> None:
    # Plant: the child not ignoring SIGINT/SIGTERM/SIGHUP (a Ctrl-C or a service stop sent
    # to the process group cut the signatures the node awaits).
    async with one_process(keys) as (signer, pool, pid):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(pid, sig)
        assert signed(await asyncio.wait_for(signer.sign_async(message(1)), 20))
        assert pool.pids == [pid] and alive(pid)


# --- the close ------------------------------------------------------------------------------

async def test_a_message_after_a_close_during_the_first_start_starts_nothing(
        keys: dict[str, SigningKey]) -> None:
    # Plant: start() spawning processes into a closed pool. A first message starts them, a
    # close (a reload's retire) queues behind that start, and a second message, come before
    # the start ended (so it starts the pool too), queues behind the close.
    before = set(signing_children())
    signer = pooled(keys, 2)
    first = asyncio.ensure_future(signer.sign_async(message(1)))
    try:
        await wait_until(lambda: signer._pool is not None and signer._pool._starting.locked(),
                         10, "the first start under way", step=0)
        pool = signer._pool
        closing = asyncio.ensure_future(signer.aclose())
        # The close waits for the start lock (asyncio.Lock's queue of waiters) ...
        await wait_until(lambda: pool._starting._waiters, 10, "the close queued", step=0)
        assert not first.done() and not pool.started
        # ... and a message come now, the pool not started yet, starts it: behind the close.
        second = asyncio.ensure_future(signer.sign_async(message(2)))
        await asyncio.wait_for(closing, 30)
        for result in await asyncio.gather(first, second, return_exceptions=True):
            assert isinstance(result, Unsignable) and "stopping" in str(result), result
        await wait_until(lambda: not set(signing_children()) - before, 10,
                         "no signing process left once the pool is closed")
    finally:
        for pid in set(signing_children()) - before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- the node -------------------------------------------------------------------------------

async def test_a_stop_waits_for_the_signer_a_reload_retired(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Plant: node._close_signer not waiting for the signers reloads retired: node.stop()
    # returned while their processes still ran (here a stopped one, killed after the grace).
    monkeypatch.setattr(pool_module, "_CLOSE_GRACE", 3.0)
    key = write_key(tmp_path, "rsa.pem")
    world.zone({"dest.test": {"MX": [(10, "mx.dest.test")]},
                "mx.dest.test": {"A": ["127.0.0.2"]}})
    world.sink("127.0.0.2")
    node = await world.start(sections={"dkim": {"processes": 1, "domains": {
        "example.org": {"selector": "r1", "key": str(key), "algorithm": "rsa-sha256"}}}})
    assert node._signer is not None and node._signer._pool is not None
    [old] = node._signer._pool.pids
    with stopped(old):
        assert node.reload()
        await node.stop()
        assert not alive(old), "the node stopped before its retired signer's process ended"


# --- the signer's quick From: reading -------------------------------------------------------

@pytest.mark.parametrize("value", ["alice@example.org", "Alice <alice@example.org>",
                                   "Alice Smith <a.b+c@Sub.Example.ORG.>", "<a@b.org>"])
def test_the_common_from_forms_take_the_quick_reading(value: str) -> None:
    # Plant: an alternative of _SIMPLE_FROM dropped (the same answers, by the slow parser:
    # the reason for the pattern gone without a test failing).
    assert signer_module._SIMPLE_FROM.fullmatch(value) is not None
