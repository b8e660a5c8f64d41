"""Run as ``python -m tests.support.crash_points SPOOL ACCT SCENARIO``: store messages
through the real spool and accounting log, then die by SIGKILL inside the writer thread
between a batch's spool write and its accounting write (optionally after writing half
the accounting lines).

Scenarios:
- ``reception``: messages 1-3 stored; the 4th dies before its Reception line is written.
- ``done``: messages 1-3 stored; marking the 1st delivered dies before its Delivery line.
- ``done-torn``: as ``done``, with one Delivery line and half of the other written.

Prints "IDS" and the ids stored, in order, as JSON before the fatal batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from mta.accounting import AccountingLog
from mta.envelope import Envelope
from mta.spool import Spool

SHARDS = 4


class DyingLog(AccountingLog):
    """Dies at the ``die_at``-th side write, having written ``keep`` of it (0..1)."""

    def __init__(self, path: str, die_at: int, keep: float) -> None:
        super().__init__(path, "test-node")
        self.die_at = die_at
        self.keep = keep
        self.calls = 0

    def write(self, data: bytes) -> None:
        self.calls += 1
        if self.calls == self.die_at:
            if self.keep and self._fd is not None:
                os.write(self._fd, data[:int(len(data) * self.keep)])
            os.kill(os.getpid(), signal.SIGKILL)
        super().write(data)


def _message(n: int) -> bytes:
    return (f"From: app@sender.test\r\nTo: r{n}@one.test\r\nSubject: crash {n}\r\n"
            f"X-Test-Id: {n}\r\n\r\nbody {n}\r\n").encode()


async def main(spool_path: str, acct: str, scenario: str) -> None:
    # Three stored messages are three batches: the fourth side write is the fatal one.
    side = DyingLog(acct, 4, 0.75 if scenario == "done-torn" else 0.0)
    spool = Spool(spool_path, "test-node", shards=SHARDS, side_log=side)
    await spool.start()
    await side.start()
    for n in range(SHARDS):
        await spool.acquire_shard(n, 1)
    ids = []
    for n in range(1, 4):
        env = Envelope("app@sender.test", [f"r{n}@one.test", f"s{n}@two.test"],
                       client_ip="127.0.0.1")
        ids.append(await spool.submit(env, _message(n)))
    print("IDS", json.dumps(ids), flush=True)
    if scenario == "reception":
        env = Envelope("app@sender.test", ["r4@one.test"], client_ip="127.0.0.1")
        await spool.submit(env, _message(4))
    else:
        mid = ids[0]
        lines = b"".join(side.line("Delivery", mid, recipient=rcpt, sender="app@sender.test",
                                   reply="250 2.0.0 ok", attempt=1)
                         for rcpt in ("r1@one.test", "s1@two.test"))
        await spool.mark_done(mid, lines)
    raise SystemExit("the writer was to die before this point")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
