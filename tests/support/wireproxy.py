"""A man in the middle for the replication channel tests: a TCP proxy that understands the
frame prefix, so a test can alter, replay or drop whole frames client -> server, and see the
server's frames (to move one into the other direction)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from mta.replication.frames import MAC_LEN, PREFIX

# (index of the frame in the client -> server stream, its bytes) -> the bytes to forward
Tamper = Callable[[int, bytes], list[bytes]]
HANDSHAKE_FRAMES = 2  # each side's first two (hello, finish / hello, ok): no MAC


class FrameProxy:
    """Forwards to ``127.0.0.1:upstream``; client frames go through ``tamper``."""

    def __init__(self, upstream: int, tamper: Tamper, mac: bool = True) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.mac = mac
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server_frames: list[bytes] = []  # server -> client data frames, as they passed

    async def start(self) -> FrameProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers += [cwriter, uwriter]
        self._spawn(self._frames(creader, uwriter, self.tamper))
        self._spawn(self._frames(ureader, cwriter, self._record))

    def _record(self, index: int, frame: bytes) -> list[bytes]:
        if index >= HANDSHAKE_FRAMES:  # the server's hello and ok carry no MAC either
            self.server_frames.append(frame)
        return [frame]

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      tamper: Tamper) -> None:
        index = 0
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                prefix = await reader.readexactly(PREFIX.size)
                _, hlen, plen = PREFIX.unpack(prefix)
                mac = MAC_LEN if self.mac and index >= HANDSHAKE_FRAMES else 0
                frame = prefix + await reader.readexactly(hlen + plen + mac)
                for out in tamper(index, frame):
                    writer.write(out)
                await writer.drain()
                index += 1
        writer.close()
