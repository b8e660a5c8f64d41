"""What a scenario measures: our node (``mta``) or a private Postfix (``postfix``), started the
same way for ingress (accept only) and relay (accept and deliver to a loopback sink)."""

from __future__ import annotations

import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import free_port, launch_node, node_sections, rss_kb, stop_node
from benchmarks.harness import ROOT
from benchmarks.postfix import PrivatePostfix, postfix_missing


@dataclass
class Handle:
    """A running target: its SMTP port, and how to read what it says about itself."""

    name: str
    port: int
    work: Path
    admin_port: int = 0
    pid: int = 0

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def metrics(self) -> dict[str, float]:
        """Our node's group-commit batch size and live messages (Postfix has neither)."""
        if not self.admin_port:
            return {}
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10).read().decode()

        def metric(name: str) -> float:
            m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
            return float(m.group(1)) if m else 0.0

        batches = metric("mta_spool_batch_records_count")
        return {"batch": metric("mta_spool_batch_records_sum") / batches if batches else 0.0,
                "live": metric("mta_spool_live_messages")}


def workdir(prefix: str) -> Path:
    (ROOT / "var").mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT / "var"))


def peers(choice: str) -> list[str]:
    """Targets to run for ``--peer auto|postfix|none``; says why Postfix is left out."""
    if choice == "none":
        return ["mta"]
    why = postfix_missing()
    if why is None:
        return ["mta", "postfix"]
    if choice == "postfix":
        raise SystemExit(f"cannot compare with Postfix: {why}")
    print(f"no Postfix comparison: {why}", flush=True)
    return ["mta"]


@contextmanager
def target(name: str, concurrency: int, relay: tuple[str, int] | None = None,
           delivery: str = "", log_level: str = "info", shards: int = 64) -> Iterator[Handle]:
    """Start ``name`` accepting durably; with ``relay`` (host, port) it also delivers
    everything there (``delivery`` adds TOML keys to our node's [delivery])."""
    work = workdir(f"{name}-")
    try:
        if name == "postfix":
            port = free_port()
            with PrivatePostfix(work, port, relay=relay):
                yield Handle(name, port, work)
            return
        smtp_port, admin_port = free_port(), free_port()
        if relay is None:
            # Durable accept only; relay runs measure accept + delivery together.
            sections = node_sections(work, shards=shards)
        else:
            sections = node_sections(work, (
                f'smarthost = "{relay[0]}:{relay[1]}"\n' if "nameservers" not in delivery
                else "") + delivery + "max_connections = 20\nmax_messages_per_connection = 1000\n",
                shards)
        node, log = launch_node(work, smtp_port, admin_port, concurrency, log_level, sections)
        try:
            yield Handle(name, smtp_port, work, admin_port, node.pid)
        finally:
            stop_node(node, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
