"""Asking peer nodes' admin APIs, for answers that span the cluster.

Every node of a cluster shares one admin token; a peer is asked with ``local=1`` so that it
answers for itself only (no fan-out loops).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from mta.coordinator import Member

__all__ = ["PeerAnswer", "PeerClient"]


@dataclass
class PeerAnswer:
    """What one peer said: ``status`` 0 when it could not be reached."""

    node: str
    status: int
    body: Any
    error: str = ""


class PeerClient:
    """A small aiohttp client with short timeouts; one per admin server."""

    def __init__(self, token: str, timeout: float = 5.0) -> None:
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=3.0)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ask(self, member: Member, method: str, path: str,
                  body: dict[str, Any] | None = None, params: dict[str, str] | None = None,
                  timeout: float | None = None) -> PeerAnswer:
        if not member.admin:
            return PeerAnswer(member.node, 0, None, "no admin URL published")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        query = {"local": "1", **(params or {})}
        kwargs: dict[str, Any] = {"params": query}
        if body is not None:
            kwargs["json"] = body
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout, connect=3.0)
        try:
            async with self._session.request(method, member.admin.rstrip("/") + path,
                                             **kwargs) as resp:
                text = await resp.text()
                try:
                    data = json.loads(text)
                except ValueError:
                    data = {"error": text[:200]}
                return PeerAnswer(member.node, resp.status, data)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return PeerAnswer(member.node, 0, None,
                              f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    async def ask_all(self, members: list[Member], method: str, path: str,
                      body: dict[str, Any] | None = None,
                      params: dict[str, str] | None = None,
                      timeout: float | None = None) -> list[PeerAnswer]:
        return list(await asyncio.gather(*(self.ask(m, method, path, body, params, timeout)
                                           for m in members)))
