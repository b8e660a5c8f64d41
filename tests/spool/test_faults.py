"""Real disk limits: EFBIG from RLIMIT_FSIZE, ENOSPC from a tiny tmpfs. 452, then recovery."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import smtplib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.support import NodeProcess, message, node_config, read_spool


def _send(port: int, n: int, size: int) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c.example")
        s.mail("a@example.com")
        s.rcpt("b@example.org")
        code, reply = s.data(message(n, size))
        return code, reply.decode()


def test_file_size_limit_gives_452_then_rotation_recovers(tmp_path: Path) -> None:
    limit = 256 * 1024

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    raw = node_config(tmp_path / "spool", spool={"shards": 1, "segment_size": "4M"},
                      node={"log_level": "error"})
    node = NodeProcess(tmp_path, raw, preexec=cap_file_size).start()
    codes: list[int] = []
    acked: dict[str, int] = {}
    try:
        for n in range(120):  # 120 x 8 KB = ~1 MB: crosses the 256 KB limit several times
            code, reply = _send(node.smtp_port, n, 8000)
            codes.append(code)
            if code == 250:
                acked[reply.split()[-1]] = n
            else:
                assert code == 452 and reply.startswith("4.3.1"), reply
    finally:
        node.signal(signal.SIGTERM)
        node.wait()
    assert 452 in codes, "the file size limit was never hit"
    first_fail = codes.index(452)
    assert 250 in codes[first_fail + 1:], "the node never accepted again after EFBIG"
    stored = read_spool(tmp_path / "spool", 1)
    assert set(acked) <= set(stored)
    for mid, n in acked.items():
        assert stored[mid].body.endswith(message(n, 8000))


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the injected-ENOSPC "
                    "test in test_ingress covers the code path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_disk_full_gives_452_and_accepts_again_when_space_returns(
        tmp_path: Path, start_node: Any) -> None:
    with tiny_tmpfs(tmp_path / f"fs-{uuid.uuid4().hex[:6]}", "1m") as fs:
        node = await start_node(spool={"path": str(fs / "spool"), "shards": 2,
                                       "segment_size": "128K"})
        filler = fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        os.truncate(filler, max(0, filler.stat().st_size - 64 * 1024))  # ~64 KB left
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=node.ingress.port)
        await smtp.connect()
        acked, full = [], False
        for n in range(40):
            try:
                _, reply = await smtp.sendmail("a@example.com", ["b@example.org"],
                                               message(n, 6000))
                acked.append((reply.split()[-1], n))
            except aiosmtplib.SMTPDataError as exc:
                assert exc.code == 452 and "4.3.1" in exc.message
                full = True
                break
        assert full, "the disk never filled"
        assert node.metrics.spool_errors.labels("28")._value.get() >= 1  # ENOSPC
        filler.unlink()  # space returns
        _, reply = await smtp.sendmail("a@example.com", ["b@example.org"], message(99, 6000))
        acked.append((reply.split()[-1], 99))
        await smtp.quit()
        await node.stop()
        stored = await asyncio.to_thread(read_spool, fs / "spool", 2)
        for mid, n in acked:
            assert stored[mid].body.endswith(message(n, 6000))
