"""Synthetic probe: submit a message over SMTP to this node, time it until the remote side of
the configured mailbox accepts it (or refuses it), and export the result as metrics."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

import aiosmtplib
import structlog

from mta.logs import describe

if TYPE_CHECKING:
    from mta.node import Node

__all__ = ["ProbeError", "Prober"]

log = structlog.get_logger("mta.probe")

_QUEUED = re.compile(r"queued as ([0-9A-Za-z]{26})")


class ProbeError(Exception):
    """The probe cannot run here (not configured, delivery disabled); says what to set."""


class Prober:
    """Runs probes for one node; one at a time."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg.probe
        self.sender = self.cfg.sender or f"probe@{node.cfg.smtp.hostname}"
        if node.engine is not None:
            node.engine.watch_senders.add(self.sender)
        self._lock = asyncio.Lock()

    def _check(self) -> None:
        if not self.cfg.recipient:
            raise ProbeError("no probe configured: set [probe] recipient (a mailbox or sink "
                             "that accepts mail) in the node's config")
        if self.node.engine is None:
            raise ProbeError("delivery is disabled on this node ([delivery] enabled = false)")
        if self.node.ingress is None:
            raise ProbeError("the SMTP listener is not running")

    def _listener(self) -> tuple[str, int]:
        assert self.node.ingress is not None
        host = self.node.cfg.smtp.listen[0]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return host, self.node.ingress.port

    async def run(self) -> dict[str, Any]:
        """One probe; never raises for a failed probe (the result says why), only for a probe
        that cannot run (ProbeError)."""
        self._check()
        async with self._lock:
            result = await self._run()
        self.node.metrics.probe_result(result["ok"], result.get("total_seconds"), time.time())
        log.info("probe.finished", node_id=self.node.node_id, **result)
        return result

    async def _run(self) -> dict[str, Any]:
        assert self.node.engine is not None
        engine = self.node.engine
        timeout = self.cfg.timeout
        tag = uuid.uuid4().hex
        body = (f"From: <{self.sender}>\r\nTo: <{self.cfg.recipient}>\r\n"
                f"Subject: mta probe {tag}\r\nDate: {formatdate(localtime=False)}\r\n"
                f"X-Mta-Probe: {tag}\r\n\r\nSynthetic probe from node "
                f"{self.node.node_id}; safe to discard.\r\n")
        host, port = self._listener()
        out: dict[str, Any] = {"ok": False, "node": self.node.node_id, "message_id": None,
                               "recipient": self.cfg.recipient, "submit_seconds": None,
                               "total_seconds": None, "reply": "", "stage": "submit"}
        started = time.time()
        try:
            smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=min(timeout, 30.0),
                                   start_tls=False)
            async with smtp:
                _errors, reply = await smtp.sendmail(self.sender, [self.cfg.recipient],
                                                     body.encode())
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            out["reply"] = f"submission failed: {describe(exc)}"
            return out
        out["submit_seconds"] = round(time.time() - started, 4)
        match = _QUEUED.search(reply)
        if match is None:
            out["reply"] = f"no message id in the reply: {reply!r}"
            return out
        mid = out["message_id"] = match.group(1)
        out["stage"] = "delivery"
        try:
            outcome = await asyncio.wait_for(asyncio.shield(engine.watch(mid)),
                                             max(0.0, timeout - (time.time() - started)))
        except TimeoutError:
            out["reply"] = f"no delivery outcome within {timeout:g}s"
            return out
        finally:
            engine.unwatch(mid)
        out["reply"] = outcome["reply"]
        out["remote"] = outcome["remote"]
        out["total_seconds"] = round(outcome["at"] - started, 4)
        out["ok"] = outcome["kind"] == "Delivery"
        out["stage"] = "done" if out["ok"] else outcome["kind"].lower()
        return out

    async def run_forever(self, interval: float) -> None:
        """The periodic in-node probe."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run()
            except ProbeError as exc:
                log.warning("probe.cannot_run", node_id=self.node.node_id, error=describe(exc))
