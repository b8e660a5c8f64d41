"""The spool on real files: durability API, recovery, segments, compaction, fencing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mta.envelope import Envelope, shard_of
from mta.spool import FencedError, MessageNotFound, Spool
from mta.spool.ownership import OWNER_FILE, OwnerCheck, OwnerToken, claim
from mta.spool.record import HEADER, Kind, ScanIssue, ScannedRecord, encode_msg, scan
from mta.spool.segment import list_segments, segment_path
from tests.support import wait_until


def env(n: int = 0) -> Envelope:
    return Envelope(sender=f"s{n}@example.com", recipients=[f"r{n}@example.org"])


def _writing(spool: Spool, shard: int) -> bool:
    """A write to ``shard`` is queued and not durable yet: a caller is inside it."""
    return not spool._shards[shard]._idle.is_set()


async def open_spool(path: Path, shards: int = 2, token: int = 1, **kw) -> Spool:
    spool = Spool(path, "n1", shards=shards, **kw)
    await spool.start()
    for n in range(shards):
        await spool.acquire_shard(n, token)
    return spool


def test_record_roundtrip_and_crc_detects_any_flipped_byte() -> None:
    data = encode_msg("ID", {"from": "a"}, b"body bytes")
    [rec] = list(scan(data))
    assert isinstance(rec, ScannedRecord)
    assert rec.meta[:2] == [Kind.MSG, "ID"]
    assert data[rec.body_offset:rec.body_offset + rec.body_len] == b"body bytes"
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        items = list(scan(bytes(bad)))
        assert not any(isinstance(x, ScannedRecord) for x in items), f"byte {i} not caught"


def test_scan_resyncs_after_a_corrupt_record() -> None:
    recs = [encode_msg(f"M{i}", {}, b"x" * (100 + i)) for i in range(5)]
    blob = bytearray(b"".join(recs))
    off = len(recs[0]) + len(recs[1]) + HEADER.size + 3
    blob[off:off + 8] = b"\xff" * 8  # inside record 2
    items = list(scan(bytes(blob)))
    ids = [x.meta[1] for x in items if isinstance(x, ScannedRecord)]
    assert ids == ["M0", "M1", "M3", "M4"]
    assert sum(isinstance(x, ScanIssue) for x in items) == 1


async def test_submit_load_state_done_survive_restart(spool_dir: Path) -> None:
    spool = await open_spool(spool_dir)
    ids = [await spool.submit(env(i), f"body {i}\r\n".encode()) for i in range(10)]
    assert len(set(ids)) == 10
    assert all(shard_of(i) in (0, 1) for i in ids)
    await spool.update_state(ids[3], {"attempts": 2, "done": [0]})
    for i in ids[5:]:
        await spool.mark_done(i)
    await spool.close()

    spool = await open_spool(spool_dir, token=2)
    try:
        assert sorted(r.id for n in (0, 1) for r in spool.live_messages(n)) == sorted(ids[:5])
        msg = await spool.load(ids[3])
        assert msg.body == b"body 3\r\n"
        assert msg.envelope.sender == "s3@example.com"
        assert msg.state == {"attempts": 2, "done": [0]}
        with pytest.raises(MessageNotFound):
            await spool.load(ids[7])
    finally:
        await spool.close()


async def test_group_commit_batches_concurrent_appends(spool_dir: Path) -> None:
    batches: list[tuple[int, int]] = []
    spool = await open_spool(spool_dir, observe_batch=lambda r, b, f, s: batches.append((r, f)))
    try:
        await asyncio.gather(*(spool.submit(env(i), b"x" * 3000) for i in range(500)))
        assert sum(r for r, _ in batches) >= 500
        # Concurrent submissions share fsyncs: far fewer batches than messages.
        assert len(batches) < 100
        # A batch goes to one shard at a time, so it costs one fdatasync.
        assert max(f for _, f in batches) == 1
    finally:
        await spool.close()


async def test_torn_tail_is_cut_and_every_intact_message_kept(spool_dir: Path) -> None:
    spool = await open_spool(spool_dir, shards=1)
    ids = [await spool.submit(env(i), os.urandom(500)) for i in range(20)]
    bodies = {i: (await spool.load(i)).body for i in ids}
    await spool.close()
    shard = spool_dir / "shard-000"
    seg = segment_path(shard, list_segments(shard)[-1])
    size = seg.stat().st_size
    with open(seg, "ab") as fh:  # half a record, as a crash mid-write leaves it
        fh.write(encode_msg("TORN", {"from": "x", "to": []}, b"y" * 300)[:200])

    spool = await open_spool(spool_dir, shards=1, token=2)
    try:
        assert seg.stat().st_size == size
        assert {r.id for r in spool.live_messages(0)} == set(ids)
        for i in ids:
            assert (await spool.load(i)).body == bodies[i]
    finally:
        await spool.close()


async def test_corrupt_record_in_middle_is_skipped_not_fatal(spool_dir: Path) -> None:
    spool = await open_spool(spool_dir, shards=1)
    ids = [await spool.submit(env(i), b"z" * 400) for i in range(10)]
    victim = spool.live_messages(0)[4]
    await spool.close()
    seg = segment_path(spool_dir / "shard-000", victim.seq)
    with open(seg, "r+b") as fh:
        fh.seek(victim.offset + victim.size // 2)
        fh.write(b"\x00CORRUPT\x00")

    reports = []
    spool = Spool(spool_dir, "n1", shards=1, on_recovered=reports.append)
    await spool.start()
    await spool.acquire_shard(0, 2)
    try:
        live = {r.id for r in spool.live_messages(0)}
        assert live == set(ids) - {victim.id}
        assert len(reports[0].corrupt) == 1 and not reports[0].truncated
        # The node keeps working on that shard after recovery.
        await spool.submit(env(99), b"after")
    finally:
        await spool.close()


async def test_segments_rotate_and_dead_ones_are_deleted(spool_dir: Path) -> None:
    spool = await open_spool(spool_dir, shards=1, segment_size=64 * 1024)
    try:
        ids = [await spool.submit(env(i), b"q" * 4000) for i in range(100)]
        shard = spool_dir / "shard-000"
        assert len(list_segments(shard)) > 4
        for i in ids:
            await spool.mark_done(i)
        await spool.submit(env(1000), b"keeps a record in the newest segment")
        await spool.maintain(0.25)
        assert len(list_segments(shard)) <= 2
        assert spool.live_count() == 1
    finally:
        await spool.close()


async def test_compaction_moves_long_lived_messages_and_frees_old_segments(
        spool_dir: Path) -> None:
    spool = await open_spool(spool_dir, shards=1, segment_size=64 * 1024)
    shard = spool_dir / "shard-000"
    ids = [await spool.submit(env(i), f"msg {i} ".encode() * 400) for i in range(60)]
    keep = ids[::20]  # a few stay queued (retrying), the rest are delivered
    await spool.update_state(keep[0], {"attempts": 3})
    for i in ids:
        if i not in keep:
            await spool.mark_done(i)
    before = len(list_segments(shard))
    for _ in range(5):
        await spool.maintain(0.25)
    after = len(list_segments(shard))
    assert after < before
    await spool.close()

    spool = await open_spool(spool_dir, shards=1, token=2)
    try:
        assert {r.id for r in spool.live_messages(0)} == set(keep)
        for i in keep:
            n = ids.index(i)
            assert (await spool.load(i)).body == f"msg {n} ".encode() * 400
        assert (await spool.load(keep[0])).state == {"attempts": 3}
    finally:
        await spool.close()


def test_owner_check_fast_path_and_every_way_to_lose_the_shard(tmp_path: Path) -> None:
    me = OwnerToken("n1", 7)
    claim(tmp_path, 3, me)
    check = OwnerCheck(tmp_path, 3, me)
    check()  # our own bytes: passes
    # The same owner written with other formatting (an older version): parsed, still ours.
    (tmp_path / OWNER_FILE).write_text('{"token": 7, "node": "n1"}')
    check()
    claim(tmp_path, 3, OwnerToken("n2", 8))
    with pytest.raises(FencedError, match="n2"):
        check()
    (tmp_path / OWNER_FILE).write_text('{"node": "n1", "token": 7')  # torn
    with pytest.raises(FencedError):
        check()
    (tmp_path / OWNER_FILE).unlink()
    with pytest.raises(FencedError):
        check()


async def test_a_newer_owner_fences_the_old_one(spool_dir: Path) -> None:
    spool = await open_spool(spool_dir, shards=1, token=5)
    try:
        await spool.submit(env(1), b"before")
        # Another node takes the shard with a newer fencing token.
        claim(spool_dir / "shard-000", 0, OwnerToken("other-node", 6))
        with pytest.raises(FencedError):
            await spool.submit(env(2), b"after")
        # And an older token can never take it back.
        with pytest.raises(FencedError):
            claim(spool_dir / "shard-000", 0, OwnerToken("n1", 5))
    finally:
        await spool.close()


async def test_second_process_cannot_open_the_same_standalone_spool(spool_dir: Path) -> None:
    from mta.spool import ShardLockedError

    first = await open_spool(spool_dir)
    try:
        other = Spool(spool_dir, "n2", shards=2)
        with pytest.raises(ShardLockedError, match="in use by another mta process"):
            await other.start()
    finally:
        await first.close()


async def test_cancelled_done_is_not_overtaken_by_a_compaction_copy(spool_dir: Path) -> None:
    """Review finding: a cancelled mark_done caller must not let compaction copy the message
    after its DONE (which would resurrect it on restart)."""
    spool = await open_spool(spool_dir, shards=1, segment_size=64 * 1024)
    ids = [await spool.submit(env(i), b"c" * 3000) for i in range(60)]
    for i in ids[1:]:
        await spool.mark_done(i)
    await spool.submit(env(99), b"newest")  # seal the head
    victim = ids[0]
    task = asyncio.create_task(spool.mark_done(victim))
    await wait_until(lambda: _writing(spool, 0), what="the DONE queued", step=0)
    assert task.cancel(), "the DONE was durable before the caller could be cancelled"
    with pytest.raises(asyncio.CancelledError):
        await task
    await spool.maintain(1.0)  # tries to compact the head that holds the victim
    # The cancelled caller's DONE still lands (the index drops the message once it is durable).
    await wait_until(lambda: victim not in {r.id for r in spool.live_messages(0)},
                     what="the cancelled DONE made durable")
    await spool.close()
    spool = await open_spool(spool_dir, shards=1, token=2)
    try:
        assert victim not in {r.id for r in spool.live_messages(0)}
    finally:
        await spool.close()


async def test_new_message_is_announced_even_if_the_submitter_is_cancelled(
        spool_dir: Path) -> None:
    seen: list[str] = []
    spool = Spool(spool_dir, "n1", shards=1, on_new_message=lambda mid, e, n: seen.append(mid))
    await spool.start()
    await spool.acquire_shard(0, 1)
    try:
        mid = spool.allocate_id()
        task = asyncio.create_task(spool.submit(env(1), b"body", mid))
        await wait_until(lambda: _writing(spool, 0), what="the message queued", step=0)
        # The SMTP client goes away during the fsync.
        assert task.cancel(), "the message was durable before the caller could be cancelled"
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: bool(seen), what="the new message announced")
        assert seen == [mid]
        assert (await spool.load(mid)).body == b"body"
    finally:
        await spool.close()


def test_index_knows_which_domains_still_have_pending_recipients() -> None:
    from mta.spool.index import MessageRef, recipient_domains

    one = recipient_domains(["a@x.test", "B@X.TEST"])
    assert one == (("x.test",), None)
    many = recipient_domains(["a@y.test", "b@x.test", "c@y.test"])
    assert many == (("x.test", "y.test"), bytes([1, 0, 1]))
    ref = MessageRef("id", 1, 0, 10, None, domains=many[0], rcpt_map=many[1])
    assert ref.pending_domains() == ("x.test", "y.test")
    ref.state = {"r": {"1": ["d", "250 ok", "", ""]}}
    assert ref.pending_domains() == ("y.test",)
    ref.state = {"r": {"0": ["d", "250 ok", "", ""], "2": ["b", "550 no", "bad-mailbox", ""]}}
    assert ref.pending_domains() == ("x.test",)
    # Interned: a million queued messages to one provider share one string.
    assert recipient_domains(["q@big.test"])[0][0] is recipient_domains(["r@big.test"])[0][0]


@pytest.mark.parametrize("seed", range(8))
async def test_random_corruption_and_torn_tail_keep_every_intact_message(
        spool_dir: Path, seed: int) -> None:
    """Bytes flipped at random offsets of random segments and the newest segment cut at a
    random point: recovery keeps every message whose own record bytes were not touched,
    byte for byte, and never returns a damaged one."""
    import random

    rnd = random.Random(seed)
    spool = await open_spool(spool_dir, shards=1, segment_size=64 * 1024)
    bodies = {}
    for i in range(300):
        body = os.urandom(rnd.randint(50, 3000))
        bodies[await spool.submit(env(i), body)] = body
    refs = {r.id: (r.seq, r.offset, r.size) for r in spool.live_messages(0)}
    await spool.close()
    shard = spool_dir / "shard-000"
    segs = list_segments(shard)
    assert len(segs) > 3
    damaged: dict[int, list[int]] = {}  # segment -> offsets touched
    for _ in range(rnd.randint(1, 12)):
        seq = rnd.choice(segs)
        path = segment_path(shard, seq)
        offset = rnd.randrange(path.stat().st_size)
        with open(path, "r+b") as fh:
            fh.seek(offset)
            old = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([old[0] ^ (1 << rnd.randrange(8))]))
        damaged.setdefault(seq, []).append(offset)
    newest = segment_path(shard, segs[-1])
    cut = rnd.randrange(newest.stat().st_size)
    os.truncate(newest, cut)

    def intact(mid: str) -> bool:
        seq, offset, size = refs[mid]
        if seq == segs[-1] and offset + size > cut:
            return False
        return not any(offset <= o < offset + size for o in damaged.get(seq, []))

    spool = await open_spool(spool_dir, shards=1, token=2, segment_size=64 * 1024)
    try:
        live = {r.id for r in spool.live_messages(0)}
        want = {mid for mid in bodies if intact(mid)}
        assert want <= live, f"seed {seed}: lost {len(want - live)} intact messages"
        for mid in live:
            assert (await spool.load(mid)).body == bodies[mid], f"seed {seed}: {mid} damaged"
        await spool.submit(env(999), b"the shard still takes mail")
    finally:
        await spool.close()


def test_record_crc_in_pieces_equals_zlib_and_keeps_the_gil() -> None:
    """Records are framed on the event loop: the crc goes in pieces small enough that zlib
    keeps the GIL (it lets go above 5 KiB, and taking it back meant a thread switch)."""
    import random
    import zlib

    from mta.spool.record import _CRC_PIECE, _crc32

    assert _CRC_PIECE <= 5 * 1024  # CPython's zlib: GIL released only above 5 KiB
    rng = random.Random(7)
    for size in (0, 1, _CRC_PIECE - 1, _CRC_PIECE, _CRC_PIECE + 1, 3 * _CRC_PIECE,
                 *(rng.randrange(1, 100_000) for _ in range(50))):
        data = rng.randbytes(size)
        start = rng.randrange(1 << 32)
        assert _crc32(data, start) == zlib.crc32(data, start), size
