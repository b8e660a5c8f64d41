"""On-disk record format of the segment log.

A record is ``magic | total_len | meta_len | crc32`` (little-endian u32 each), then ``meta``
(msgpack) and ``body`` (raw bytes, only for MSG). The crc covers both lengths, meta and body,
so a corrupt length is caught too; the magic lets a scan resynchronise after a bad region.
Keeping the body outside msgpack lets recovery verify a record without decoding its body.

Since format 2 (the segment header's ``v``) every group-commit batch ends, in each shard it
touches, with a COMMIT record written in the same ``write`` as the batch's records. It carries
the batch's side-file lines (the accounting log) as its body and where they go in that file.
Records after the last COMMIT of the newest segment were never acknowledged and their lines
never written anywhere: recovery drops them, so the spool never holds more than the side
file can be made to say.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_RECORD",
    "SEGMENT_FORMAT",
    "Kind",
    "ScanIssue",
    "ScannedRecord",
    "encode",
    "encode_commit",
    "encode_done",
    "encode_msg",
    "encode_segment_header",
    "encode_state",
    "scan",
]

MAGIC = 0x7253544D  # b"MTSr" little-endian
HEADER = struct.Struct("<IIII")
_LENS = struct.Struct("<II")
# A record larger than this is treated as a corrupt length (max message size is far below).
MAX_RECORD = 1 << 30
# Segments from format 2 on end every batch with a COMMIT record.
SEGMENT_FORMAT = 2


class Kind(enum.IntEnum):
    """Record kinds; SEGMENT opens every segment and names the owner that wrote it."""

    SEGMENT = 0
    MSG = 1
    STATE = 2
    DONE = 3
    COMMIT = 4


# zlib.crc32 lets go of the GIL for more than 5 KiB, and records are framed on the event
# loop: taking the GIL back meant waiting for the spool's writer thread, a thread switch per
# message (ingress lost 8% of its throughput to it). Pieces this big keep it.
_CRC_PIECE = 4096


def _crc32(data: bytes, crc: int) -> int:
    """``zlib.crc32(data, crc)``, computed in pieces that keep the GIL."""
    if len(data) <= _CRC_PIECE:
        return zlib.crc32(data, crc)
    view = memoryview(data)
    for at in range(0, len(data), _CRC_PIECE):
        crc = zlib.crc32(view[at:at + _CRC_PIECE], crc)
    return crc


def encode(meta: list[Any], body: bytes = b"") -> bytes:
    """Frame one record."""
    meta_b = msgpack.packb(meta, use_bin_type=True)
    total = len(meta_b) + len(body)
    lens = _LENS.pack(total, len(meta_b))
    crc = _crc32(body, zlib.crc32(meta_b, zlib.crc32(lens)))
    return b"".join((HEADER.pack(MAGIC, total, len(meta_b), crc), meta_b, body))


def encode_msg(
    message_id: str, envelope: dict[str, Any], body: bytes, state: dict[str, Any] | None = None
) -> bytes:
    return encode([Kind.MSG, message_id, envelope, state], body)


def encode_state(message_id: str, state: dict[str, Any]) -> bytes:
    return encode([Kind.STATE, message_id, state])


def encode_done(message_id: str) -> bytes:
    return encode([Kind.DONE, message_id])


def encode_commit(side_at: dict[str, Any], lines: bytes) -> bytes:
    """End of a batch: ``lines`` for the side file, written there where ``side_at`` says."""
    return encode([Kind.COMMIT, side_at], lines)


def encode_segment_header(shard: int, seq: int, node: str, token: int) -> bytes:
    return encode([Kind.SEGMENT, {"v": SEGMENT_FORMAT, "shard": shard, "seq": seq,
                                  "node": node, "token": token}])


@dataclass(slots=True)
class ScannedRecord:
    """A verified record found by :func:`scan`; ``body`` is only the slice's bounds."""

    offset: int
    size: int
    meta: list[Any]
    body_offset: int
    body_len: int


@dataclass(slots=True)
class ScanIssue:
    """A region of the buffer that holds no valid record."""

    offset: int
    length: int
    reason: str


def _check_at(buf: memoryview, pos: int, end: int) -> tuple[int, int, int] | str:
    """Validate the record at ``pos``: (total, meta_len, size) or a reason it is not one."""
    if end - pos < HEADER.size:
        return "short header"
    magic, total, meta_len, crc = HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return "bad magic"
    if total > MAX_RECORD or meta_len > total:
        return "bad length"
    size = HEADER.size + total
    if pos + size > end:
        return "truncated"
    start = pos + HEADER.size
    if zlib.crc32(buf[start:start + total], zlib.crc32(buf[pos + 4:pos + 12])) != crc:
        return "crc mismatch"
    return total, meta_len, size


def scan(data: bytes, base: int = 0) -> Iterator[ScannedRecord | ScanIssue]:
    """Yield every valid record in ``data`` in order, and an issue for each bad region.

    A bad region ends at the next offset holding a valid record; if none follows, the issue
    runs to the end of the buffer (a torn tail when this is the newest segment).
    """
    buf = memoryview(data)
    end = len(data)
    pos = 0
    magic_bytes = HEADER.pack(MAGIC, 0, 0, 0)[:4]
    while pos < end:
        checked = _check_at(buf, pos, end)
        if isinstance(checked, tuple):
            total, meta_len, size = checked
            start = pos + HEADER.size
            try:
                meta = msgpack.unpackb(buf[start:start + meta_len], raw=False,
                                       strict_map_key=False)
            except Exception:
                meta = None
            if isinstance(meta, list) and meta:
                yield ScannedRecord(base + pos, size, meta, base + start + meta_len,
                                    total - meta_len)
                pos += size
                continue
            checked = "undecodable meta"
        reason = checked
        bad_start = pos
        nxt = pos + 1
        while True:
            nxt = data.find(magic_bytes, nxt)
            if nxt < 0:
                nxt = end
                break
            if isinstance(_check_at(buf, nxt, end), tuple):
                break
            nxt += 1
        yield ScanIssue(base + bad_start, nxt - bad_start, reason)
        pos = nxt
