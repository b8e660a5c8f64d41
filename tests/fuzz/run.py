"""Running the plan: every session against one node, CONCURRENCY at a time, sampling RSS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
import traceback
from typing import Any

from mta.config import SmtpConfig
from tests.fuzz.client import Conn
from tests.fuzz.kinds import KINDS
from tests.fuzz.model import Session, SessionOver
from tests.fuzz.settings import (
    CONCURRENCY,
    HEAVY_CONCURRENCY,
    HEAVY_KINDS,
    MAX_RCPTS,
    ONLY,
    PLAN,
    SEED,
    TIMEOUT,
)
from tests.support import rss_kb

# --- running the plan ------------------------------------------------------------------------


def make_plan() -> list[tuple[int, str]]:
    rng = random.Random(SEED)
    first = ["slow"] * PLAN["slow"] + ["repro"] * PLAN["repro"]
    rest = [k for k, n in PLAN.items() if k not in ("slow", "repro") for _ in range(n)]
    rng.shuffle(rest)
    plan = list(enumerate(first + rest))
    return [(sid, kind) for sid, kind in plan if not ONLY or sid in ONLY]


async def run_session(port: int, sid: int, kind: str) -> Session:
    s = Session(sid, kind)
    rng = random.Random(f"{SEED}/{sid}")
    c = Conn(port, s, rng)
    try:
        await c.open()
        await KINDS[kind](c, rng)
    except SessionOver:
        pass
    except Exception:
        c.note("client", traceback.format_exc(limit=4))
    finally:
        if c.writer is not None and not c.closed:
            await c.close("fin")
        s.lasted = time.monotonic() - c.t0 if c.t0 else 0.0
    return s


async def run_plan(port: int, pid: int, plan: list[tuple[int, str]]) -> tuple[list[Session], int]:
    sem = asyncio.Semaphore(CONCURRENCY)
    heavy = asyncio.Semaphore(HEAVY_CONCURRENCY)
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, rss_kb(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.5)

    async def one(sid: int, kind: str) -> Session:
        async with sem:
            if kind in HEAVY_KINDS:
                async with heavy:
                    return await run_session(port, sid, kind)
            return await run_session(port, sid, kind)

    sampler = asyncio.create_task(sample())
    sessions = await asyncio.gather(*(one(sid, kind) for sid, kind in plan))
    done.set()
    await sampler
    return list(sessions), peak


# --- the run -----------------------------------------------------------------------------------


FINAL = (b"From: <final@example.com>\r\nTo: <r@example.org>\r\nSubject: after the fuzz\r\n"
         b"Message-ID: <final@fuzz.example>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
         b"\r\nThe node still takes mail.\r\n")


def node_smtp_options(users_file: str, tls_files: tuple[str, str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "max_connections": 4000, "max_connections_per_ip": 4000,
        "command_timeout": f"{TIMEOUT:g}s", "data_timeout": f"{TIMEOUT:g}s",
        "max_message_size": "8M", "max_recipients": MAX_RCPTS,
        "users_file": users_file, "tls_cert": tls_files[0], "tls_key": tls_files[1],
    }
    # Password guessing defences (when this node has them) would lock 127.0.0.1 out of AUTH
    # after a few of the fuzzer's wrong passwords; AUTH parsing is what is fuzzed here.
    known = {f.name for f in dataclasses.fields(SmtpConfig)}
    for key, value in {"auth_max_failures": 1_000_000, "auth_failure_delay": "1ms"}.items():
        if key in known:
            opts[key] = value
    return opts
