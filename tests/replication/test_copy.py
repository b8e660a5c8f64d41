"""A follower's copy of a shard on real files: replay, positions, fencing, cuts, group commit.

The owner's log is written by the real spool code (a ``Shard`` with small segments); the
frames are its batches read back with :func:`read_log` between the batch ends a scan finds.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import mta
from mta.replication.copy import FOLLOW_FILE, NOTHING, ShardCopy, read_follow, read_log
from mta.replication.copywriter import CopyWriter
from mta.replication.errors import (
    CopyBroken,
    CopyError,
    FollowUnreadable,
    PositionCompacted,
    PositionMismatch,
    StaleToken,
)
from mta.spool.ownership import OWNER_FILE, OwnerToken
from mta.spool.record import Kind, ScannedRecord, encode_msg, scan
from mta.spool.recovery import recover_shard
from mta.spool.segment import list_segments, segment_path
from mta.spool.shard import Shard, shard_dir
from mta.spool.writer import GroupCommitWriter

Frame = tuple[int, int, bytes]  # (seq, offset, data): one owner batch, as shipped
TOKEN = 5


# --- building an owner log ---------------------------------------------------------------


async def write_owner_log(root: Path, rounds: int = 12, segment_size: int = 2048,
                          seed: int = 1) -> Path:
    """Write a shard's log with the owner's code: concurrent adds (several records per
    batch), state changes and completions, rotating segments."""
    rng = random.Random(seed)
    writer = GroupCommitWriter(asyncio.get_running_loop())
    shard = Shard(0, root, writer, OwnerToken("owner", TOKEN), segment_size)
    await shard.open()
    n = 0
    try:
        for _ in range(rounds):
            ids = [f"M{n + i:04d}" for i in range(rng.randint(1, 4))]
            n += len(ids)
            await asyncio.gather(*(
                shard.add(mid, {"from": "a@x.org", "to": [f"r{mid}@y.org"]},
                          rng.randbytes(rng.randint(20, 400)))
                for mid in ids))
            await shard.set_state(ids[0], {"tries": 1, "next": n})
            if len(ids) > 1:
                await shard.done(ids[-1])
    finally:
        await shard.close()
        await writer.close()
    return shard_dir(root, 0)


def batch_ends(directory: Path) -> list[tuple[int, int]]:
    """Every position where an owner batch ended (a COMMIT, or a header-only segment)."""
    ends = []
    for seq in list_segments(directory):
        data = segment_path(directory, seq).read_bytes()
        seg_ends = [item.offset + item.size for item in scan(data)
                    if isinstance(item, ScannedRecord) and item.meta[0] == Kind.COMMIT]
        ends.extend((seq, e) for e in seg_ends or [len(data)])
    return ends


def owner_frames(directory: Path) -> list[Frame]:
    """The owner's batches, each as the bytes between two batch ends (read_log)."""
    frames: list[Frame] = []
    prev = NOTHING
    for end in batch_ends(directory):
        chunks = list(read_log(directory, prev, end, max_bytes=1 << 30))
        assert len(chunks) == 1, "a batch lies in one segment"
        frames.append(chunks[0])
        prev = end
    return frames


def frame_end(frame: Frame) -> tuple[int, int]:
    return frame[0], frame[1] + len(frame[2])


def seg_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("seg-*.log"))}


def live(directory: Path) -> dict[str, Any]:
    index, _report = recover_shard(directory, 0)
    return {mid: (ref.seq, ref.offset, ref.size, ref.state)
            for mid, ref in index.messages.items()}


def is_prefix(copy_dir: Path, owner_dir: Path) -> bool:
    """Every segment of the copy equals the owner's, but the newest, a prefix of it."""
    mine, theirs = seg_files(copy_dir), seg_files(owner_dir)
    names = sorted(mine)
    if not names:
        return True
    for name in names[:-1]:
        if mine[name] != theirs.get(name):
            return False
    return theirs.get(names[-1], b"").startswith(mine[names[-1]])


@pytest.fixture
async def owner(tmp_path: Path) -> tuple[Path, list[Frame]]:
    directory = await write_owner_log(tmp_path / "owner")
    frames = owner_frames(directory)
    assert len(list_segments(directory)) >= 4, "the test needs rotation"
    return directory, frames


def replay(copy: ShardCopy, frames: list[Frame], token: int = TOKEN) -> None:
    for seq, offset, data in frames:
        copy.append(token, seq, offset, data)
    copy.sync()


# --- replay ------------------------------------------------------------------------------


async def test_replay_through_the_writer_is_byte_identical_and_recovers_the_same(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    writer = CopyWriter(asyncio.get_running_loop())
    copy = await writer.open(tmp_path / "follower", 0)
    assert copy.position == NOTHING and copy.token == 0
    acks = await asyncio.gather(*(writer.append(copy, TOKEN, *f) for f in frames))
    await writer.release(copy)
    await writer.close()
    assert acks == sorted(acks), "acks are cumulative"
    assert acks[-1] == frame_end(frames[-1]) == copy.position == copy.durable
    copy_dir = shard_dir(tmp_path / "follower", 0)
    assert seg_files(copy_dir) == seg_files(owner_dir)
    assert not (copy_dir / OWNER_FILE).exists()
    assert read_follow(copy_dir) == TOKEN
    assert copy.segments() == [(seq, segment_path(owner_dir, seq).stat().st_size)
                               for seq in list_segments(owner_dir)]
    assert set(copy.header_tokens().values()) == {TOKEN}
    reopened = ShardCopy.open(tmp_path / "follower", 0)
    assert reopened.position == copy.position and reopened.token == TOKEN
    reopened.close()
    assert live(copy_dir) == live(owner_dir) != {}


async def test_promoted_copy_opens_with_the_owner_code(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "follower", 0)
    replay(copy, frames)
    copy.close()
    writer = GroupCommitWriter(asyncio.get_running_loop())
    shard = Shard(0, tmp_path / "follower", writer, OwnerToken("follower", TOKEN + 1), 2048)
    try:
        report = await shard.open()
        assert report.truncated == [] and report.corrupt == []
        expected = live(owner_dir)
        assert set(shard.index.messages) == set(expected)
        some = sorted(expected)[0]
        assert (await shard.load(some)).envelope.recipients == [f"r{some}@y.org"]
    finally:
        await shard.close()
        await writer.close()


# --- positions ---------------------------------------------------------------------------


def test_gaps_duplicates_and_out_of_order_frames_change_nothing(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    # Stop just before a frame that continues a segment and one that opens the next.
    cont = next(i for i in range(2, len(frames)) if frames[i][1] > 0
                and frames[i + 1][1] > 0)
    replay(copy, frames[:cont])
    copy_dir = copy.dir
    before, pos = seg_files(copy_dir), copy.position
    bad: list[Frame] = [
        frames[cont - 1],  # duplicate
        frames[cont + 1],  # gap
        (frames[cont][0], frames[cont][1] + 1, frames[cont][2]),  # off by one
        (frames[cont][0], frames[cont][1] - 1, frames[cont][2]),
        (pos[0] - 1, 0, frames[0][2]),  # reopening an older segment
        (pos[0], 0, frames[0][2]),  # reopening the active one
        (pos[0] + 1, 5, frames[cont][2]),  # a new segment not from its start
        (0, 0, frames[0][2]),
    ]
    for seq, offset, data in bad:
        with pytest.raises(PositionMismatch) as err:
            copy.append(TOKEN, seq, offset, data)
        assert err.value.expected == pos
    assert seg_files(copy_dir) == before and copy.position == pos
    replay(copy, frames[cont:])
    assert seg_files(copy_dir) == seg_files(owner_dir)


def test_a_frame_lost_before_a_rollover_is_caught_by_prev(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    _owner_dir, frames = owner
    roll = next(i for i in range(2, len(frames)) if frames[i][1] == 0
                and frames[i - 1][1] > 0)
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames[:roll - 1])  # the segment's last batch never arrived
    pos = copy.position
    with pytest.raises(PositionMismatch) as err:
        copy.append(TOKEN, *frames[roll], prev=frame_end(frames[roll - 1]))
    assert err.value.expected == pos == copy.position
    copy.append(TOKEN, *frames[roll - 1], prev=pos)
    copy.append(TOKEN, *frames[roll], prev=frame_end(frames[roll - 1]))
    assert copy.position == frame_end(frames[roll])


def test_empty_rollover_frame_is_refused(tmp_path: Path) -> None:
    copy = ShardCopy.open(tmp_path / "f", 0)
    with pytest.raises(PositionMismatch):
        copy.append(TOKEN, 1, 0, b"")
    assert copy.position == NOTHING and copy.segments() == []


# --- fencing -----------------------------------------------------------------------------


def test_stale_token_refused_and_newest_token_survives_reopen(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    _owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    copy.accept_token(7)
    copy.accept_token(7)  # equal: nothing to do
    assert read_follow(copy.dir) == 7
    with pytest.raises(StaleToken) as err:
        copy.append(6, *frames[0])
    assert err.value.newest == 7 and copy.position == NOTHING
    with pytest.raises(StaleToken):
        copy.accept_token(3)
    copy.close()
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.token == 7
    copy.append(9, *frames[0])  # a newer owner's first frame: followed before written
    assert copy.token == 9 and read_follow(copy.dir) == 9
    assert json.loads((copy.dir / FOLLOW_FILE).read_bytes()) == {"token": 9}
    assert not list(copy.dir.glob("*.tmp"))
    with pytest.raises(StaleToken):
        copy.append(7, *frames[1])
    copy.close()


@pytest.mark.parametrize("content", [b'{"tok', b"garbage", b'{"node": "a", "token": 4}',
                                     b'{"token": "7"}', b'{"token": -1}', b'{"token": true}',
                                     b"", b"\x00" * 16])
def test_a_torn_or_foreign_follow_file_fails_closed(
        tmp_path: Path, owner: tuple[Path, list[Frame]], content: bytes) -> None:
    """The copy followed token 9; a crash tore ``shard.follow``. Guessing a lower floor would
    let a stale owner (token 5 here) cut the copy or collect its acks: the copy refuses to
    open instead, says which file, and leaves every byte as it was."""
    _owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path, 0)
    copy.accept_token(9)
    replay(copy, frames[:4], token=9)
    copy.close()
    directory = copy.dir
    follow = directory / FOLLOW_FILE
    follow.write_bytes(content)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with capture_logs() as logs, pytest.raises(FollowUnreadable) as err:
        ShardCopy.open(tmp_path, 0)
    assert isinstance(err.value, CopyBroken) and err.value.path == str(follow)
    [line] = [e for e in logs if e["event"] == "replication.copy_follow_unreadable"]
    assert line["log_level"] == "warning" and line["file"] == str(follow)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    with pytest.raises(ValueError):
        read_follow(directory)


def test_a_missing_follow_file_is_a_copy_that_followed_nobody(tmp_path: Path) -> None:
    copy = ShardCopy.open(tmp_path, 0)
    assert copy.token == 0 and read_follow(copy.dir) == 0
    copy.accept_token(1)
    assert read_follow(copy.dir) == 1


# --- crash: torn tail --------------------------------------------------------------------


def _stop_in_segment(frames: list[Frame]) -> int:
    """Index of a frame that continues a segment holding at least one earlier batch."""
    return next(i for i in range(2, len(frames)) if frames[i][1] > 0 and frames[i - 1][1] > 0)


@pytest.mark.parametrize("tear", ["half", "no-commit", "header-of-next", "empty-next"])
def test_a_torn_tail_is_cut_to_the_last_commit(
        tmp_path: Path, owner: tuple[Path, list[Frame]], tear: str) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    if tear in ("half", "no-commit"):
        stop = _stop_in_segment(frames)
    else:
        stop = next(i for i in range(2, len(frames)) if frames[i][1] == 0)
    replay(copy, frames[:stop])
    good = copy.position
    seq, offset, data = frames[stop]
    if tear == "half":
        torn = data[:len(data) // 2]
    elif tear == "no-commit":
        # Every record of the batch but its COMMIT: complete records, never acknowledged.
        last = [i for i in scan(data) if isinstance(i, ScannedRecord)][-1]
        assert last.meta[0] == Kind.COMMIT
        torn = data[:last.offset]
    elif tear == "header-of-next":
        torn = data[:10]  # the new segment's header, torn
    else:
        torn = b""
    copy.close()
    with open(segment_path(copy.dir, seq), "r+b" if offset else "wb") as fh:
        fh.seek(offset)
        fh.write(torn)
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.position == copy.durable == good
    assert is_prefix(copy.dir, owner_dir)
    assert max(list_segments(copy.dir)) == good[0]
    replay(copy, frames[stop:])
    assert seg_files(copy.dir) == seg_files(owner_dir)


def test_a_new_segment_with_only_its_header_is_a_batch_end(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    roll = next(i for i in range(2, len(frames)) if frames[i][1] == 0)
    seq, _offset, data = frames[roll]
    header = next(i for i in scan(data) if isinstance(i, ScannedRecord))
    assert header.meta[0] == Kind.SEGMENT
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames[:roll])
    copy.append(TOKEN, seq, 0, data[:header.size])  # the owner's header write on rotation
    copy.sync()
    copy.close()
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.position == (seq, header.size)
    copy.append(TOKEN, seq, header.size, data[header.size:])
    replay(copy, frames[roll + 1:])
    assert seg_files(copy.dir) == seg_files(owner_dir)


def test_a_sealed_segment_is_synced_before_the_next_one_exists(
        tmp_path: Path, owner: tuple[Path, list[Frame]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The invariant that lets opening cut only the newest segment."""
    _owner_dir, frames = owner
    roll = next(i for i in range(2, len(frames)) if frames[i][1] == 0)
    copy = ShardCopy.open(tmp_path / "f", 0)
    for f in frames[:roll]:
        copy.append(TOKEN, *f)  # not synced
    events: list[tuple[str, str]] = []
    real_sync, real_open = os.fdatasync, os.open

    def fdatasync(fd: int) -> None:
        events.append(("sync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_sync(fd)

    def opener(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            events.append(("create", os.path.basename(str(path))))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "open", opener)
    copy.append(TOKEN, *frames[roll])
    old = segment_path(copy.dir, frames[roll - 1][0]).name
    new = segment_path(copy.dir, frames[roll][0]).name
    assert events == [("sync", old), ("create", new)]


# --- truncation, drop, reset -------------------------------------------------------------


def _record_unlinks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    order: list[int] = []
    real = os.unlink

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        name = os.path.basename(str(path))
        if name.startswith("seg-"):
            order.append(int(name[4:12]))
        real(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    return order


def test_truncate_deletes_newest_first_and_cuts_to_a_batch_end(
        tmp_path: Path, owner: tuple[Path, list[Frame]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames)
    seqs = list_segments(copy.dir)
    # A batch end inside the second segment, not its last.
    k = next(i for i, f in enumerate(frames) if f[0] == seqs[1] and frames[i + 1][0] == seqs[1])
    target = frame_end(frames[k])
    end = copy.position
    for bad in [(target[0], target[1] - 1), (target[0], 10**9), (seqs[-1] + 5, 3)]:
        with pytest.raises(PositionMismatch) as err:
            copy.truncate(*bad)
        assert err.value.expected == end
    assert copy.position == end
    order = _record_unlinks(monkeypatch)
    assert copy.truncate(*target) == target == copy.position == copy.durable
    assert order == sorted(seqs[2:], reverse=True)
    assert list_segments(copy.dir) == seqs[:2]
    assert is_prefix(copy.dir, owner_dir)
    # The owner resends from there and the copy is whole again.
    replay(copy, frames[k + 1:])
    assert seg_files(copy.dir) == seg_files(owner_dir)
    copy.close()


def test_truncate_to_a_segment_start_drops_it_and_every_later_one(
        tmp_path: Path, owner: tuple[Path, list[Frame]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames)
    seqs = list_segments(copy.dir)
    order = _record_unlinks(monkeypatch)
    pos = copy.truncate(seqs[2], 0)
    assert order == sorted(seqs[2:], reverse=True)
    assert pos == (seqs[1], segment_path(owner_dir, seqs[1]).stat().st_size) == copy.durable
    # The owner continues with the next segment.
    first = next(i for i, f in enumerate(frames) if f[0] == seqs[2])
    replay(copy, frames[first:])
    assert seg_files(copy.dir) == seg_files(owner_dir)
    assert copy.truncate(0, 0) == NOTHING and list_segments(copy.dir) == []


def test_a_crash_between_truncating_deletions_leaves_a_prefix(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames)
    copy.close()
    seqs = list_segments(copy.dir)
    # What a newest-first truncation to seqs[1] had done when the process died.
    for seq in seqs[-2:]:
        segment_path(copy.dir, seq).unlink()
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.position == (seqs[-3], segment_path(owner_dir, seqs[-3]).stat().st_size)
    assert is_prefix(copy.dir, owner_dir)
    assert copy.truncate(seqs[1], 0)[0] == seqs[0]
    assert is_prefix(copy.dir, owner_dir)


def test_drop_deletes_oldest_first_and_never_the_active_segment(
        tmp_path: Path, owner: tuple[Path, list[Frame]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames)
    seqs = list_segments(copy.dir)
    pos = copy.position
    order = _record_unlinks(monkeypatch)
    for bad in ([seqs[-1]], [seqs[0], seqs[-1]], [seqs[-1] + 1]):
        with pytest.raises(CopyError):
            copy.drop(bad)
    assert order == [] and list_segments(copy.dir) == seqs
    copy.drop([seqs[2], seqs[0], seqs[1], seqs[1]])
    assert order == seqs[:3]
    assert list_segments(copy.dir) == seqs[3:] and copy.position == pos
    copy.drop([seqs[0]])  # already gone: nothing to do
    assert [s for s, _ in copy.segments()] == seqs[3:]
    copy.close()
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.position == pos


def test_reset_discards_the_copy_and_keeps_the_token(
        tmp_path: Path, owner: tuple[Path, list[Frame]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames, token=8)
    seqs = list_segments(copy.dir)
    order = _record_unlinks(monkeypatch)
    copy.reset()
    assert order == sorted(seqs, reverse=True)
    assert copy.position == copy.durable == NOTHING and copy.segments() == []
    copy.close()
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.position == NOTHING and copy.token == 8
    # A full copy of the owner's live segments may start at any seq.
    start = next(i for i, f in enumerate(frames) if f[0] == seqs[2] and f[1] == 0)
    replay(copy, frames[start:], token=8)
    assert seg_files(copy.dir) == {name: data for name, data in seg_files(owner_dir).items()
                                   if int(name[4:12]) >= seqs[2]}
    assert copy.segments()[0][0] == seqs[2]


@pytest.mark.parametrize("where", ["write", "create"])
def test_a_failed_write_breaks_the_copy_until_it_is_reopened(
        tmp_path: Path, owner: tuple[Path, list[Frame]], where: str) -> None:
    owner_dir, frames = owner
    roll = next(i for i in range(3, len(frames)) if frames[i][1] == 0)
    i = roll if where == "create" else roll - 1
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames[:i])
    copy.close()
    copy = ShardCopy.open(tmp_path / "f", 0)  # the segment is opened on the first write
    good = copy.position
    seg = segment_path(copy.dir, good[0])
    aside = tmp_path / "aside"
    blocker = segment_path(copy.dir, frames[i][0])
    if where == "write":
        seg.rename(aside)
        seg.symlink_to("/dev/full")  # every write fails: a full or failing disk
    else:
        blocker.mkdir()  # the new segment cannot be created
    with pytest.raises(CopyBroken):
        copy.append(TOKEN, *frames[i])
    assert copy.broken and copy.position == good
    for call in (copy.sync, lambda: copy.truncate(0, 0), lambda: copy.drop([]),
                 copy.reset, lambda: copy.accept_token(TOKEN + 1),
                 lambda: copy.append(TOKEN, *frames[i])):
        with pytest.raises(CopyBroken):
            call()
    copy.close()
    if where == "write":
        seg.unlink()
        aside.rename(seg)
    else:
        blocker.rmdir()
    copy = ShardCopy.open(tmp_path / "f", 0)
    assert copy.position == good and not copy.broken
    replay(copy, frames[i:])
    assert seg_files(copy.dir) == seg_files(owner_dir)


# --- read_log ----------------------------------------------------------------------------


def test_read_log_chunks_never_span_segments(owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    files = {seq: segment_path(owner_dir, seq).read_bytes() for seq in list_segments(owner_dir)}
    end = frame_end(frames[-1])
    chunks = list(read_log(owner_dir, NOTHING, end, max_bytes=300))
    assert all(0 < len(d) <= 300 for _s, _o, d in chunks)
    rebuilt: dict[int, bytes] = {}
    for seq, offset, data in chunks:
        assert offset == len(rebuilt.get(seq, b"")), "contiguous within a segment"
        rebuilt[seq] = rebuilt.get(seq, b"") + data
    assert rebuilt == files
    # From the middle of one segment to the middle of a later one.
    seqs = sorted(files)
    start, stop = (seqs[1], 77), (seqs[3], 123)
    got = list(read_log(owner_dir, start, stop, max_bytes=1 << 20))
    assert [(s, o) for s, o, _ in got] == [(seqs[1], 77), (seqs[2], 0), (seqs[3], 0)]
    assert got[0][2] == files[seqs[1]][77:] and got[2][2] == files[seqs[3]][:123]
    assert list(read_log(owner_dir, end, end)) == []
    with pytest.raises(PositionMismatch):
        list(read_log(owner_dir, (seqs[0], len(files[seqs[0]]) + 1), end))


def test_read_log_from_a_compacted_position(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    copy = ShardCopy.open(tmp_path / "f", 0)
    replay(copy, frames)
    seqs = list_segments(copy.dir)
    copy.drop(seqs[:2])
    end = copy.position
    with pytest.raises(PositionCompacted) as err:
        list(read_log(copy.dir, (seqs[1], 40), end))
    assert err.value.position == (seqs[1], 40)
    # From nothing: the oldest live segment, from its start.
    assert next(iter(read_log(copy.dir, NOTHING, end)))[:2] == (seqs[2], 0)
    assert list(read_log(copy.dir, (seqs[2], 0), end))[-1][0] == seqs[-1]
    del owner_dir


# --- group commit ------------------------------------------------------------------------


async def test_group_commit_syncs_each_copy_once_and_survives_a_failed_op(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owner_dir = await write_owner_log(tmp_path / "owner", rounds=12, segment_size=1 << 20)
    frames = owner_frames(owner_dir)
    assert {f[0] for f in frames} == {1} and len(frames) > 10
    gate, inside = threading.Event(), threading.Event()
    calls: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        if not gate.is_set():
            inside.set()
            assert gate.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    batches: list[tuple[int, int, int]] = []
    loop = asyncio.get_running_loop()
    writer = CopyWriter(loop, observe=lambda ops, nbytes, copies, _s: batches.append(
        (ops, nbytes, copies)))
    a, b, c = [await writer.open(tmp_path / name, 0) for name in ("a", "b", "c")]
    calls.clear()
    # Hold the thread in a's first sync while everything else queues up behind it.
    first = writer.append(a, TOKEN, *frames[0])
    await asyncio.to_thread(inside.wait, 10)
    futs_a = [writer.append(a, TOKEN, *f) for f in frames[1:]]
    futs_b = [writer.append(b, TOKEN, *f) for f in frames]
    futs_c = [writer.append(c, TOKEN, *f) for f in frames[:3]]
    gap = writer.append(c, TOKEN, *frames[4])
    after_gap = [writer.append(c, TOKEN, *f) for f in frames[3:]]
    gate.set()
    assert await first == frame_end(frames[0])
    end = frame_end(frames[-1])
    assert await asyncio.gather(*futs_a) == [end] * len(futs_a)
    assert await asyncio.gather(*futs_b) == [end] * len(futs_b)
    assert await asyncio.gather(*futs_c) == [frame_end(frames[2])] * 3
    with pytest.raises(PositionMismatch):
        await gap
    for fut in after_gap:  # queued behind the failure in the same batch: never a gap
        with pytest.raises(PositionMismatch):
            await fut
    assert batches[-1][0] == len(frames) * 2 - 1 + 3 + 1 + len(after_gap)
    assert batches[-1][2] == 3
    names = [os.path.basename(os.path.dirname(p)) for p in calls]
    assert len(calls) == 4 and sorted(names[1:]) == ["shard-000"] * 3
    assert sorted(os.path.dirname(os.path.dirname(p)) for p in calls[1:]) == sorted(
        str(tmp_path / n) for n in "abc")
    # The thread goes on: c resumes from where it stopped.
    assert await asyncio.gather(*(writer.append(c, TOKEN, *f) for f in frames[3:])) \
        == [end] * (len(frames) - 3)
    for copy in (a, b, c):
        await writer.release(copy)
    await writer.close()
    for name in "abc":
        assert seg_files(shard_dir(tmp_path / name, 0)) == seg_files(owner_dir)


async def test_writes_of_a_copy_that_breaks_in_the_batch_are_not_acked(
        tmp_path: Path, owner: tuple[Path, list[Frame]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _owner_dir, frames = owner
    roll = next(i for i in range(3, len(frames)) if frames[i][1] == 0)
    gate, inside = threading.Event(), threading.Event()
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if not gate.is_set():
            inside.set()
            assert gate.wait(10)
        real(fd)

    writer = CopyWriter(asyncio.get_running_loop())
    hold = await writer.open(tmp_path / "hold", 0)
    copy = await writer.open(tmp_path / "f", 0)
    await asyncio.gather(*(writer.append(copy, TOKEN, *f) for f in frames[:roll - 1]))
    good = copy.durable
    segment_path(copy.dir, frames[roll][0]).mkdir()  # the next segment cannot be created
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    held = writer.append(hold, TOKEN, *frames[0])
    await asyncio.to_thread(inside.wait, 10)
    # One batch: a write that lands, then one that breaks the copy before its sync.
    written = writer.append(copy, TOKEN, *frames[roll - 1])
    breaking = writer.append(copy, TOKEN, *frames[roll])
    gate.set()
    await held
    for fut in (written, breaking):
        with pytest.raises(CopyBroken):
            await fut
    assert copy.broken and copy.durable == good
    await writer.close()


async def test_close_applies_what_is_queued_and_refuses_more(
        tmp_path: Path, owner: tuple[Path, list[Frame]]) -> None:
    owner_dir, frames = owner
    writer = CopyWriter(asyncio.get_running_loop())
    copy = await writer.open(tmp_path / "f", 0)
    futs = [writer.append(copy, TOKEN, *f) for f in frames]
    futs.append(writer.truncate(copy, *frame_end(frames[-2])))
    await writer.close()
    assert all(f.done() for f in futs)
    # An ack is the durable position after its batch: if the truncation shared the last
    # append's batch, the cut bytes are not acknowledged.
    assert frame_end(frames[-2]) <= futs[-2].result() <= frame_end(frames[-1])
    assert futs[-1].result() == frame_end(frames[-2]) == copy.position
    late = writer.append(copy, TOKEN, *frames[-1])
    with pytest.raises(CopyError):
        await late
    copy.close()
    assert is_prefix(copy.dir, owner_dir)


async def test_token_ops_through_the_writer(tmp_path: Path) -> None:
    writer = CopyWriter(asyncio.get_running_loop())
    copy = await writer.open(tmp_path / "f", 0)
    await writer.accept_token(copy, 11)
    with pytest.raises(StaleToken):
        await writer.accept_token(copy, 10)
    with pytest.raises(StaleToken):
        await writer.append(copy, 10, 1, 0, encode_msg("x", {}, b""))
    await writer.reset(copy)
    await writer.drop(copy, [1, 2])  # an empty copy has nothing to drop
    await writer.close()
    assert read_follow(copy.dir) == 11


# --- SIGKILL -----------------------------------------------------------------------------

_CHILD = """
import pickle, sys
from pathlib import Path
from mta.replication.copy import ShardCopy
frames = pickle.loads(Path(sys.argv[1]).read_bytes())
copy = ShardCopy.open(Path(sys.argv[2]), 0)
for i, (seq, offset, data) in enumerate(frames):
    copy.append(5, seq, offset, data)
    if i % 3 == 2:
        s, o = copy.sync()
        print("ack", s, o, flush=True)
print("done", flush=True)
"""


@pytest.mark.parametrize("kill_after", [3, 9, 20])
def test_sigkill_mid_stream_keeps_every_ack(tmp_path: Path, kill_after: int) -> None:
    owner_dir = asyncio.run(write_owner_log(tmp_path / "owner", rounds=60, segment_size=4096,
                                            seed=kill_after))
    frames = owner_frames(owner_dir)
    blob = tmp_path / "frames.pickle"
    blob.write_bytes(pickle.dumps(frames))
    root = Path(mta.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(blob), str(tmp_path / "f")],
                            stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None
    acks: list[tuple[int, int]] = []
    for line in proc.stdout:
        if line.startswith("done"):
            break
        if not line.startswith("ack "):
            continue  # the copy's own log lines
        _ack, s, o = line.split()
        acks.append((int(s), int(o)))
        if len(acks) == kill_after:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    copy = ShardCopy.open(tmp_path / "f", 0)
    ends = {frame_end(f) for f in frames}
    assert copy.position in ends, "a batch end"
    assert acks and copy.position >= acks[-1]
    assert is_prefix(copy.dir, owner_dir)
    # And it goes on from there.
    rest = [f for f in frames if frame_end(f) > copy.position]
    replay(copy, rest)
    assert seg_files(copy.dir) == seg_files(owner_dir)
