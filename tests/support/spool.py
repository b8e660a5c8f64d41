"""Reading a spool the way a restarted node would."""

from __future__ import annotations

import asyncio
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
