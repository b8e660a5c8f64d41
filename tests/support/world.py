"""A small mail world on loopback for delivery tests: a real DNS server, scripted remote
SMTP servers (sinks) on several loopback addresses, and one in-process node."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib

from harness.dns import DNSServer
from harness.mail import message
from harness.net import free_port_on
from harness.poll import wait_until
from harness.sink import Sink, SinkScript
from tests.support.spool import read_accounting

if TYPE_CHECKING:
    from mta.node import Node


# Hosts the delivery tests' sinks stand on (one port free on all of them).
SINK_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


class World:
    """DNS + sinks + one node, built per test."""

    def __init__(self, start_node: Callable[..., Any], tmp_path: Path) -> None:
        self._start_node = start_node
        self.tmp_path = tmp_path
        self.port = free_port_on(*SINK_HOSTS)
        self.sinks: list[Sink] = []
        self.dns: DNSServer | None = None
        self.node: Node | None = None

    def sink(self, host: str, script: SinkScript | None = None, start: bool = True,
             **kw: Any) -> Sink:
        sink = Sink(host, self.port, script, **kw)
        if start:
            sink.start()
        self.sinks.append(sink)
        return sink

    def zone(self, zone: dict[str, Any], **dns: Any) -> DNSServer:
        """Serve ``zone`` (``dns``: DNSServer's ``ttl``, ``negative_ttl``)."""
        # The sender's domain always has a mailbox host, for DSNs.
        zone = {"sender.test": {"MX": [(10, "mx.sender.test")]},
                "mx.sender.test": {"A": ["127.0.0.5"]}, **zone}
        self.dns = DNSServer(zone, **dns)
        return self.dns

    async def start(self, sections: dict[str, dict[str, Any]] | None = None,
                    **delivery: Any) -> Node:
        """The node, delivering through the zone; ``sections``: more config sections."""
        assert self.dns is not None
        d = {"enabled": True, "nameservers": [f"127.0.0.1:{self.dns.port}"],
             "mx_port": self.port, "retry_initial": "200ms", "retry_max": "1s",
             "connect_timeout": "2s", "command_timeout": "5s", "idle_timeout": "1s",
             "accounting_log": str(self.tmp_path / "acct.jsonl"), **delivery}
        self.node = await self._start_node(delivery=d, **(sections or {}))
        return self.node

    async def submit(self, rcpts: list[str], body: bytes | None = None,
                     sender: str = "app@sender.test", n: int = 0,
                     mail_options: list[str] | None = None) -> str:
        assert self.node is not None and self.node.ingress is not None
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.node.ingress.port)
        await smtp.connect()
        _, reply = await smtp.sendmail(sender, rcpts, body or message(n, 1500),
                                       mail_options=mail_options or [])
        await smtp.quit()
        return reply.rsplit(" ", 1)[1]

    def accounting(self) -> list[dict[str, Any]]:
        return read_accounting(self.tmp_path / "acct.jsonl")

    async def wait_records(self, kind: str, count: int, timeout: float = 10.0
                           ) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            return [r for r in self.accounting() if r["type"] == kind]

        await wait_until(lambda: len(found()) >= count, timeout, f"{count} {kind} records")
        return found()

    def delivered(self) -> int:
        """Recipients the sinks have received."""
        return sum(len(m.recipients) for s in self.sinks for m in s.messages)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.stop()
            except (AssertionError, RuntimeError):
                pass
        if self.dns is not None:
            self.dns.close()
