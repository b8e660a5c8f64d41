"""A small mail world on loopback: a real DNS server and scripted remote SMTP servers."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosmtplib
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.helpers import message

if TYPE_CHECKING:
    from mta.node import Node


class DNSServer:
    """Authoritative answers from ``zone`` over real UDP on 127.0.0.1.

    zone: name -> "NXDOMAIN" | "SERVFAIL" | {"MX": [(pref, host)], "A": [ip], "AAAA": [ip]}
    An entry may carry "TTL": seconds for its answers (default ``ttl``). With
    ``negative_ttl`` set, NXDOMAIN and empty answers carry an SOA whose TTL and MINIMUM are
    that (RFC 2308: how long the "no" may be cached); without it, no SOA.
    """

    def __init__(self, zone: dict[str, Any], ttl: int = 60,
                 negative_ttl: int | None = None) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._running = True
        self._thread.start()

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rtype))
        entry = self.zone.get(name)
        if entry is None or entry == "NXDOMAIN":
            resp.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(resp)
        elif entry == "SERVFAIL":
            resp.set_rcode(dns.rcode.SERVFAIL)
        else:
            values = entry.get(rtype, [])
            if values:
                texts = [f"{p} {h}." if h != "." else f"{p} ." for p, h in values] \
                    if rtype == "MX" else list(values)
                resp.answer.append(dns.rrset.from_text_list(
                    q.name, entry.get("TTL", self.ttl), "IN", rtype, texts))
            else:
                self._add_soa(resp)
        return resp

    def _add_soa(self, resp: dns.message.Message) -> None:
        if self.negative_ttl is not None:
            n = self.negative_ttl
            resp.authority.append(dns.rrset.from_text(
                ".", n, "IN", "SOA", f"ns.test. hostmaster.test. 1 3600 600 86400 {n}"))

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while self._running:
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.sock.sendto(self._answer(dns.message.from_wire(data)).to_wire(), addr)
            except Exception:  # a broken query must not kill the test server
                continue

    def close(self) -> None:
        self._running = False
        self.sock.close()
        self._thread.join(2)


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    session: int
    at: float
    tls: bool = False  # the session had negotiated TLS (STARTTLS) before this DATA


@dataclass
class SinkScript:
    """What a scripted remote server answers. ``rcpt`` and ``data`` may be callables taking
    (recipient or recipients, attempt number) so a test can change its mind over time."""

    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_reply: Callable[[list[str], int], str | None] | None = None
    data_delay: float = 0.0
    greeting_reply: str | None = None  # e.g. "421 busy": refuse at connect
    drop_on_data: bool = False


class _CountingSMTP(SMTP):
    def __init__(self, sink: Sink, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._sink = sink
        self.session_no = 0

    def connection_made(self, transport: Any) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            with self._sink.lock:
                self._sink.sessions += 1
                self.session_no = self._sink.sessions
                self._sink.active += 1
                self._sink.max_active = max(self._sink.max_active, self._sink.active)
                self._sink.peers.append(transport.get_extra_info("peername")[0])

    def connection_lost(self, exc: Exception | None) -> None:
        with self._sink.lock:
            self._sink.active -= 1
        super().connection_lost(exc)

    async def _handle_client(self) -> None:
        if self._sink.script.greeting_reply:
            await self.push(self._sink.script.greeting_reply)
            self.transport.close()
            return
        await super()._handle_client()


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self.sink.script.rcpt.get(address.lower())
        if callable(reply):
            reply = reply(address, self.sink.attempts_for(address))
        if reply and not reply.startswith("2"):
            self.sink.refused.append((address, reply))
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        script = self.sink.script
        if script.drop_on_data:
            server.transport.abort()
            return "451 dropped"
        if script.data_delay:
            await asyncio.sleep(script.data_delay)
        if script.data_reply is not None:
            reply = script.data_reply(envelope.rcpt_tos, self.sink.data_count)
            self.sink.data_count += 1
            if reply:
                return reply
        with self.sink.lock:
            self.sink.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                               envelope.original_content, server.session_no,
                                               time.monotonic(), session.ssl is not None))
        return "250 2.0.0 OK queued"


class Sink(Controller):
    """A scripted "remote" SMTP server on ``host``:``port`` running in its own thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 script: SinkScript | None = None, tls_context: Any = None) -> None:
        self.script = script or SinkScript()
        self.messages: list[Received] = []
        self.refused: list[tuple[str, str]] = []
        self.sessions = 0
        self.active = 0
        self.max_active = 0
        self.data_count = 0
        self.peers: list[str] = []
        self.lock = threading.Lock()
        self._tls = tls_context
        self._rcpt_attempts: dict[str, int] = {}
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        super().__init__(_SinkHandler(self), hostname=host, port=port, ready_timeout=10)

    def attempts_for(self, address: str) -> int:
        n = self._rcpt_attempts.get(address, 0)
        self._rcpt_attempts[address] = n + 1
        return n

    def factory(self) -> SMTP:
        return _CountingSMTP(self, self.handler, hostname="sink.test", enable_SMTPUTF8=True,
                             tls_context=self._tls, auth_require_tls=False)

    def start(self) -> None:
        super().start()
        # The controller's own readiness probe is a session too: once it has ended, start
        # counting from zero.
        deadline = time.monotonic() + 10
        while True:
            with self.lock:
                if self.sessions >= 1 and self.active == 0:
                    break
            assert time.monotonic() < deadline, "the sink's readiness probe never ended"
            time.sleep(0.005)
        with self.lock:
            self.sessions = self.max_active = 0
            self.peers.clear()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait (without blocking the event loop the node runs on) for ``count`` messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return list(self.messages)
            await asyncio.sleep(0.02)
        raise AssertionError(f"sink got {len(self.messages)} messages, expected {count}")


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or pred}")


class AnyAddress(dict):  # type: ignore[type-arg]
    """A SinkScript.rcpt that answers every address through one function."""

    def __init__(self, reply: Callable[[str, int], str | None]) -> None:
        super().__init__()
        self._reply = reply

    def get(self, address: str, default: Any = None) -> Any:
        return self._reply


def _greylist(address: str, attempt: int) -> str | None:
    domain = address.lower().rpartition("@")[2]
    if domain == "held.test":
        return "451 4.7.1 Greylisted, come back later"
    if domain == "later.test" and attempt == 0:
        return "451 4.7.1 Try again"
    return None


def greylisting_script() -> SinkScript:
    """Accept everything, except: held.test is deferred for ever, later.test once."""
    return SinkScript(rcpt=AnyAddress(_greylist))


# Hosts the delivery tests' sinks stand on (one port free on all of them).
SINK_HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def free_port_on(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (sinks that stand for several MX hosts)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ok = True
        for host in hosts:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no common free port")


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

    async def start(self, **delivery: Any) -> Node:
        assert self.dns is not None
        d = {"enabled": True, "nameservers": [f"127.0.0.1:{self.dns.port}"],
             "mx_port": self.port, "retry_initial": "200ms", "retry_max": "1s",
             "connect_timeout": "2s", "command_timeout": "5s", "idle_timeout": "1s",
             "accounting_log": str(self.tmp_path / "acct.jsonl"), **delivery}
        self.node = await self._start_node(delivery=d)
        return self.node

    async def submit(self, rcpts: list[str], body: bytes | None = None,
                     sender: str = "app@sender.test", n: int = 0) -> str:
        assert self.node is not None and self.node.ingress is not None
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.node.ingress.port)
        await smtp.connect()
        _, reply = await smtp.sendmail(sender, rcpts, body or message(n, 1500))
        await smtp.quit()
        return reply.rsplit(" ", 1)[1]

    def accounting(self) -> list[dict[str, Any]]:
        path = self.tmp_path / "acct.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

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
