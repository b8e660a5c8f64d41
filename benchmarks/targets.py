"""What a scenario measures: our node (``mta``), two nodes replicating each other's spool
(``mta-replicated``) or a private Postfix (``postfix``), started the same way for ingress (accept
only) and relay (accept and deliver to a loopback sink).

``mta-replicated`` (issue 16): etcd and 2 node processes sharing one SMTP port (SO_REUSEPORT:
the kernel spreads the client's connections over both), each with its own spool directory,
``[spool] replicas = 2`` and ``min_insync = 2``. Each owns half the shards and follows the
other's, so each message is acknowledged only once it is on both disks. Runs start once every
shard has both copies in its in-sync set.

``mta-dkim`` (issue 17): ``mta`` signing every message with DKIM, rsa-sha256 and a 2048-bit key
made for the run (the load generator's From: is ``bench@example.com``, the signing domain);
relay runs count the signed messages the sink receives, so the figure is of signed mail.

``mta-x2`` (issue 20): 2 standalone node processes sharing one SMTP port (``[smtp]
reuse_port``), each its own spool and, in relay runs, delivering what it accepted: the way to
use a second core on one machine (Postfix's processes use both). ``mta-dkim-x2``: both sign
as ``mta-dkim`` does, with one key."""

from __future__ import annotations

import base64
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from benchmarks.common import (
    cpu_seconds,
    free_port,
    launch_node,
    node_sections,
    rss_kb,
    spawn_node,
    stop_node,
    wait_ready,
)
from benchmarks.events_receiver import EventsReceiver
from benchmarks.harness import ROOT
from benchmarks.postfix import PrivatePostfix, postfix_missing
from benchmarks.replicated import owners, replicated_sections, wait_replicated
from harness.config import toml_dumps
from harness.etcd import EtcdServer

NAMES = ("mta", "mta-dkim", "mta-events", "mta-replicated", "mta-x2", "mta-dkim-x2", "postfix")
STANDALONE_PROCESSES = 2  # mta-x2
EVENTS_SECRET = "benchmark-events-secret-0123456789"
DKIM_DOMAIN = "example.com"  # the load generator's From: domain
DKIM_SELECTOR = "bench"
REPLICATED_NODES = 2
REPLICATED_TTL = 5.0  # the default lease: nothing fails during an ingress run


@dataclass
class Handle:
    """A running target: its SMTP port, and how to read what it says about itself."""

    name: str
    port: int
    work: Path
    admin_port: int = 0
    pid: int = 0
    # Every node process of the target (mta-replicated has 2; pid/admin_port: the first).
    admin_ports: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)  # kept with the run's figures
    events: EventsReceiver | None = None  # mta-events: the webhook receiving its records
    postfix: PrivatePostfix | None = None

    def cpu_seconds(self) -> float:
        """user + system CPU of every node process so far (all its threads); for Postfix,
        of all its processes, those that have exited included."""
        if self.postfix is not None:
            return self.postfix.cpu_seconds()
        pids = self.pids or ([self.pid] if self.pid else [])
        return sum(cpu_seconds(p) for p in pids) if pids else float("nan")

    def spool_count(self, needle: bytes = b"DKIM-Signature: v=1; a=rsa-sha256;") -> int:
        """How often ``needle`` occurs in the node's spool files (records are stored
        uncompressed): an ingress run of ``mta-dkim`` checks that every message it accepted
        was stored signed."""
        found = 0
        for path in self.work.rglob("*"):  # every node's spool (mta-dkim-x2 has two)
            if "spool" in path.relative_to(self.work).parts and path.is_file():
                found += path.read_bytes().count(needle)
        return found

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self.pids or [self.pid])

    def metrics(self) -> dict[str, float]:
        """Our nodes' group-commit batch size (records per local fdatasync, over every node)
        and live messages (Postfix has neither)."""
        ports = self.admin_ports or ([self.admin_port] if self.admin_port else [])
        total: dict[str, float] = {}
        received = []
        for port in ports:
            text = urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            for name in ("mta_spool_batch_records_count", "mta_spool_batch_records_sum",
                         "mta_spool_live_messages", "mta_received_messages_total"):
                m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
                total[name] = total.get(name, 0.0) + (float(m.group(1)) if m else 0.0)
                if name == "mta_received_messages_total":
                    received.append(float(m.group(1)) if m else 0.0)
        if not ports:
            return {}
        batches = total["mta_spool_batch_records_count"]
        out = {"batch": total["mta_spool_batch_records_sum"] / batches if batches else 0.0,
               "live": total["mta_spool_live_messages"], **self.facts}
        if len(received) > 1 and sum(received):
            # How evenly SO_REUSEPORT spread the sessions: the busiest node's share.
            out["busiest_node_share"] = max(received) / sum(received)
        return out


def workdir(prefix: str) -> Path:
    (ROOT / "var").mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=ROOT / "var"))


def peers(choice: str, targets: str = "") -> list[str]:
    """Targets to run: ``--targets mta,mta-replicated,postfix`` when given (in that order,
    interleaved per run), else ``mta`` and, for ``--peer auto|postfix|none``, Postfix; says
    why Postfix is left out."""
    if targets:
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if bad := [t for t in names if t not in NAMES]:
            raise SystemExit(f"--targets: unknown {', '.join(bad)} (choose from "
                             f"{', '.join(NAMES)})")
        if "postfix" in names and (why := postfix_missing()) is not None:
            raise SystemExit(f"cannot compare with Postfix: {why}")
        return names
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
            with PrivatePostfix(work, port, relay=relay) as postfix:
                yield Handle(name, port, work, postfix=postfix)
            return
        if name == "mta-replicated":
            with replicated(work, concurrency, relay, delivery, log_level, shards) as handle:
                yield handle
            return
        if name in ("mta-x2", "mta-dkim-x2"):
            signing = dkim_section(work) if name == "mta-dkim-x2" else ""
            with standalone_processes(name, work, concurrency, relay, delivery, log_level,
                                      shards, signing) as handle:
                yield handle
            return
        smtp_port, admin_port = free_port(), free_port()
        sections = node_sections(work, _delivery(relay, delivery), shards)
        facts: dict[str, float] = {}
        if name == "mta-dkim":
            sections += dkim_section(work)
            facts["dkim_rsa_bits"] = 2048
        receiver = EventsReceiver(EVENTS_SECRET).start() if name == "mta-events" else None
        if receiver is not None:
            sections += (f'[events]\nurl = "http://127.0.0.1:{receiver.port}/hook"\n'
                         f'secret = "{EVENTS_SECRET}"\n')
        node, log = launch_node(work, smtp_port, admin_port, concurrency, log_level, sections)
        try:
            yield Handle(name, smtp_port, work, admin_port, node.pid, facts=facts,
                         events=receiver)
        finally:
            stop_node(node, log)
            if receiver is not None:
                receiver.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dkim_key(work: Path) -> Path:
    """A fresh RSA-2048 private key (PEM, PKCS#8, mode 600) under ``work``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = work / "dkim-rsa2048.pem"
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def dkim_section(work: Path) -> str:
    """``[dkim]`` signing every benchmark message (From: bench@example.com) with rsa-sha256;
    ``required``: a message it could not sign is refused, never counted as relayed."""
    key = dkim_key(work)
    return (f'[dkim]\nrequired = true\n[dkim.domains."{DKIM_DOMAIN}"]\n'
            f'selector = "{DKIM_SELECTOR}"\nkey = "{key}"\nalgorithm = "rsa-sha256"\n')


def dkim_public_record(work: Path) -> str:
    """The TXT record that publishes the run's key (``v=DKIM1; k=rsa; p=...``)."""
    key = serialization.load_pem_private_key((work / "dkim-rsa2048.pem").read_bytes(), None)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def _delivery(relay: tuple[str, int] | None, delivery: str) -> str:
    """A node's ``[delivery]`` keys: off for durable accept only; relay runs measure accept +
    delivery together."""
    if relay is None:
        return "enabled = false\n"
    return ((f'smarthost = "{relay[0]}:{relay[1]}"\n' if "nameservers" not in delivery
             else "") + delivery + "max_connections = 20\nmax_messages_per_connection = 1000\n")


@contextmanager
def replicated(work: Path, concurrency: int, relay: tuple[str, int] | None, delivery: str,
               log_level: str, shards: int) -> Iterator[Handle]:
    """etcd and ``REPLICATED_NODES`` nodes behind one SMTP port, each its own spool, every
    shard on 2 copies (both needed for a 250); yields once every shard has both in sync."""
    port = free_port()
    name = f"b{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        etcd = EtcdServer(work / "etcd").start()
        stack.callback(etcd.kill)

        def sections(node_dir: Path) -> str:
            more = replicated_sections(etcd, name, REPLICATED_TTL, replicas=2, min_insync=2)
            spool = toml_dumps({"spool": more["spool"]}).split("\n", 1)[1].strip() + "\n"
            return (node_sections(node_dir, _delivery(relay, delivery), shards, spool)
                    + toml_dumps({"cluster": more["cluster"]}))

        # All at once: the leader then splits the shards between them from the start (a
        # node that joins later gets shards only once it has caught-up copies of them).
        nodes, admin_ports = _sharing_one_port(stack, work, port, REPLICATED_NODES,
                                               concurrency, log_level, sections, timeout=90)
        ids = {f"n{i + 1}" for i in range(REPLICATED_NODES)}
        wait_replicated(etcd, name, ids, shards, copies=2)
        # The shards each node owns (and so writes first; it follows the others'): the load
        # is spread over both only if these are near even.
        per = Counter(owners(etcd, name).values())
        facts = {"owned_min": min(per.get(n, 0) for n in ids),
                 "owned_max": max(per.get(n, 0) for n in ids)}
        yield Handle("mta-replicated", port, work, admin_ports[0], nodes[0][0].pid,
                     admin_ports, [n.pid for n, _ in nodes], facts)


@contextmanager
def standalone_processes(name: str, work: Path, concurrency: int,
                         relay: tuple[str, int] | None, delivery: str, log_level: str,
                         shards: int, signing: str = "") -> Iterator[Handle]:
    """``STANDALONE_PROCESSES`` standalone nodes behind one SMTP port (SO_REUSEPORT), each
    its own spool (and accounting log) under ``work/n<i>``; ``signing``: a ``[dkim]``
    section for each (``dkim_section``), or none."""
    port = free_port()
    with ExitStack() as stack:
        nodes, admin_ports = _sharing_one_port(
            stack, work, port, STANDALONE_PROCESSES, concurrency, log_level,
            lambda node_dir: node_sections(node_dir, _delivery(relay, delivery), shards) + signing)
        yield Handle(name, port, work, admin_ports[0], nodes[0][0].pid, admin_ports,
                     [n.pid for n, _ in nodes], {"dkim_rsa_bits": 2048} if signing else {})


def _sharing_one_port(stack: ExitStack, work: Path, port: int, count: int, concurrency: int,
                      log_level: str, sections: Callable[[Path], str], timeout: float = 20.0
                      ) -> tuple[list[tuple[subprocess.Popen[bytes], Any]], list[int]]:
    """``count`` node processes on ``port`` (SO_REUSEPORT), node ``n<i>`` working under
    ``work/n<i>`` with ``sections(its directory)`` in its config; all started before any is
    waited for (stopped when ``stack`` closes). Returns them and their admin ports."""
    nodes: list[tuple[subprocess.Popen[bytes], Any]] = []
    stack.callback(_stop_all, nodes)
    admin_ports = []
    for i in range(count):
        node_dir = work / f"n{i + 1}"
        node_dir.mkdir()
        admin_ports.append(free_port())
        nodes.append(spawn_node(node_dir, port, admin_ports[-1], concurrency, log_level,
                                sections(node_dir), smtp_extra="reuse_port = true\n",
                                node_id=f"n{i + 1}"))
    for i, (node, log) in enumerate(nodes):
        wait_ready(node, log, work / f"n{i + 1}", admin_ports[i], timeout=timeout)
    return nodes, admin_ports


def _stop_all(nodes: list[tuple[subprocess.Popen[bytes], Any]]) -> None:
    """Stop every node at once (one by one, each would hand its shards to the next one just
    before that one stops too); their spools are thrown away, so a straggler is killed."""
    for node, _log in nodes:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
    for node, log in nodes:
        try:
            node.wait(15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()
