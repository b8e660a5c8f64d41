"""A new owner makes the log it takes over durable before it acknowledges anything on top.

The log may have been written by the previous owner's process (or by this node's copy of it,
promoted) and be in the page cache only: a STATE or DONE made durable on top of a MSG that is
not could outlive it in a power loss. A power loss cannot be simulated here, so the test
watches the real ``os.fdatasync``/``os.fsync`` calls that :meth:`Shard.open` makes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from mta.spool.ownership import OwnerToken
from mta.spool.segment import list_segments, segment_path
from mta.spool.shard import Shard, shard_dir
from mta.spool.writer import GroupCommitWriter


async def write_log(root: Path, token: int, messages: int) -> None:
    """A previous owner's log: several small segments, with states and completions."""
    writer = GroupCommitWriter(asyncio.get_running_loop())
    shard = Shard(0, root, writer, OwnerToken("old-owner", token), segment_size=1024)
    await shard.open()
    try:
        for n in range(messages):
            await shard.add(f"M{n:03d}", {"from": "a@x.org", "to": ["r@y.org"]}, b"x" * 300)
            if n % 3 == 0:
                await shard.set_state(f"M{n:03d}", {"tries": 1})
            if n % 4 == 1:
                await shard.done(f"M{n:03d}")
    finally:
        await shard.close()
        await writer.close()


def record_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fdatasync/fsync from now on, as ``(call, path of the file or directory)``; the
    real calls still run."""
    calls: list[tuple[str, str]] = []

    def recording(name: str, real: Callable[[int], None]) -> Callable[[int], None]:
        def call(fd: int) -> None:
            calls.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)
        return call

    monkeypatch.setattr(os, "fdatasync", recording("fdatasync", os.fdatasync))
    monkeypatch.setattr(os, "fsync", recording("fsync", os.fsync))
    return calls


@pytest.mark.parametrize("torn", [False, True])
async def test_open_syncs_every_segment_it_keeps_then_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool) -> None:
    await write_log(tmp_path, token=3, messages=12)
    directory = shard_dir(tmp_path, 0)
    kept = list_segments(directory)
    assert len(kept) >= 3
    if torn:  # the previous owner died mid-write: recovery cuts the newest segment's tail
        with open(segment_path(directory, kept[-1]), "ab") as fh:
            fh.write(b"\x00torn")

    calls = record_syncs(monkeypatch)
    writer = GroupCommitWriter(asyncio.get_running_loop())
    shard = Shard(0, tmp_path, writer, OwnerToken("new-owner", 4), segment_size=1024)
    try:
        report = await shard.open()
        during_open = list(calls)
        assert list_segments(directory) == kept  # open kept every segment (and made none)
        assert report.live > 0
    finally:
        await shard.close()
        await writer.close()

    synced = [i for i, (_call, path) in enumerate(during_open)
              if path in {str(segment_path(directory, seq)) for seq in kept}]
    for seq in kept:
        assert any(path == str(segment_path(directory, seq))
                   for _call, path in during_open), f"segment {seq} never synced at open"
    # The directory, after the segments: their entries are durable too.
    assert any(call == "fsync" and path == str(directory)
               for call, path in during_open[max(synced) + 1:]), during_open
