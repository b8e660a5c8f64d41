"""The replication protocol's frames: what each header carries, built and checked in one place.

Owner to follower: ``hello`` (I own shard ``s`` under token ``t``), ``start`` (catch-up plan
``n``: cut your copy to ``x``, then appends follow), ``append`` (bytes at ``q``/``o``, after
``p``), ``ping`` (are you there; answer with your durable position), ``drop`` (compaction
deleted these head segments). Follower to owner: ``status`` (my copy ``c`` and its segments
``g``), ``ack`` (durable up to ``q``/``o`` under plan ``n``), ``nack`` (refused, reason
``r``). Every frame names its shard and the owner's token; a peer that sends a malformed
header is a bug or an attack, and the connection is dropped (:class:`BadMessage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mta.replication.frames import ReplicationError
from mta.replication.insync import Position, SegmentInfo

__all__ = [
    "ACK",
    "APPEND",
    "DROP",
    "HELLO",
    "NACK",
    "PING",
    "START",
    "STATUS",
    "BadMessage",
    "Msg",
    "parse",
]

HELLO, START, APPEND, PING, DROP = "hello", "start", "append", "ping", "drop"
STATUS, ACK, NACK = "status", "ack", "nack"
_KINDS = {HELLO, START, APPEND, PING, DROP, STATUS, ACK, NACK}


class BadMessage(ReplicationError):
    """A header that is not a well-formed protocol message."""


@dataclass(frozen=True, slots=True)
class Msg:
    """One parsed frame header; fields a kind does not use keep their defaults."""

    kind: str
    shard: int
    token: int
    stream: int = 0
    position: Position | None = None  # append: where; ack: durable end; nack: copy end
    prev: Position | None = None  # append: the owner's end before this frame
    cut: Position | None = None  # start: cut the copy back to this first
    copy_id: str = ""
    segments: tuple[SegmentInfo, ...] = ()
    seqs: tuple[int, ...] = ()
    reason: str = ""
    newest: int = 0  # nack stale: the newest token the follower has seen


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadMessage(f"{what}: expected a non-negative integer, got {value!r}")
    return value


_MAX_SEQ = 10**8 - 1  # segment file names have 8 digits


def _pos(value: Any, what: str) -> Position | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise BadMessage(f"{what}: expected [seq, offset], got {value!r}")
    seq = _int(value[0], what)
    if seq > _MAX_SEQ:
        raise BadMessage(f"{what}: segment {seq} is beyond the 8-digit segment names")
    return (seq, _int(value[1], what))


def _segments(value: Any) -> tuple[SegmentInfo, ...]:
    if not isinstance(value, list | tuple):
        raise BadMessage(f"segments: expected a list, got {type(value).__name__}")
    out = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 3:
            raise BadMessage(f"segment: expected [seq, token, size], got {item!r}")
        seq, token, size = item
        # -1: a header the follower could not read; it never matches an owner's token.
        token_v = -1 if token == -1 else _int(token, "segment token")
        out.append(SegmentInfo(_int(seq, "segment seq"), token_v, _int(size, "segment size")))
    return tuple(out)


def parse(header: Mapping[str, Any]) -> Msg:
    """The message in ``header``; :class:`BadMessage` if it is not one."""
    kind = header.get("k")
    if kind not in _KINDS:
        raise BadMessage(f"unknown message kind {kind!r}")
    shard = _int(header.get("s"), "shard")
    token = _int(header.get("t"), "token")
    copy_id = header.get("c", "")
    reason = header.get("r", "")
    if not isinstance(copy_id, str) or not isinstance(reason, str):
        raise BadMessage("copy id and reason must be strings")
    seqs = header.get("d", ())
    if not isinstance(seqs, list | tuple):
        raise BadMessage("drop: expected a list of segment numbers")
    return Msg(kind, shard, token,
               stream=_int(header.get("n", 0), "stream"),
               position=_pos(header.get("q"), "position"),
               prev=_pos(header.get("p"), "prev"),
               cut=_pos(header.get("x"), "cut"),
               copy_id=copy_id,
               segments=_segments(header.get("g", ())),
               seqs=tuple(_int(s, "segment") for s in seqs),
               reason=reason,
               newest=_int(header.get("w", 0), "newest token"))


def hello(shard: int, token: int) -> dict[str, Any]:
    return {"k": HELLO, "s": shard, "t": token}


def start(shard: int, token: int, stream: int, cut: Position | None) -> dict[str, Any]:
    return {"k": START, "s": shard, "t": token, "n": stream,
            "x": None if cut is None else list(cut)}


def append(shard: int, token: int, at: Position, prev: Position) -> dict[str, Any]:
    return {"k": APPEND, "s": shard, "t": token, "q": list(at), "p": list(prev)}


def ping(shard: int, token: int) -> dict[str, Any]:
    return {"k": PING, "s": shard, "t": token}


def drop(shard: int, token: int, seqs: list[int]) -> dict[str, Any]:
    return {"k": DROP, "s": shard, "t": token, "d": seqs}


def status(shard: int, token: int, copy_id: str,
           segments: list[tuple[int, int, int]]) -> dict[str, Any]:
    return {"k": STATUS, "s": shard, "t": token, "c": copy_id,
            "g": [list(s) for s in segments]}


def ack(shard: int, token: int, stream: int, durable: Position) -> dict[str, Any]:
    return {"k": ACK, "s": shard, "t": token, "n": stream, "q": list(durable)}


def nack(shard: int, token: int, stream: int, reason: str, *, newest: int = 0,
         position: Position | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"k": NACK, "s": shard, "t": token, "n": stream, "r": reason,
                           "w": newest}
    if position is not None:
        out["q"] = list(position)
    return out
