"""Rebuild a shard's index from its segments after a restart or a takeover.

Reads every segment in order and verifies each record's crc. A bad region at the end of the
newest segment is a torn write that was never acknowledged: it is cut off, and so are the
valid records after the newest segment's last COMMIT (their batch was never completed, so
never acknowledged, and its side-file lines were never written). A bad region anywhere else
is reported and skipped; the scan goes on with the next valid record.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from mta.logs import describe
from mta.spool.index import ShardIndex, labels_of, recipient_domains
from mta.spool.record import Kind, ScanIssue, ScannedRecord, scan
from mta.spool.segment import fsync_dir, list_segments, segment_path

__all__ = ["COMMITS_KEPT", "RecoveryReport", "committed_end", "recover_shard"]

# How many of a shard's newest COMMIT records recovery hands on for checking the side file.
COMMITS_KEPT = 64

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
    # The newest COMMIT records, oldest first: (where its side lines went, the lines).
    commits: deque[tuple[dict[str, Any], bytes]] = field(
        default_factory=lambda: deque(maxlen=COMMITS_KEPT))
    uncommitted: int = 0  # records dropped because their batch never completed
    side_recovered: int = 0  # side-file lines written again because the file lacked them


def _note_issue(report: RecoveryReport, seq: int, item: ScanIssue, at_end: bool
                ) -> int | None:
    """Report a region that did not scan: a torn tail (the newest segment's end: cut it
    there, the offset returned) or a corrupt record (skipped, kept on disk)."""
    if at_end:
        log.warning("spool.recovery.torn_tail", shard=report.shard, segment=seq,
                    offset=item.offset, dropped=item.length, reason=item.reason)
        return item.offset
    report.corrupt.append((seq, item.offset, item.length, item.reason))
    log.error("spool.recovery.corrupt_record", shard=report.shard, segment=seq,
              offset=item.offset, length=item.length, reason=item.reason)
    return None


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
        batched = False  # format 2: records count only once their batch's COMMIT is seen
        pending: list[ScannedRecord] = []
        cut: int | None = None
        for item in scan(data):
            if isinstance(item, ScanIssue):
                torn = _note_issue(report, seq, item, newest and (
                    item.offset + item.length == len(data)))
                if torn is not None:
                    cut = torn
                continue
            report.records += 1
            kind = item.meta[0]
            if kind == Kind.SEGMENT:
                batched = _segment_format(item) >= 2
            elif kind == Kind.COMMIT:
                for rec in pending:
                    _apply(index, report, seq, rec)
                pending.clear()
                index.note(seq, item.offset, item.size)
                side_at = item.meta[1] if isinstance(item.meta[1], dict) else {}
                report.commits.append(
                    (side_at, data[item.body_offset:item.body_offset + item.body_len]))
                continue
            elif batched:
                pending.append(item)
                continue
            _apply(index, report, seq, item)
        if pending and newest:
            cut = pending[0].offset
            report.uncommitted += len(pending)
            log.warning("spool.recovery.uncommitted_tail", shard=shard, segment=seq,
                        offset=cut, records=len(pending))
        else:
            for rec in pending:  # a sealed segment cut short by a failed write: keep them
                _apply(index, report, seq, rec)
        if cut is not None:
            _truncate(path, cut)
            report.truncated.append((seq, cut))
    # Appends after recovery always go to a new segment, so every scanned one is sealed.
    index.sealed_below = report.last_seq + 1
    report.live = len(index.messages)
    return index, report


def committed_end(data: bytes) -> int:
    """Where the acknowledgeable part of a newest segment ends: just past its last COMMIT
    record, or past its SEGMENT header when no batch completed (format 1, with no COMMIT:
    past its last valid record); 0 when it holds no valid record. Everything after it is a
    torn write or a batch that never completed. :func:`recover_shard` cuts no further back
    than this (it keeps a corrupt region that precedes the uncommitted records); a follower's
    copy cuts exactly here, so it ends where some owner batch ended."""
    end = 0
    batched = False
    for item in scan(data):
        if isinstance(item, ScanIssue):
            continue
        kind = item.meta[0]
        if kind == Kind.SEGMENT:
            batched = _segment_format(item) >= 2
        elif batched and kind != Kind.COMMIT:
            continue
        end = item.offset + item.size
    return end


def _apply(index: ShardIndex, report: RecoveryReport, seq: int, rec: ScannedRecord) -> None:
    meta = rec.meta
    try:
        kind = meta[0]
        if kind == Kind.MSG:
            index.on_msg(meta[1], seq, rec.offset, rec.size, meta[3],
                         recipient_domains(meta[2]["to"]), labels_of(meta[2]))
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
        report.corrupt.append((seq, rec.offset, rec.size, f"bad record: {describe(exc)}"))
        log.error("spool.recovery.bad_record", shard=report.shard, segment=seq,
                  offset=rec.offset, error=describe(exc))


def _segment_format(rec: ScannedRecord) -> int:
    header = rec.meta[1] if len(rec.meta) > 1 else None
    version = header.get("v", 1) if isinstance(header, dict) else 1
    return version if isinstance(version, int) else 1


def _truncate(path: Path, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
