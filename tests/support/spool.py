"""Reading a spool the way a restarted node would."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from mta.spool import Spool


def read_spool(path: Path, shards: int) -> dict[str, Any]:
    """Open a spool the way a restarted node would and return {id: StoredMessage}."""

    async def run() -> dict[str, Any]:
        spool = Spool(path, "reader", shards=shards)
        await spool.start()
        out = {}
        try:
            for n in range(shards):
                await spool.acquire_shard(n, time.time_ns())
                for ref in spool.live_messages(n):
                    out[ref.id] = await spool.load(ref.id)
        finally:
            await spool.close()
        return out

    return asyncio.run(run())


def read_accounting(path: Path) -> list[dict[str, Any]]:
    """Every record of an accounting log (JSONL), in order; none if the file is not there yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]
