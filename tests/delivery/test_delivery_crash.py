"""kill -9 between deliveries: the restarted node resumes and sends nothing twice."""

from __future__ import annotations

import json
import smtplib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    DNSServer,
    NodeProcess,
    Sink,
    SinkScript,
    free_port_on,
    message,
    node_config,
    wait_until,
)


def _deliveries(acct: Path) -> list[dict[str, Any]]:
    text = acct.read_text() if acct.exists() else ""
    complete = text[:text.rfind("\n") + 1].splitlines()  # a line may be half written yet
    return [r for r in map(json.loads, complete) if r["type"] == "Delivery"]


def _live(node: NodeProcess) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin_port}/api/v1/status",
                                 headers={"Authorization": "Bearer t0ken"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.loads(resp.read())["live_messages"])


@pytest.mark.asyncio(loop_factories=["asyncio"])  # the node's loop is what varies here
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_sigkill_between_deliveries_never_resends_an_accepted_recipient(
        tmp_path: Path, loop: str) -> None:
    port = free_port_on("127.0.0.2", "127.0.0.3")
    dns_server = DNSServer({
        "fast.test": {"MX": [(10, "mx.fast.test")]}, "mx.fast.test": {"A": ["127.0.0.2"]},
        "slow.test": {"MX": [(10, "mx.slow.test")]}, "mx.slow.test": {"A": ["127.0.0.3"]},
    })
    fast = Sink("127.0.0.2", port)
    slow = Sink("127.0.0.3", port, SinkScript(data_delay=30))  # holds the DATA reply
    fast.start()
    slow.start()
    acct = tmp_path / "acct.jsonl"
    raw = node_config(tmp_path / "spool", node={"loop": loop}, delivery={
        "enabled": True, "nameservers": [f"127.0.0.1:{dns_server.port}"], "mx_port": port,
        "retry_initial": "200ms", "retry_max": "1s", "accounting_log": str(acct),
        "command_timeout": "60s"})
    node = NodeProcess(tmp_path, raw).start()
    try:
        body = message(1, 3000)
        multi = smtplib.SMTP("127.0.0.1", node.smtp_port)
        multi.sendmail("app@sender.test", ["one@fast.test", "two@slow.test"], body)
        singles = [message(10 + n, 1000) for n in range(10)]
        for n, single in enumerate(singles):
            multi.sendmail("app@sender.test", [f"r{n}@fast.test"], single)
        multi.quit()
        await fast.wait_for(11)
        await wait_until(lambda: slow.active >= 1, what="slow delivery in flight")
        # The fast domain's 11 outcomes are in the spool: each accounting line is written
        # after the spool records of its group commit (and a SIGKILL keeps written data).
        await wait_until(lambda: len(_deliveries(acct)) == 11, what="fast outcomes recorded")
        node.kill()  # SIGKILL with two@slow.test in the middle of DATA
        slow.script.data_delay = 0
        node = NodeProcess(tmp_path, raw).start()
        got = await slow.wait_for(1, timeout=15)
        assert got[0].recipients == ["two@slow.test"]
        # Nothing is left to send: any wrong re-send would have come before this.
        await wait_until(lambda: _live(node) == 0, what="the restarted node's queue empty")
        fast_rcpts = [r for m in fast.messages for r in m.recipients]
        assert sorted(fast_rcpts) == sorted(["one@fast.test"] + [f"r{n}@fast.test"
                                                                 for n in range(10)])
        assert len(slow.messages) == 1
        deliveries = _deliveries(acct)
        assert sorted(r["recipient"] for r in deliveries) == sorted([*fast_rcpts,
                                                                     "two@slow.test"])
    finally:
        node.kill()
        fast.stop()
        slow.stop()
        dns_server.close()
