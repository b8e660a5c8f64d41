"""A webhook receiver for the delivery-events tests: a real aiohttp server on loopback that
checks each POST's ``X-MTA-Signature`` and keeps the events it acknowledged."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
from typing import Any

from aiohttp import web

from harness.net import free_port_on

__all__ = ["SECRET", "Receiver"]

SECRET = "0123456789abcdef0123456789abcdef"


class Receiver:
    """A webhook receiver: checks each POST's signature against ``secret`` (a 401 if it does
    not match), keeps the events in arrival order; ``fail`` (0-1) of the POSTs get a 500 and
    ``stall`` of them no answer in time; ``down``: every POST gets a 503."""

    def __init__(self, fail: float = 0.0, stall: float = 0.0, seed: int = 7,
                 secret: str = SECRET) -> None:
        self.port = free_port_on("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.secret = secret.encode()
        self.fail, self.stall = fail, stall
        self.down = False
        self.rng = random.Random(seed)
        self.events: list[dict[str, Any]] = []
        self.posts = self.refused = 0
        self.bad_signatures = 0
        self.duplicated = False
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts += 1
        t, _, mac = request.headers.get("X-MTA-Signature", "").partition(",v1=")
        want = hmac.new(self.secret, f"{t[2:]}.".encode() + body, hashlib.sha256).hexdigest()
        if not t.startswith("t=") or not hmac.compare_digest(mac, want):
            self.bad_signatures += 1
            return web.Response(status=401)
        roll = self.rng.random()
        if self.down or roll < self.fail:
            self.refused += 1
            return web.Response(status=503 if self.down else 500)
        if roll < self.fail + self.stall:
            # Taken in, but answered after the shipper's timeout: it sends the batch again,
            # and the receiver sees the same events twice (with the same ids).
            self.events.extend(json.loads(body)["events"])
            self.duplicated = True
            await asyncio.sleep(2)
            return web.Response(status=200)
        self.events.extend(json.loads(body)["events"])
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def unique(self) -> dict[str, dict[str, Any]]:
        """Events by id, first arrival kept (duplicates are the same event)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.events:
            out.setdefault(e["event_id"], e)
        return out

    def kinds(self, mid: str) -> list[str]:
        return [e["type"] for e in self.unique().values() if e["message_id"] == mid]
