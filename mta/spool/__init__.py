"""Durable sharded spool: segment logs, group commit, recovery, compaction."""

from mta.spool.errors import (
    FencedError,
    MessageNotFound,
    NoShardsOwned,
    ShardLockedError,
    SpoolError,
    SpoolWriteError,
)
from mta.spool.recovery import RecoveryReport
from mta.spool.shard import StoredMessage
from mta.spool.spool import Spool

__all__ = [
    "FencedError",
    "MessageNotFound",
    "NoShardsOwned",
    "RecoveryReport",
    "ShardLockedError",
    "Spool",
    "SpoolError",
    "SpoolWriteError",
    "StoredMessage",
]
