"""Node processes coordinated through a real etcd: sharing one spool directory, or (with
``replicas`` > 1) each with its own spool, replicating to each other; SMTP clients that keep
every reply (:class:`Submitter`) and a sink that defers everything until opened
(:func:`closed_sink`), to check that every acknowledged message is delivered once."""

from __future__ import annotations

import json
import smtplib
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import node_config
from harness.etcd import EtcdServer
from harness.mail import message
from harness.node import NodeProcess
from harness.poll import wait_until_sync
from harness.sink import Sink, SinkScript
from mta.envelope import shard_of

TTL = 3.0  # fence margin 2 s: enough headroom for a loaded 2-core CI machine
SHARDS = 64
REPLICATION_SECRET = "cluster-test-secret-0123456789"


class Cluster:
    """Node processes sharing one spool directory, coordinated through ``etcd``."""

    def __init__(self, tmp_path: Path, etcd: EtcdServer, replicas: int = 1,
                 min_insync: int | None = None, replica_timeout: str = "1s",
                 **delivery: Any) -> None:
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.replicas = replicas
        self.min_insync = min_insync  # None: the node's default (= replicas)
        self.replica_timeout = replica_timeout
        self.name = f"t{uuid.uuid4().hex[:8]}"
        self.prefix = f"/mta/{self.name}/"
        self.spool = tmp_path / "shared-spool"
        self.delivery = delivery
        self.nodes: dict[str, NodeProcess] = {}

    def start_node(self, node_id: str, smtp_port: int | None = None,
                   endpoints: list[str] | None = None, replication_listen: str | None = None,
                   replication_advertise: str | None = None, **smtp: Any) -> NodeProcess:
        """Start ``node_id``. Replicated: its replication listener is ``replication_listen``
        (default a free port) and peers dial ``replication_advertise`` (default the
        listener; a test's proxy in front of it puts the node behind that proxy)."""
        work = self.tmp_path / node_id
        work.mkdir(exist_ok=True)
        cluster: dict[str, Any] = {"etcd": endpoints or [self.etcd.endpoint],
                                   "name": self.name, "lease_ttl": TTL}
        spool: dict[str, Any] = {"shards": SHARDS}
        if self.replicas > 1:
            cluster |= {"replication_listen": replication_listen or "127.0.0.1:0",
                        "secret": REPLICATION_SECRET}
            if replication_advertise is not None:
                cluster["replication_advertise"] = replication_advertise
            spool |= {"replicas": self.replicas, "replica_timeout": self.replica_timeout}
            if self.min_insync is not None:
                spool["min_insync"] = self.min_insync
        raw = node_config(self.spool_of(node_id), node={"id": node_id, "log_level": "info"},
                          spool=spool,
                          smtp=smtp,
                          cluster=cluster,
                          delivery={"accounting_log": str(work / "acct.jsonl"),
                                    **self.delivery})
        node = NodeProcess(work, raw, smtp_port=smtp_port).start(timeout=30)
        self.nodes[node_id] = node
        return node

    def spool_of(self, node_id: str) -> Path:
        """The node's spool: its own when replicated, else the shared one."""
        return self.tmp_path / node_id / "spool" if self.replicas > 1 else self.spool

    def state(self) -> dict[str, Any]:
        keys = self.etcd.get_prefix(self.prefix)
        out: dict[str, Any] = {"leader": None, "nodes": set(), "assign": {}, "owner": {}}
        for key, (value, _rev) in keys.items():
            rest = key[len(self.prefix):]
            kind, _, arg = rest.partition("/")
            if rest == "leader":
                out["leader"] = value.decode()
            elif kind == "nodes":
                out["nodes"].add(arg)
            elif kind == "assign":
                out["assign"][int(arg)] = value.decode()
            elif kind == "owner":
                out["owner"][int(arg)] = value.decode()
        return out

    def sync_records(self) -> dict[int, dict[str, Any]]:
        """Each shard's in-sync record (``sync/<shard>``: token, owner, members)."""
        return {int(key.rsplit("/", 1)[1]): json.loads(value)
                for key, (value, _rev) in self.etcd.get_prefix(self.prefix + "sync/").items()}

    def members(self) -> dict[int, set[str]]:
        """Each shard's in-sync set (node ids)."""
        return {s: set(r["members"]) for s, r in self.sync_records().items()}

    def placement(self) -> dict[int, list[str]]:
        """Each shard's followers as the leader placed them (``replicas/<shard>``)."""
        return {int(key.rsplit("/", 1)[1]): json.loads(value)
                for key, (value, _rev) in self.etcd.get_prefix(self.prefix + "replicas/").items()}

    def start_replicated(self, nodes: list[str], copies: int, timeout: float = 30,
                         **start: Any) -> None:
        """Start ``nodes`` (``start``: per node id, keyword arguments of :meth:`start_node`);
        return once they own every shard between them and every shard has at least
        ``copies`` copies in its in-sync set (more may linger: members beyond ``replicas``
        are not pruned yet)."""
        for n in nodes:
            self.start_node(n, **start.get(n, {}))
        self.wait(self.settled(set(nodes)), timeout, "settled")
        wait_until_sync(lambda: len(m := self.members()) == SHARDS
                        and all(len(v) >= copies for v in m.values()),
                        timeout, f"every shard on {copies} copies")

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        try:
            return wait_until_sync(lambda: st if pred(st := self.state()) else None,
                                   timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.state()}") from None

    def settled(self, members: set[str]) -> Any:
        def pred(st: dict[str, Any]) -> bool:
            return (st["leader"] in members and len(st["owner"]) == SHARDS
                    and set(st["owner"].values()) == members
                    and all(st["assign"].get(s) == n for s, n in st["owner"].items()))
        return pred

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()


def submit_until(port: int, stop: threading.Event, acked: dict[str, bytes],
                 lock: threading.Lock, worker: int) -> None:
    """Send messages to ``port`` until ``stop``; record each one answered 250 in ``acked``
    (key ``worker-n``, the message carries ``X-Test-Id: worker * 100000 + n``)."""
    n = 0
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            while not stop.is_set():
                n += 1
                body = message(worker * 100000 + n, 1500)
                try:
                    s.sendmail("app@sender.test", [f"r{worker}-{n}@dest.test"], body)
                except smtplib.SMTPResponseException:
                    continue
                # smtplib hides the queue id; the test identifies messages by their X-Test-Id.
                with lock:
                    acked[f"{worker}-{n}"] = body
    except (smtplib.SMTPException, OSError):
        return


def delivered_ids(messages: list[Any]) -> Counter[str]:
    """How often each test message (``worker-n``) reached the sink."""
    ids: Counter[str] = Counter()
    for m in list(messages):
        for line in m.content.split(b"\r\n"):
            if line.startswith(b"X-Test-Id: "):
                n = int(line[11:])
                ids[f"{n // 100000}-{n % 100000}"] += 1
    return ids


class Load:
    """One SMTP client per node sending until :meth:`stop`; ``acked`` holds what got 250."""

    def __init__(self) -> None:
        self.acked: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, ports: list[int]) -> Load:
        self.threads = [threading.Thread(target=submit_until,
                                         args=(port, self._stop, self.acked, self.lock, i),
                                         daemon=True)
                        for i, port in enumerate(ports)]
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(15)


def all_delivered(acked: dict[str, bytes], messages: list[Any], timeout: float,
                  max_dupes: int) -> Counter[str]:
    """Wait until every acknowledged message reached the sink; fail naming how many never
    did, or if more than ``max_dupes`` came twice (only those in flight at a kill may).
    Returns how often each arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not set(acked) <= set(delivered_ids(messages)):
        time.sleep(0.2)
    got = delivered_ids(messages)
    lost = set(acked) - set(got)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged messages never delivered"
    dupes = {k: v for k, v in got.items() if v > 1}
    assert len(dupes) <= max_dupes, dupes
    return got


# --- clients that keep every reply, a sink that opens on demand ---------------------------------


@dataclass
class Reply:
    """One DATA transaction's outcome as a :class:`Submitter` saw it."""

    key: str  # worker-n, as the sink reports it (delivered_ids)
    sent: float  # monotonic time the message's DATA began
    code: int
    text: bytes
    done: float = 0.0  # monotonic time the final reply came (0: not recorded)

    @property
    def queue_id(self) -> str:
        return self.text.decode().rsplit("queued as ", 1)[1].strip()

    @property
    def shard(self) -> int:
        return shard_of(self.queue_id)


class Submitter:
    """One SMTP client sending to one node until stopped, reconnecting whenever the node
    closes on it or stalls; every DATA reply is kept (the 250s also in ``acked``)."""

    def __init__(self, port: int, worker: int, acked: dict[str, bytes],
                 lock: threading.Lock) -> None:
        self.port, self.worker, self.acked, self.lock = port, worker, acked, lock
        self.replies: list[Reply] = []
        self.errors: list[str] = []  # why a connection ended (for failure messages)
        self._stop = threading.Event()
        self._n = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def ok(self, since: float = 0.0) -> list[Reply]:
        return [r for r in list(self.replies) if r.code == 250 and r.sent >= since]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=3) as s:
                    s.ehlo("client.test")
                    while not self._stop.is_set():
                        self._one(s)
            except (smtplib.SMTPException, OSError) as exc:
                self.errors.append(repr(exc))
                self._stop.wait(0.1)  # a fenced or frozen node: connect again

    def _one(self, s: smtplib.SMTP) -> None:
        self._n += 1
        key = f"{self.worker}-{self._n}"
        body = message(self.worker * 100000 + self._n, 1500)
        code, text = s.mail("app@sender.test")
        if code == 250:
            code, text = s.rcpt(f"r{key}@dest.test")
        if code != 250:
            self.errors.append(f"{code} {text!r}")
            s.rset()
            self._stop.wait(0.05)
            return
        t = time.monotonic()
        try:
            code, text = s.data(body)
        except smtplib.SMTPDataError as exc:  # DATA itself refused (not 354)
            code, text = exc.smtp_code, exc.smtp_error
        if code == 250:
            with self.lock:
                self.acked[key] = body
        self.replies.append(Reply(key, t, code, text, time.monotonic()))
        if code != 250:
            self._stop.wait(0.05)


def stop_all(subs: list[Submitter]) -> None:
    for sub in subs:
        sub.stop()


def closed_sink() -> tuple[Sink, threading.Event]:
    """A sink answering 451 until the event is set: nothing is delivered (so nothing can be
    delivered twice) while the test breaks things; every acknowledged message is still queued
    on some copy when it opens."""
    open_ = threading.Event()
    sink = Sink("127.0.0.1", 0, SinkScript(
        data_reply=lambda _rcpts, _n: None if open_.is_set() else "451 4.3.0 not yet"))
    sink.start()
    return sink, open_


def deliver_all(subs: list[Submitter], open_: threading.Event, acked: dict[str, bytes],
                sink: Sink, timeout: float = 60) -> None:
    """Stop the clients, open the sink: every acknowledged message arrives, none twice."""
    stop_all(subs)
    open_.set()
    got = all_delivered(acked, sink.messages, timeout, max_dupes=0)
    assert all(v == 1 for v in got.values()), {k: v for k, v in got.items() if v > 1}
