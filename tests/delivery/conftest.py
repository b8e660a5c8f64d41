"""Fixtures of the delivery tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import World
from tests.support.rawsmtp import RawServer

RAW_MX = "127.0.0.2"  # where the raw fixture's server listens: mx.dest.test


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    """A test certificate authority and its certificate's path (a ``tls_ca_file``)."""
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)


@pytest.fixture
async def raw(world: World) -> AsyncIterator[Callable[..., Any]]:
    """``await raw(**RawServer options, delivery={...}, sections={...})``: dest.test's MX is
    a RawServer (tests/support/rawsmtp.py) on ``RAW_MX``, the sender's mailbox a sink (for
    DSNs), and the world's node started with those [delivery] keys and config sections."""
    servers: list[RawServer] = []

    async def start(delivery: dict[str, Any] | None = None,
                    sections: dict[str, dict[str, Any]] | None = None, **kw: Any) -> RawServer:
        world.zone({"dest.test": {"MX": [(10, "mx.dest.test")]},
                    "mx.dest.test": {"A": [RAW_MX]}})
        world.sink("127.0.0.5")
        server = await RawServer(RAW_MX, world.port, **kw).start()
        servers.append(server)
        await world.start(sections, **(delivery or {}))
        return server

    yield start
    for server in servers:
        await server.stop()
