"""A signing process (``python -m mta.dkim.child``): the node writes it the signer's spec,
then ``[seq, message]`` requests, on its stdin (msgpack). It writes ``READY`` once it has
built its signer, then answers each request on stdout with ``[seq, signatures, whole]``
(``whole``: the message with its line endings made CRLF, None when they were CRLF already)
or ``[seq, None, detail, permanent]``. It ends when its stdin does: the node closed it, or
the node died."""

from __future__ import annotations

import os
import signal
import sys

import msgpack

from mta.dkim.errors import Unsignable
from mta.dkim.pool import MAX_FRAME, PROTOCOL, READY
from mta.dkim.signer import Signer

__all__ = ["main"]

_BATCH = 16


def _answer(signer: Signer, seq: int, message: bytes) -> bytes:
    try:
        signatures, whole = signer.signatures(message)
    except Unsignable as exc:
        return msgpack.packb([seq, None, str(exc), exc.permanent])
    except Exception as exc:  # a key the crypto library refuses, or a bug: that message's
        return msgpack.packb([seq, None, f"signing failed: {type(exc).__name__}: {exc}",
                              False])
    return msgpack.packb([seq, signatures, None if whole is message else whole])


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def main() -> int:
    """Serve the node on stdin/stdout until stdin ends; 2 on a spec it cannot use."""
    # The node stops it by closing its stdin once the last message it sent is answered: a
    # Ctrl-C or a SIGTERM meant for the service must not cut signatures the node awaits.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Nothing of the node's but the pipes: uvloop's subprocesses keep the descriptors the
    # node has as inheritable (asyncio's close them), e.g. ones it inherited itself.
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME)
    signer: Signer | None = None
    answers: list[bytes] = []
    while data := os.read(0, 1 << 20):
        unpacker.feed(data)
        for item in unpacker:
            if signer is None:
                if not isinstance(item, dict) or item.get("protocol") != PROTOCOL:
                    # An upgrade replaced the code under a running node: only a restart of
                    # the node brings the two back together.
                    theirs = item.get("protocol") if isinstance(item, dict) else None
                    print(f"mta.dkim.child: the node speaks protocol {theirs!r}, this code "
                          f"{PROTOCOL}: restart the node after an upgrade", file=sys.stderr)
                    return 2
                try:
                    signer = Signer.from_spec(item)
                except Exception as exc:  # the node checked these keys: not expected
                    print(f"mta.dkim.child: cannot use the signer spec: {exc}", file=sys.stderr)
                    return 2
                _write_all(READY)
                continue
            seq, message = item
            answers.append(_answer(signer, seq, message))
            if len(answers) >= _BATCH:
                _write_all(b"".join(answers))
                answers.clear()
        # What one read brought is answered in one write (the node sends a batch per turn
        # of its loop), a long one every _BATCH answers so the first are not held back.
        if answers:
            _write_all(b"".join(answers))
            answers.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
