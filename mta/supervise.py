"""Background loops that outlive their own bugs: one failed pass is logged and counted, and
the loop runs again (an exception used to end a loop silently for the life of the node)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from prometheus_client import Counter

from mta.logs import describe

__all__ = ["supervise"]

log = structlog.get_logger("mta.node")


async def supervise(name: str, run: Callable[[], Awaitable[None]], *, node_id: str,
                    errors: Counter, pause: float = 1.0) -> None:
    """Run ``run()`` (a loop meant never to return) until cancelled.

    When it raises, log it with ``node_id``, count it in ``errors`` (label ``loop=name``), wait
    ``pause`` seconds and start it again. The pause keeps a loop that fails at once from
    spinning the event loop and flooding the log. Cancellation (``stop``) passes through.
    """
    while True:
        try:
            await run()
        except Exception as exc:
            errors.labels(name).inc()
            log.exception("node.loop_failed", node_id=node_id, loop=name, error=describe(exc))
        else:
            # A loop that ends is a bug too (nothing would run it again): same treatment.
            errors.labels(name).inc()
            log.error("node.loop_ended", node_id=node_id, loop=name)
        await asyncio.sleep(pause)
