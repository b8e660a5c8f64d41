"""Fixtures of the spool tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mta.spool.ownership import OwnerToken
from mta.spool.shard import Shard
from mta.spool.writer import GroupCommitWriter

ENVELOPE = {"from": "a@x.org", "to": ["r@y.org"]}


@pytest.fixture
async def shard(tmp_path: Path) -> Any:
    """An open shard on its own writer, holding one message, ``M0``."""
    writer = GroupCommitWriter(asyncio.get_running_loop())
    shard = Shard(0, tmp_path, writer, OwnerToken("n1", 1), segment_size=1 << 20)
    await shard.open()
    await shard.add("M0", ENVELOPE, b"body")
    yield shard
    # Bounded: a write the writer never settled must fail the test, not hang it.
    await asyncio.wait_for(shard.close(), 10)
    await asyncio.wait_for(writer.close(), 10)
