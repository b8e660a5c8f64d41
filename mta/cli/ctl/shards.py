"""``mtactl shards``: who owns which spool shard (and, with a replicated spool, where its
copies are, which are in sync, and how far each follower lags)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from mta.cli.ctl.client import call, emit, table


def _owner(shard: dict[str, Any]) -> str:
    if shard["owner"] is None:
        return "UNOWNED"
    # Until a dead owner's lease runs out its keys stand; say so rather than look healthy.
    return shard["owner"] + (" (lease expiring)" if shard.get("owner_lease_expiring") else "")


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


def _in_sync(shard: dict[str, Any]) -> str:
    members = shard.get("in_sync")
    if members is None:
        return "-"
    text = ",".join(members)
    return text + (" (READ-ONLY)" if shard.get("state") == "read_only" else "")


def _lag(shard: dict[str, Any]) -> str:
    """Each follower's lag behind the owner's log end, as the owner reports it (bytes,
    records, age of the oldest record it lacks; ``0`` when caught up); ``down`` for one it
    has no connection to; ``?`` when the owner did not answer."""
    followers = shard.get("replication")
    if followers is None:
        return "?" if shard["owner"] is not None else "-"
    if not followers:
        return "-"
    return " ".join(f"{peer}={_follower_lag(f)}" + ("" if f.get("connected") else "(down)")
                    for peer, f in sorted(followers.items()))


def _follower_lag(f: dict[str, Any]) -> str:
    size = _number(f.get("lag_bytes"))
    if "lag_records" not in f:  # an owner of an earlier version: bytes only
        return _bytes(int(size))
    age = _number(f.get("lag_age"))
    if f.get("lag_records") is None and size:
        # Behind what the log held when its owner opened it: records unknown, older than.
        return f"{_bytes(size)}/?rec/>{age:.1f}s"
    records = int(_number(f.get("lag_records")))
    if not size and not records:
        return "0"
    return f"{_bytes(int(size))}/{records}rec/{age:.1f}s"


def _number(value: Any) -> float:
    """A figure from a peer's answer; 0 if it is not one (never a traceback)."""
    try:
        number = float(value or 0)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def render(data: dict[str, Any]) -> str:
    """The human table of a ``/api/v1/shards`` answer."""
    replicated = "replicas" in data
    if replicated:
        rows = [(s["shard"], s["assigned"], _owner(s), s["token"],
                 ",".join(s["followers"]) or "-", _in_sync(s), _lag(s))
                for s in data["shards"]]
        text = table(rows, ("SHARD", "ASSIGNED", "OWNER", "TOKEN", "FOLLOWERS", "IN-SYNC",
                            "LAG"))
    else:
        rows = [(s["shard"], s["assigned"], _owner(s), s["token"]) for s in data["shards"]]
        text = table(rows, ("SHARD", "ASSIGNED", "OWNER", "TOKEN"))
    text += f"\n{data['total'] - data['unowned']} of {data['total']} shards owned"
    if replicated:
        states = [s.get("state") for s in data["shards"]]
        text += (f"; replicas {data['replicas']}, min_insync {data['min_insync']}: "
                 f"{states.count('under_replicated')} under-replicated, "
                 f"{states.count('read_only')} read-only")
        for peer in data.get("unreachable") or ():
            text += f"\n{peer['node']}: no answer ({peer['error']}): its shards' LAG is ?"
    return text


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/shards")
    return emit(args, data, render(data))


def register(sub: Any) -> None:
    p = sub.add_parser("shards", help="shard assignment, owner and fencing token (with a "
                                      "replicated spool: followers, in-sync set, lag)")
    p.set_defaults(func=run)
