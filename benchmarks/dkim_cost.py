"""What DKIM signing one benchmark message costs on its own (issue 17): the measured tree's
signer on this process's one thread, no event loop, no other thread, split into the RSA
private-key operation, the relaxed body canonicalisation and the rest. A scenario measuring
``mta-dkim`` keeps it in its result, so the node's extra CPU per signed message can be read
against what the signing itself takes."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.loadgen import LINE, message, size_sampler
from benchmarks.targets import DKIM_DOMAIN, DKIM_SELECTOR, dkim_key

__all__ = ["dkim_cost_line", "signing_breakdown"]

# What the node puts before the client's header section (prepare_content): its Received:.
RECEIVED = (b"Received: from bench.example ([127.0.0.1]) by bench.example (mta) with ESMTP "
            b"id 0123456789abcdef for <sink@example.org>; Mon, 23 Nov 2026 10:00:00 +0000\r\n")


def _cpu_us(fn: Callable[[bytes], Any], items: list[bytes]) -> float:
    for item in items[:20]:  # warm caches and the key's blinding state
        fn(item)
    t0 = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - t0) / len(items) * 1e6


def signing_breakdown(messages: int = 400, size: str = "5") -> dict[str, Any]:
    """CPU microseconds per message: ``sign_us`` (Signer.sign, all of it), ``rsa_us`` (the
    private-key operation alone), ``body_canon_us`` (relaxed_body of the body), ``other_us``
    (the rest: header parsing and canonicalisation, h=, base64, folding, the CRLF check).
    Empty, with ``error``, when the measured tree's signer API is not the one known here."""
    work = Path(tempfile.mkdtemp(prefix="dkim-cost-"))
    try:
        from mta.config import DkimConfig
        from mta.dkim.canon import relaxed_body, split_message
        from mta.dkim.keys import load_key
        from mta.dkim.signer import DomainKeys, Signer

        key = load_key(str(dkim_key(work)), DKIM_SELECTOR, "rsa-sha256")
        cfg = DkimConfig()
        signer = Signer({DKIM_DOMAIN: DomainKeys((key,), "")}, headers=cfg.headers,
                        oversign=cfg.oversign, expire=0.0, required=True)
        import random

        sizes = size_sampler(size)
        rng = random.Random(17)
        filler = LINE * (600 * 1024 // len(LINE))
        items = [RECEIVED + message(f"cost{i:06d}", sizes(rng), filler)
                 for i in range(messages)]
        bodies = [split_message(m)[1] for m in items]
        heads = [m[:m.find(b"\r\n\r\n")] for m in items]  # as much data as the RSA input
        if not signer.sign(items[0]).startswith(b"DKIM-Signature:"):
            return {"error": "the signer did not sign the benchmark message"}
        sign = _cpu_us(signer.sign, items)
        rsa = _cpu_us(key.sign, heads)
        body = _cpu_us(relaxed_body, bodies)
    except (ImportError, TypeError, AttributeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"messages": messages, "size": size, "sign_us": sign, "rsa_us": rsa,
            "body_canon_us": body, "other_us": max(0.0, sign - rsa - body)}


def dkim_cost_line(cost: dict[str, Any]) -> str:
    """One line for people: the breakdown, or why there is none."""
    if "error" in cost:
        return f"DKIM signing cost alone: not measured ({cost['error']})"
    return (f"DKIM signing cost alone (one thread, {cost['messages']} x {cost['size']} KB): "
            f"{cost['sign_us']:.0f} us CPU per message: RSA-2048 {cost['rsa_us']:.0f}, relaxed "
            f"body {cost['body_canon_us']:.0f}, the rest {cost['other_us']:.0f}")
