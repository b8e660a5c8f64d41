"""``mtactl trace`` as an operator runs it: a subprocess against a real node process."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import NodeProcess, ctl, node_config, submit


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("trace")
    proc = NodeProcess(work, node_config(work / "spool")).start()
    yield proc
    proc.kill()


class Trace:
    """``mtactl trace ARGS`` running; its stdout lines read with a deadline."""

    def __init__(self, node: NodeProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mta.cli.ctl", "--url", f"http://127.0.0.1:{node.admin_port}",
             "--token", "t0ken", "trace", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, text: str, timeout: float = 10.0) -> list[str]:
        """Lines up to the first one containing ``text``."""
        out: list[str] = []
        while not out or text not in out[-1]:
            try:
                out.append(self.lines.get(timeout=timeout))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {timeout}s; got {out}; "
                                     f"{self.stop()}") from None
        return out

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        """Send ``sig``; the exit code and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(10)
        finally:
            self.proc.kill()
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def test_readable_lines_until_ctrl_c(node: NodeProcess) -> None:
    trace = Trace(node, "--client", "127.0.0.1/32")
    assert "tracing client=127.0.0.1/32" in trace.until("tracing")[-1]
    mid = submit(node, ["r@example.org"], 1)
    lines = trace.until(" disconnect")
    code, err = trace.stop()
    assert code == 0 and "Traceback" not in err and err == ""
    assert "connect from 127.0.0.1:" in lines[0]
    session = lines[0].split()[2]
    assert all(line.split()[1:3] == ["test-node", session] for line in lines)
    text = "\n".join(lines)
    for expected in ("> ehlo client.test", "< 250 2.1.0", "> rcpt TO:<r@example.org>",
                     f"queued as {mid}", "> QUIT", "< 221"):
        assert expected in text, text
    assert any(line.split(" ", 3)[3].startswith("DATA ") and "bytes, queued as" in line
               for line in lines)


def test_json_lines(node: NodeProcess) -> None:
    trace = Trace(node, "--json", "--local")
    assert json.loads(trace.until("trace_started")[-1])["node"] == "test-node"
    submit(node, ["r@example.org"], 2)
    events: list[Any] = [json.loads(line) for line in trace.until('"disconnect"')]
    assert events[0]["event"] == "connect" and events[-1]["event"] == "disconnect"
    code, err = trace.stop()
    assert code == 0 and err == ""


def test_closed_pipe_ends_quietly(node: NodeProcess) -> None:
    # `mtactl trace | head -1`: the reader leaves; the next lines find a closed pipe.
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mta.cli.ctl", "--url", f"http://127.0.0.1:{node.admin_port}",
         "--token", "t0ken", "trace"], stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    try:
        got = b""
        deadline = time.monotonic() + 10
        while b"\n" not in got:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no first line in 10s: {got!r}"
            chunk = os.read(read_end, 4096)
            assert chunk, "mtactl closed its output"
            got += chunk
        assert b"tracing all sessions" in got
        os.close(read_end)
        submit(node, ["r@example.org"], 3)
        code = proc.wait(10)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert code == 1 and "Traceback" not in err and err == ""


def test_errors_say_what_to_do(node: NodeProcess) -> None:
    res = ctl(node, "trace", "--client", "not-an-address", timeout=30)
    assert res.returncode == 1 and "not an IP address or network" in res.stderr
    res = ctl(node, "trace", "--user", "", timeout=30)
    assert res.returncode == 2 and "--user needs a value" in res.stderr
    res = ctl(node, "trace", token="wrong", timeout=30)
    assert res.returncode == 1 and "token rejected" in res.stderr
