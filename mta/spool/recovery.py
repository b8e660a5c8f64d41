"""Rebuild a shard's index from its segments after a restart or a takeover.

Reads every segment in order and verifies each record's crc. A bad region at the end of the
newest segment is a torn write that was never acknowledged: it is cut off. A bad region
anywhere else is reported and skipped; the scan goes on with the next valid record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mta.spool.index import ShardIndex, recipient_domains
from mta.spool.record import Kind, ScanIssue, ScannedRecord, scan
from mta.spool.segment import fsync_dir, list_segments, segment_path

__all__ = ["RecoveryReport", "recover_shard"]

log = structlog.get_logger("mta.spool.recovery")


@dataclass
class RecoveryReport:
    """What recovery found in one shard."""

    shard: int
    segments: int = 0
    records: int = 0
    live: int = 0
    corrupt: list[tuple[int, int, int, str]] = field(default_factory=list)  # seq, off, len, why
    truncated: list[tuple[int, int]] = field(default_factory=list)  # seq, new length
    owners: list[dict[str, Any]] = field(default_factory=list)  # segment headers, in order
    last_seq: int = 0


def recover_shard(shard_dir: Path, shard: int) -> tuple[ShardIndex, RecoveryReport]:
    """Scan ``shard_dir`` (blocking; run it in a thread) and return its index and a report."""
    index = ShardIndex()
    report = RecoveryReport(shard=shard)
    seqs = list_segments(shard_dir)
    report.segments = len(seqs)
    report.last_seq = seqs[-1] if seqs else 0
    for pos, seq in enumerate(seqs):
        newest = pos == len(seqs) - 1
        path = segment_path(shard_dir, seq)
        with open(path, "rb") as fh:
            data = fh.read()
        index.note(seq, 0, 0)
        for item in scan(data):
            if isinstance(item, ScanIssue):
                if newest and item.offset + item.length == len(data):
                    _truncate(path, item.offset)
                    report.truncated.append((seq, item.offset))
                    log.warning("spool.recovery.torn_tail", shard=shard, segment=seq,
                                offset=item.offset, dropped=item.length, reason=item.reason)
                else:
                    report.corrupt.append((seq, item.offset, item.length, item.reason))
                    log.error("spool.recovery.corrupt_record", shard=shard, segment=seq,
                              offset=item.offset, length=item.length, reason=item.reason)
                continue
            report.records += 1
            _apply(index, report, seq, item)
    # Appends after recovery always go to a new segment, so every scanned one is sealed.
    index.sealed_below = report.last_seq + 1
    report.live = len(index.messages)
    return index, report


def _apply(index: ShardIndex, report: RecoveryReport, seq: int, rec: ScannedRecord) -> None:
    meta = rec.meta
    try:
        kind = meta[0]
        if kind == Kind.MSG:
            index.on_msg(meta[1], seq, rec.offset, rec.size, meta[3],
                         recipient_domains(meta[2]["to"]))
        elif kind == Kind.STATE:
            index.on_state(meta[1], seq, rec.offset, rec.size, meta[2])
        elif kind == Kind.DONE:
            index.on_done(meta[1], seq, rec.offset, rec.size)
        elif kind == Kind.SEGMENT:
            index.note(seq, rec.offset, rec.size)
            report.owners.append(dict(meta[1]))
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except (IndexError, TypeError, ValueError, KeyError) as exc:
        # Valid crc but a shape we do not understand: keep scanning, never abort.
        report.corrupt.append((seq, rec.offset, rec.size, f"bad record: {exc}"))
        log.error("spool.recovery.bad_record", shard=report.shard, segment=seq,
                  offset=rec.offset, error=str(exc))


def _truncate(path: Path, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
