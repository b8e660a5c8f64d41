"""The hostile client of the flood tests: connections that hold the listener, idle or
dribbling a command line that never ends, once or reconnecting the moment they are cut."""

from __future__ import annotations

import asyncio
import time

# What a reconnecting attacker counts (see ``reconnecting_attacker``).
FLOOD_STATS = ("held", "holding", "peak", "refused", "cut", "errors", "connect_errors")
_COUNTED_AS = {"refused": "refused", "closed": "cut", "reset": "errors", "timeout": "errors"}


def _note_hold(stats: dict[str, int] | None, delta: int) -> None:
    if stats is None:
        return
    stats["holding"] = stats.get("holding", 0) + delta
    if delta > 0:
        stats["held"] = stats.get("held", 0) + 1
        stats["peak"] = max(stats.get("peak", 0), stats["holding"])


async def _hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dribble: bool,
                stop: asyncio.Event | None, hold_for: float) -> str:
    deadline = time.monotonic() + hold_for
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return "stopped"
        if dribble:  # one byte a second of a command line that never ends
            writer.write(b"M")
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(100), 1.0)
        except TimeoutError:
            continue
        if not data:
            return "closed"
    return "still open"


async def hold_connection(smtp_port: int, source: str, *, dribble: bool,
                          stop: asyncio.Event | None = None, hold_for: float = 60.0,
                          greeting_timeout: float = 30.0,
                          stats: dict[str, int] | None = None) -> str:
    """One hostile connection from ``source``, held until the server hangs up, ``stop`` is
    set or ``hold_for`` seconds pass. Returns "refused" (421 4.7.0 at the greeting), "closed"
    (the server hung up), "reset", "timeout" (no greeting), "stopped", "still open", or
    "greeted <other greeting>". ``stats`` counts held, holding and peak connections.
    A connection that cannot even be opened raises OSError."""
    reader, writer = await asyncio.open_connection("127.0.0.1", smtp_port,
                                                   local_addr=(source, 0))
    try:
        greeting = await asyncio.wait_for(reader.readline(), greeting_timeout)
        if greeting.startswith(b"421 4.7.0"):
            return "refused"
        if not greeting.startswith(b"220"):
            return f"greeted {greeting[:60]!r}"
        _note_hold(stats, +1)
        try:
            return await _hold(reader, writer, dribble, stop, hold_for)
        finally:
            _note_hold(stats, -1)
    except TimeoutError:
        return "timeout"
    except (ConnectionError, OSError):
        return "reset"
    finally:
        writer.close()


async def reconnecting_attacker(smtp_port: int, source: str, dribble: bool,
                                stop: asyncio.Event, stats: dict[str, int],
                                for_at_most: float = 90.0) -> None:
    """Holds a connection as long as it can and reconnects the moment it is cut or refused,
    until ``stop``; counts into ``stats`` (the keys of FLOOD_STATS)."""
    deadline = time.monotonic() + for_at_most
    for _ in range(20_000):  # a few hundred are needed; bounded in count as well as time
        left = deadline - time.monotonic()
        if stop.is_set() or left <= 0:
            break
        try:
            outcome = await hold_connection(smtp_port, source, dribble=dribble, stop=stop,
                                            hold_for=left, greeting_timeout=10, stats=stats)
        except OSError:
            stats["connect_errors"] += 1
            continue
        if outcome.startswith("greeted"):
            outcome = "refused"  # any other refusal at the greeting
        if outcome in _COUNTED_AS:
            stats[_COUNTED_AS[outcome]] += 1
