"""No acknowledgement before the disk: a ``250`` to DATA or a ``202`` to an HTTP injection
never reaches the client before the fdatasync covering the message's records has returned.

The node runs in-process, on the test's event loop. ``os.fdatasync`` and ``os.fsync`` are
wrapped (a pass-through that records): each sync of a spool segment is noted, with the size
the file had when it began, once it has returned. The client notes which syncs had returned
the moment it reads the reply; afterwards the message's records (its MSG record and the
COMMIT that ends its batch) are located in the segment, and one of those syncs must cover
them. The order is exact: the wrapper records before it returns, the writer thread can only
release the reply after that, and the client reads on the same loop as the server.

A sync is also held back, while the test is waiting for its reply, until the loop has run
many rounds: a reply released before the sync (the writer resolving its futures first) has
every chance to reach the client while that sync has not returned yet, instead of losing a
race against a fast disk.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mta.envelope import shard_of
from mta.node import Node
from mta.spool.record import Kind, ScannedRecord, scan
from mta.spool.segment import list_segments, segment_path
from tests.support import message

_SEGMENT = re.compile(r"/shard-\d{3}/seg-\d{8}\.log$")
_HOLD_ROUNDS = 500  # loop iterations a held sync waits for an early reply (a few are enough)
_HOLD_MIN = 0.05  # and at least this long, for margin


class SyncWatch:
    """Records every sync of a spool segment that has returned; holds them while armed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, root: Path) -> None:
        self.loop = loop
        self.root = str(root.resolve()) + "/"
        self.lock = threading.Lock()
        self.returned: list[tuple[str, int]] = []  # (segment path, size when the sync began)
        self.armed = False
        self.held = 0
        self.replied = threading.Event()

    def wrap(self, real: Callable[[Any], None]) -> Callable[[Any], None]:
        def sync(fd: Any) -> None:
            num = fd if isinstance(fd, int) else fd.fileno()
            path = os.readlink(f"/proc/self/fd/{num}")
            segment = path.startswith(self.root) and _SEGMENT.search(path) is not None
            if not segment:
                real(fd)
                return
            size = os.fstat(num).st_size
            if self.armed:
                asyncio.run_coroutine_threadsafe(self._hold(), self.loop).result(timeout=30)
                self.held += 1
            real(fd)
            with self.lock:
                self.returned.append((path, size))

        return sync

    async def _hold(self) -> None:
        """Let the loop run until the reply arrives or it could have many times over."""
        until = time.monotonic() + _HOLD_MIN
        rounds = 0
        while not self.replied.is_set() and (rounds < _HOLD_ROUNDS or time.monotonic() < until):
            await asyncio.sleep(0)
            rounds += 1

    def arm(self) -> None:
        self.replied.clear()
        self.armed = True

    def reply_seen(self) -> list[tuple[str, int]]:
        """Called the moment the client has the reply: the syncs that had returned."""
        with self.lock:
            seen = list(self.returned)
        self.armed = False
        self.replied.set()
        return seen


@pytest.fixture
async def watched(start_node: Any, monkeypatch: pytest.MonkeyPatch
                  ) -> tuple[Node, SyncWatch]:
    node = await start_node()
    watch = SyncWatch(asyncio.get_running_loop(), Path(node.cfg.spool.path))
    monkeypatch.setattr(os, "fdatasync", watch.wrap(os.fdatasync))
    monkeypatch.setattr(os, "fsync", watch.wrap(os.fsync))
    return node, watch


def _records_end(root: Path, message_id: str) -> tuple[str, int] | None:
    """(segment path, end offset) of the message's MSG record and the COMMIT after it."""
    shard_dir = root / f"shard-{shard_of(message_id):03d}"
    for seq in list_segments(shard_dir):
        path = segment_path(shard_dir, seq)
        found = False
        for item in scan(path.read_bytes()):
            if not isinstance(item, ScannedRecord):
                continue
            if item.meta[0] == Kind.MSG and item.meta[1] == message_id:
                found = True
            elif found and item.meta[0] == Kind.COMMIT:
                return str(path.resolve()), item.offset + item.size
    return None


async def _assert_covered(node: Node, watch: SyncWatch, message_id: str,
                          seen: list[tuple[str, int]], reply: str) -> None:
    root = Path(node.cfg.spool.path)
    deadline = time.monotonic() + 10
    while (where := _records_end(root, message_id)) is None:
        assert time.monotonic() < deadline, f"{message_id}: no MSG + COMMIT in the spool"
        await asyncio.sleep(0.02)
    path, end = where
    covering = [s for s in seen if s[0] == path and s[1] >= end]
    assert covering, (f"{reply!r} reached the client before an fdatasync covering "
                      f"{message_id} (bytes up to {end} of {path}) had returned; "
                      f"segment syncs returned by then: {seen}")
    assert watch.held >= 1, "no segment sync happened while the reply was awaited"


async def test_smtp_250_only_after_the_fdatasync_covering_the_message(
        watched: tuple[Node, SyncWatch]) -> None:
    node, watch = watched
    assert node.ingress is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", node.ingress.port)

    async def cmd(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        return await _reply(reader)

    try:
        assert (await _reply(reader)).startswith(b"220")
        assert (await cmd(b"EHLO client.example")).startswith(b"250")
        assert (await cmd(b"MAIL FROM:<a@example.com>")).startswith(b"250")
        assert (await cmd(b"RCPT TO:<b@example.org>")).startswith(b"250")
        assert (await cmd(b"DATA")).startswith(b"354")
        watch.arm()
        writer.write(message(1, 3000) + b".\r\n")
        line = await asyncio.wait_for(reader.readline(), 30)
        seen = watch.reply_seen()  # nothing may run between reading the reply and this
        reply = line.decode()
        assert reply.startswith("250 "), reply
        await _assert_covered(node, watch, reply.split()[-1], seen, reply)
    finally:
        writer.close()


async def test_http_202_only_after_the_fdatasync_covering_the_message(
        watched: tuple[Node, SyncWatch]) -> None:
    node, watch = watched
    assert node.admin is not None
    url = f"http://127.0.0.1:{node.admin.port}/api/v1/messages"
    body = {"from": "a@example.com", "to": ["b@example.org"],
            "content": message(2, 3000).decode()}
    async with aiohttp.ClientSession() as http:
        watch.arm()
        async with http.post(url, json=body, headers={"Authorization": "Bearer t0ken"}) as resp:
            seen = watch.reply_seen()  # the status line and headers are in: the ack
            answer = await resp.json()
            assert resp.status == 202, answer
    await _assert_covered(node, watch, answer["id"], seen, f"HTTP {resp.status}")


async def _reply(reader: asyncio.StreamReader) -> bytes:
    out = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 30)
        out += line
        if len(line) < 4 or line[3:4] != b"-":
            return out
