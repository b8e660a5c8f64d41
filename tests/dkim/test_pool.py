"""DKIM signing in child processes (mta.dkim.pool): real processes fed over pipes. Their
signatures verify (dkimpy over the loopback DNS server), their refusals come back as the
in-process signer's would, a process killed mid-batch fails only what it owed and is
replaced, a stop lets it finish first, and a SIGKILLed node leaves none behind."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dns import DNSServer
from harness.poll import wait_until, wait_until_sync
from mta.config import ConfigError, load_config
from mta.dkim.keys import SigningKey
from mta.dkim.signer import Unsignable, signing_processes
from tests.support.dkim import dkim_zone, pooled, signatures_verify
from tests.support.procs import alive

HEAD = (b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\n"
        b"Subject: Hello %d\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n")


@pytest.fixture(scope="module")
def dns(keys: dict[str, SigningKey]) -> Iterator[DNSServer]:
    server = DNSServer(dkim_zone("example.org", *keys.values()))
    yield server
    server.close()


def message(n: int, body: bytes = b"body %d\r\n") -> bytes:
    return HEAD % n + b"\r\n" + (body % n if b"%d" in body else body)


async def test_signatures_from_the_processes_verify(keys: dict[str, SigningKey],
                                                    dns: DNSServer) -> None:
    signer = pooled(keys, 2)
    try:
        bodies = [message(n) for n in range(40)]
        # Bare LF line ends come back made CRLF, as the in-process signer makes them.
        bodies.append(b"From: alice@example.org\nSubject: lf\n\nbare\nline ends\n")
        results = await asyncio.gather(*(signer.sign_async(b) for b in bodies))
        assert signer._pool is not None and len(signer._pool.pids) == 2
        for n, (body, result) in enumerate(zip(bodies, results, strict=True)):
            assert signatures_verify(result, dns) == [True, True], n
            assert result.endswith(body.replace(b"\n", b"\r\n") if n == 40 else body), n
        # Mail From: a domain without a key comes back as it went, unsigned.
        other = b"From: x@elsewhere.example\r\n\r\nhi\r\n"
        assert await signer.sign_async(other) == other
    finally:
        await signer.aclose()


async def test_refusals_come_back_from_the_process(keys: dict[str, SigningKey]) -> None:
    signer = pooled(keys, 1, required=True)
    try:
        with pytest.raises(Unsignable, match="no DKIM key for the From: domain") as info:
            await signer.sign_async(b"From: x@elsewhere.example\r\n\r\nhi\r\n")
        assert info.value.permanent
        with pytest.raises(Unsignable, match="no single From: domain") as info:
            await signer.sign_async(b"Subject: no from\r\n\r\nhi\r\n")
        assert info.value.permanent
    finally:
        await signer.aclose()


async def test_a_killed_process_fails_what_it_owed_and_is_replaced(
        keys: dict[str, SigningKey], dns: DNSServer) -> None:
    signer = pooled(keys, 1)
    try:
        await signer.start()
        assert signer._pool is not None
        [pid] = signer._pool.pids
        os.kill(pid, signal.SIGSTOP)  # what it is sent now stays in flight
        owed = [asyncio.ensure_future(signer.sign_async(message(n))) for n in range(5)]
        await wait_until(lambda: signer._pool is not None and signer._pool._children
                         and signer._pool._children[0].waiting, 10, "messages in flight")
        os.kill(pid, signal.SIGKILL)
        for result in await asyncio.gather(*owed, return_exceptions=True):
            assert isinstance(result, Unsignable), result
            assert not result.permanent and f"pid {pid}) exited" in str(result)
        await wait_until(lambda: signer._pool is not None and len(signer._pool.pids) == 1,
                         10, "a new signing process")
        assert signer._pool.pids != [pid]
        assert signatures_verify(await signer.sign_async(message(9)), dns) == [True, True]
    finally:
        await signer.aclose()


async def test_a_stop_lets_the_process_finish_what_it_was_sent(
        keys: dict[str, SigningKey], dns: DNSServer) -> None:
    signer = pooled(keys, 1)
    await signer.start()
    assert signer._pool is not None
    [pid] = signer._pool.pids
    os.kill(pid, signal.SIGSTOP)
    owed = [asyncio.ensure_future(signer.sign_async(message(n))) for n in range(5)]
    await wait_until(lambda: signer._pool is not None and signer._pool._children
                     and signer._pool._children[0].waiting, 10, "messages in flight")
    closing = asyncio.ensure_future(signer.aclose())
    await asyncio.sleep(0)
    with pytest.raises(Unsignable, match="stopping"):
        await signer.sign_async(message(6))  # nothing new once the stop began
    assert not closing.done()
    os.kill(pid, signal.SIGCONT)
    for result in await asyncio.gather(*owed):
        assert signatures_verify(result, dns) == [True, True]
    await asyncio.wait_for(closing, 30)
    assert not alive(pid)


def test_a_sigkilled_node_leaves_no_signing_process(tmp_path: Path,
                                                    keys: dict[str, SigningKey]) -> None:
    # The process reads EOF on its stdin when the node is gone, however it went.
    script = textwrap.dedent(f"""
        import asyncio, sys
        from mta.dkim.keys import load_key
        from mta.dkim.signer import DomainKeys, Signer
        async def main():
            key = load_key({keys["rsa"].path!r}, "r", "rsa-sha256")
            signer = Signer({{"example.org": DomainKeys((key,))}}, processes=2)
            await signer.start()
            print(*signer._pool.pids, flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            cwd=Path(__file__).parents[2])
    try:
        assert node.stdout is not None
        pids = [int(p) for p in node.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        node.kill()
        node.wait()
    wait_until_sync(lambda: not any(alive(p) for p in pids), 15,
                    "the signing processes to end with their node")


def test_the_processes_setting(tmp_path: Path) -> None:
    assert signing_processes(3) == 3
    assert signing_processes(0) == 0
    assert 1 <= signing_processes("auto") <= 4
    config = tmp_path / "node.toml"
    config.write_text('[dkim]\nprocesses = -1\n')
    with pytest.raises(ConfigError, match=r"processes.*auto.*0 to 64") as info:
        load_config(str(config))
    assert str(config) in str(info.value)
    config.write_text('[dkim]\nprocesses = "many"\n')
    with pytest.raises(ConfigError, match="processes"):
        load_config(str(config))
    config.write_text('[dkim]\nprocesses = 0\n')
    assert load_config(str(config)).dkim.processes == 0
