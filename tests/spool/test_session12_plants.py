"""The shard's pending marks (mta/spool/shard.py ``_append``): a message with two writes in
flight stays marked pending until the last of them is durable."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mta.accounting import AccountingLog
from mta.spool import SpoolWriteError
from mta.spool.ownership import OwnerToken
from mta.spool.shard import Shard
from mta.spool.writer import GroupCommitWriter
from tests.spool.conftest import ENVELOPE
from tests.support import wait_until


class SyncGates:
    """``os.fdatasync`` that holds its n-th call until ``release(n)``."""

    def __init__(self) -> None:
        self.calls = 0
        self.gates = [threading.Event() for _ in range(8)]

    def release(self, n: int) -> None:
        self.gates[n].set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = os.fdatasync

        def held(fd: int) -> None:
            n, self.calls = self.calls, self.calls + 1
            self.gates[n].wait(30)
            real(fd)

        monkeypatch.setattr(os, "fdatasync", held)


@pytest.fixture
def gates(shard: Shard, monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncGates]:
    sync = SyncGates()  # after the shard fixture: its first write is not held
    sync.install(monkeypatch)
    yield sync
    for n in range(len(sync.gates)):
        sync.release(n)  # never leave the writer thread waiting


async def test_a_message_stays_pending_until_its_last_write_is_durable(
        shard: Shard, gates: SyncGates) -> None:
    first = asyncio.create_task(shard.set_state("M0", {"tries": 1}))
    await wait_until(lambda: gates.calls == 1, what="the first write inside fdatasync")
    second = asyncio.create_task(shard.set_state("M0", {"tries": 2}))
    await wait_until(lambda: shard._inflight == 2, what="the second write queued")
    gates.release(0)
    await first
    await wait_until(lambda: gates.calls == 2, what="the second write inside fdatasync")
    # The second write is not durable yet: compaction must still leave M0 where it is.
    assert shard._pending == {"M0": 1}
    gates.release(1)
    await second
    assert shard._pending == {}
    assert shard.index.messages["M0"].state == {"tries": 2}


async def test_a_cancelled_caller_in_a_batch_leaves_the_others_settled(
        shard: Shard, gates: SyncGates) -> None:
    """The writer settles every caller of a batch, whatever one of them did meanwhile
    (its future cancelled)."""
    first = asyncio.create_task(shard.set_state("M0", {"tries": 1}))
    await wait_until(lambda: gates.calls == 1, what="the first write inside fdatasync")
    gone = asyncio.create_task(shard.set_state("M0", {"tries": 2}))
    last = asyncio.create_task(shard.set_state("M0", {"tries": 3}))
    await wait_until(lambda: shard._inflight == 3, what="both writes queued, one batch")
    assert gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    gates.release(0)
    gates.release(1)
    await first
    await asyncio.wait_for(last, 10)
    await wait_until(shard._idle.is_set, what="the batch ended")
    assert shard._pending == {}
    assert shard.index.messages["M0"].state == {"tries": 3}


async def test_a_write_after_the_writer_stopped_fails_its_caller(tmp_path: Path) -> None:
    writer = GroupCommitWriter(asyncio.get_running_loop())
    shard = Shard(0, tmp_path, writer, OwnerToken("n1", 1), segment_size=1 << 20)
    await shard.open()
    await shard.add("M0", ENVELOPE, b"body")
    await writer.close()
    with pytest.raises(SpoolWriteError) as caught:
        await asyncio.wait_for(shard.set_state("M0", {"tries": 1}), 10)
    assert caught.value.errno == errno.ESHUTDOWN
    await wait_until(shard._idle.is_set, what="the refused write ended")
    assert shard._pending == {}
    await shard.close()


def test_an_accounting_line_is_compact_utf8_json(tmp_path: Path) -> None:
    """The line as ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` wrote it:
    UTF-8 text as it is, no blanks between items."""
    line = AccountingLog(tmp_path / "acct", "n\u00f6de").line(
        "delivered", "M\u00e9", rcpt="j\u00fcrgen@b\u00fccher.example", tries=[1, 2])
    rec = json.loads(line)
    assert line == (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    assert "jürgen@bücher.example".encode() in line
