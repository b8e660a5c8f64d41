"""Asking peer nodes' admin APIs, for answers that span the cluster.

Every node of a cluster shares one admin token; a peer is asked with ``local=1`` so that it
answers for itself only (no fan-out loops).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from mta.coordinator import Member
from mta.logs import describe

__all__ = ["PeerAnswer", "PeerClient", "PeerStreamError"]

# A stream (the live trace) has no end and may stay quiet for long: only connecting is timed.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=3.0, sock_read=None)


_MAX_STREAM_LINE = 64 * 1024


class PeerStreamError(Exception):
    """A peer's stream could not be opened (unreachable, refused) or broke off."""


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
            return PeerAnswer(member.node, 0, None, describe(exc))

    async def stream(self, member: Member, path: str,
                     params: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        """The lines of a peer's streaming answer (asked with local=1) as they come; raises
        PeerStreamError when it cannot be asked, refuses (its error said) or breaks off."""
        if not member.admin:
            raise PeerStreamError("no admin URL published")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        query = {"local": "1", **(params or {})}
        try:
            async with self._session.get(member.admin.rstrip("/") + path, params=query,
                                         timeout=_STREAM_TIMEOUT) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    try:
                        error = json.loads(text).get("error", "")
                    except (ValueError, AttributeError):
                        error = text[:200]
                    raise PeerStreamError(f"HTTP {resp.status}: {error}")
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        yield line + b"\n"
                    if len(buf) > _MAX_STREAM_LINE:
                        # No trace line comes near this: a broken or hostile peer.
                        raise PeerStreamError(f"a line over {_MAX_STREAM_LINE} bytes")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise PeerStreamError(describe(exc)) from None

    async def ask_all(self, members: list[Member], method: str, path: str,
                      body: dict[str, Any] | None = None,
                      params: dict[str, str] | None = None,
                      timeout: float | None = None) -> list[PeerAnswer]:
        return list(await asyncio.gather(*(self.ask(m, method, path, body, params, timeout)
                                           for m in members)))
