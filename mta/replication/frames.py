"""Framing of the replication peer channel, and the channel's exceptions.

One frame on the wire::

    +------+----------+----------+----------------+-----------------+---------------+
    | 0xA1 | u32 hlen | u32 plen | header (hlen)  | payload (plen)  | mac (32 or 0) |
    +------+----------+----------+----------------+-----------------+---------------+

- ``0xA1`` is the magic and version byte in one (a later wire version takes another value);
  it is neither ASCII nor a TLS record type, so a stray HTTP, SMTP or TLS client is told
  apart at the first byte.
- The header is a msgpack map with ``str`` keys (the protocol layer's fields), the payload
  raw bytes (a batch of spool records, up to MBs) that are never re-encoded.
- Both lengths are checked against hard caps (:data:`MAX_HEADER`, the receiver's
  ``max_payload``) as soon as the 9-byte prefix is in, *before* the body is buffered, so a
  hostile or corrupt peer cannot make the receiver allocate more than the caps.
- ``mac`` is present only on connections authenticated with the shared secret: HMAC-SHA256
  (per-connection key, see :mod:`mta.replication.peerauth`) over ``direction label || u64
  sequence number || prefix || header || payload``. The sequence number is implicit (each
  side counts the frames it sends and receives) so a replayed, dropped, reordered or
  injected frame, or one moved between connections or directions, fails the check.

This module does no I/O: :class:`Encoder` turns a frame into buffers to write,
:class:`Decoder` takes frames off the front of a receive buffer.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from typing import Any

import msgpack

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MAC_LEN",
    "MAGIC",
    "MAX_HEADER",
    "PREFIX",
    "AuthError",
    "ConnectionClosed",
    "Decoder",
    "Encoder",
    "FrameError",
    "FrameMac",
    "Header",
    "ReplicationError",
    "decode_header",
    "encode_header",
]

PREFIX = struct.Struct("!BII")  # magic/version, header length, payload length
MAGIC = 0xA1
MAX_HEADER = 64 * 1024
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAC_LEN = hashlib.sha256().digest_size
# Below this payload size one joined buffer (one small copy) beats a write() per piece; above
# it the payload goes to the transport as it is, which sends it without copying when the
# socket has room.
_JOIN_BELOW = 64 * 1024

Header = dict[str, Any]


class ReplicationError(Exception):
    """Base class of the replication channel's errors."""


class FrameError(ReplicationError):
    """A frame breaks the format: bad magic/version, a length over its cap, an undecodable
    header or one that is not a map with str keys. The connection is closed."""


class AuthError(ReplicationError):
    """Authentication failed: a refused handshake (wrong secret, certificate or node id) or a
    frame whose MAC does not verify. The connection is closed."""


class ConnectionClosed(ReplicationError):
    """The connection is closed, was reset, or could not be established in time."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"header holds a msgpack extension type {code}")


def encode_header(header: Mapping[str, Any]) -> bytes:
    """The msgpack encoding of ``header``; :class:`FrameError` if it cannot be one."""
    if not isinstance(header, Mapping) or not all(isinstance(k, str) for k in header):
        raise FrameError("a header is a mapping with str keys")
    try:
        data: bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError(f"header cannot be encoded: {exc}") from exc
    if len(data) > MAX_HEADER:
        raise FrameError(f"header of {len(data)} bytes is over the cap of {MAX_HEADER}")
    return data


def decode_header(data: bytes | memoryview) -> Header:
    """The header map encoded in ``data``; :class:`FrameError` if it is not one."""
    try:
        obj = msgpack.unpackb(data, raw=False, ext_hook=_refuse_ext, strict_map_key=True)
    except FrameError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # msgpack's own errors (ExtraData, FormatError, StackError...) are ValueErrors.
        raise FrameError(f"undecodable header: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise FrameError(f"header is a {type(obj).__name__}, not a map with str keys")
    return obj


class FrameMac:
    """The MAC of one direction of one connection: HMAC-SHA256 under the connection's key
    over ``label || u64 seq || frame``, ``seq`` counting the frames of this direction."""

    def __init__(self, key: bytes, label: bytes) -> None:
        # Keyed once; copy() per frame skips re-deriving the inner and outer pads.
        self._base = hmac.new(key, label, "sha256")
        self.seq = 0

    def tag(self, *parts: bytes | memoryview) -> bytes:
        """The MAC of the next frame (made of ``parts``); advances the sequence number."""
        mac = self._base.copy()
        mac.update(self.seq.to_bytes(8, "big"))
        for part in parts:
            mac.update(part)
        self.seq += 1
        return mac.digest()


class Encoder:
    """Turns frames into buffers for the transport; checks them against the peer's caps."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, mac: FrameMac | None = None,
                 max_header: int = MAX_HEADER) -> None:
        self.max_payload = max_payload
        self.max_header = max_header
        self.mac = mac

    def encode(self, header: Mapping[str, Any],
               payload: bytes | bytearray | memoryview = b"") -> list[bytes | memoryview]:
        """The buffers to write, in order: one joined buffer for a small frame, the payload
        uncopied for a large one. :class:`FrameError` if the frame breaks a cap."""
        head = encode_header(header)
        if len(head) > self.max_header:
            raise FrameError(f"header of {len(head)} bytes is over the cap of "
                             f"{self.max_header}")
        body = payload if isinstance(payload, bytes) else memoryview(payload).cast("B")
        size = len(body)
        if size > self.max_payload:
            raise FrameError(f"payload of {size} bytes is over the peer's cap of "
                             f"{self.max_payload}")
        head = PREFIX.pack(MAGIC, len(head), size) + head
        # The MAC is computed last: a frame refused above must not consume a sequence number.
        tag = self.mac.tag(head, body) if self.mac is not None else b""
        if size < _JOIN_BELOW:
            return [b"".join((head, body, tag))]
        return [head, body, tag] if tag else [head, body]


class Decoder:
    """Takes frames off the front of a receive buffer, checking caps, MAC and header."""

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, mac: FrameMac | None = None,
                 max_header: int = MAX_HEADER) -> None:
        self.max_payload = max_payload
        self.max_header = max_header
        self.mac = mac
        self.need = PREFIX.size  # bytes the buffer must hold for next() to make progress

    def next(self, buf: bytearray) -> tuple[Header, bytes] | None:
        """The first frame in ``buf``, removed from it; ``None`` (and :attr:`need` set) if
        the frame is not complete yet. Raises :class:`FrameError` or :class:`AuthError`."""
        if len(buf) < PREFIX.size:
            self.need = PREFIX.size
            return None
        magic, hlen, plen = PREFIX.unpack_from(buf)
        if magic != MAGIC:
            raise FrameError(f"bad magic/version byte 0x{magic:02x}: not a replication peer "
                             "or a corrupt stream")
        # The caps are checked on the prefix alone, before any of the body is waited for.
        if hlen > self.max_header:
            raise FrameError(f"header length {hlen} is over the cap of {self.max_header}")
        if plen > self.max_payload:
            raise FrameError(f"payload length {plen} is over the cap of {self.max_payload}")
        end = PREFIX.size + hlen + plen
        total = end + (MAC_LEN if self.mac is not None else 0)
        if len(buf) < total:
            self.need = total
            return None
        with memoryview(buf) as view:
            if self.mac is not None:
                expected = self.mac.tag(view[:end])
                if not hmac.compare_digest(expected, view[end:total]):
                    raise AuthError(f"frame {self.mac.seq - 1} fails its MAC: altered, "
                                    "replayed, reordered or injected")
            header = decode_header(view[PREFIX.size:PREFIX.size + hlen])
            payload = bytes(view[PREFIX.size + hlen:end])
        del buf[:total]
        self.need = PREFIX.size
        return header, payload
