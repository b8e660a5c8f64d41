"""A webhook receiver for the ``mta-events`` target: an aiohttp server in a thread of the
harness, checking every POST's signature and counting the distinct events it got."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from typing import Any

from aiohttp import web

from harness.net import free_port

__all__ = ["EventsReceiver"]


class EventsReceiver:
    """``http://127.0.0.1:<port>/hook``; ``events``: distinct event ids received."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.port = free_port()
        self.ids: set[str] = set()
        self.posts = self.bad_signatures = 0
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events-receiver", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def events(self) -> int:
        with self.lock:
            return len(self.ids)

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        t, _, mac = request.headers.get("X-MTA-Signature", "").partition(",v1=")
        want = hmac.new(self.secret, f"{t[2:]}.".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, want):
            with self.lock:
                self.bad_signatures += 1
            return web.Response(status=401)
        events: list[dict[str, Any]] = json.loads(body)["events"]
        with self.lock:
            self.posts += 1
            self.ids.update(e["event_id"] for e in events)
        return web.Response(status=204)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(
            web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> EventsReceiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the events receiver did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
