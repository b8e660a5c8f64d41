"""What the egress tests share: a zone with two domains on one MX, three sources bound to
127.0.0.11-13, the [egress] section built from them, and submitting tagged mail."""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path
from typing import Any

from harness.mail import message
from tests.support.world import World

ZONE = {"dest.test": {"MX": [(10, "mx.dest.test")]},
        "other.test": {"MX": [(10, "mx.dest.test")]},
        "mx.dest.test": {"A": ["127.0.0.2"]}}
SITE = "mx.dest.test"
IP1, IP2, IP3 = "127.0.0.11", "127.0.0.12", "127.0.0.13"
BLOCKED = "554 5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org"


def sources(**extra: dict[str, Any]) -> dict[str, Any]:
    """ip1-ip3 with their EHLO names; ``extra``: more keys for some of them."""
    out: dict[str, Any] = {
        "ip1": {"address": IP1, "ehlo": "one.sender.test"},
        "ip2": {"address": IP2, "ehlo": "two.sender.test"},
        "ip3": {"address": IP3, "ehlo": "three.sender.test"},
    }
    for name, more in extra.items():
        out[name] = {**out[name], **more}
    return out


def egress(tmp_path: Path, pools: dict[str, Any], **keys: Any) -> dict[str, Any]:
    """An [egress] section: ``pools`` over :func:`sources` (or ``sources=``), its state
    under ``tmp_path``."""
    srcs = keys.pop("sources", sources())
    return {"sources": srcs, "pools": pools, "state": str(tmp_path / "egress.json"), **keys}


async def send(world: World, count: int, domain: str = "dest.test", tenant: str = "",
               start: int = 0) -> list[str]:
    """``count`` messages, one recipient each (``r<n>@domain``), for ``tenant``; their ids."""
    extra = f"X-MTA-Tenant: {tenant}\r\n" if tenant else ""
    return [await world.submit([f"r{n}@{domain}"], body=message(n, 300, extra_headers=extra))
            for n in range(start, start + count)]


def peers(world: World) -> Counter[str]:
    """Messages the sinks got, by the client address they came from."""
    return Counter(m.peer for s in world.sinks for m in s.messages)


def today() -> str:
    """Today (UTC), as warm-up days are counted."""
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def warm_wait(tmp_path: Path, cap: int | str, **keys: Any) -> dict[str, Any]:
    """An [egress] section whose default pool is ip1 alone, warming up from today at ``cap``
    a day, its mail waiting (``over_cap = "wait"``) once the cap is reached."""
    srcs = sources(ip1={"warmup": [cap], "warmup_start": today()})
    return egress(tmp_path, {"warm": {"sources": ["ip1"], "over_cap": "wait"}}, sources=srcs,
                  default_pool="warm", **keys)
