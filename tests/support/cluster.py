"""Node processes coordinated through a real etcd: sharing one spool directory, or (with
``replicas`` > 1) each with its own spool, replicating to each other; SMTP clients that keep
every reply (:class:`Submitter`) and a sink that defers everything until opened
(:func:`closed_sink`), to check that every acknowledged message is delivered once."""

from __future__ import annotations

import contextlib
import itertools
import json
import smtplib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

    def start_nodes(self, nodes: list[str], **start: Any) -> None:
        """Start ``nodes`` (``start``: per node id, keyword arguments of :meth:`start_node`):
        the first alone, so that it is the leader as when each waits for the one before (a
        node joins the cluster before it opens its SMTP port), then the others at once."""
        first, *rest = nodes
        self.start_node(first, **start.get(first, {}))
        with ThreadPoolExecutor(max(1, len(rest))) as pool:
            for f in [pool.submit(self.start_node, n, **start.get(n, {})) for n in rest]:
                f.result()

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
        self.start_nodes(nodes, **start)
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
    """One :class:`Submitter` per node sending until :meth:`stop`; ``acked`` holds what got
    250. A client reconnects whenever its node closes on it (a ``421``: the node fenced itself
    for a moment, or handed the shard over mid-transaction), as a real client would: a
    client that gave up on the first ``421`` would leave that node out of the load for good."""

    def __init__(self) -> None:
        self.acked: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.subs: list[Submitter] = []

    def start(self, ports: list[int]) -> Load:
        self.subs = [Submitter(port, i, self.acked, self.lock) for i, port in enumerate(ports)]
        return self

    def stop(self) -> None:
        stop_all(self.subs)


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


# --- one replicated scenario: a cluster, a closed sink, clients, and their teardown --------------


@dataclass
class Replicated:
    """What :func:`replicated` sets up: the cluster ``c``, the closed ``sink`` (opened by
    ``open_``), the clients ``subs`` and what they got 250 for (``acked``), and ``t0``."""

    c: Cluster
    sink: Sink
    open_: threading.Event
    acked: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    subs: list[Submitter] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    cleanups: list[Callable[[], object]] = field(default_factory=list)
    # Worker numbers (they prefix the acked keys), shared by the rounds of one cluster.
    workers: Iterator[int] = field(default_factory=itertools.count)

    def submit(self, *nodes: str) -> list[Submitter]:
        """Start one client per node in ``nodes``, numbered on from the earlier ones (the
        worker number prefixes their ``acked`` keys); also kept in ``subs``."""
        new = [Submitter(self.c.nodes[n].smtp_port, next(self.workers), self.acked, self.lock)
               for n in nodes]
        self.subs.extend(new)
        return new

    @contextlib.contextmanager
    def round(self) -> Iterator[Replicated]:
        """The next test's turn on this cluster (one that tests share): the sink closed
        again, no clients yet, nothing acknowledged; the clients stopped on the way out. The
        sink keeps what earlier rounds delivered, under other worker numbers: their keys
        never mix, and :meth:`deliver_all` still finds any of them delivered twice."""
        stop_all(self.subs)
        self.open_.clear()
        run = Replicated(self.c, self.sink, self.open_, workers=self.workers)
        try:
            yield run
        finally:
            stop_all(run.subs)

    def deliver_all(self) -> None:
        """Stop the clients, open the sink: every acknowledged message arrives, none twice."""
        deliver_all(self.subs, self.open_, self.acked, self.sink)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


@contextlib.contextmanager
def replicated(tmp_path: Path, etcd: EtcdServer, **kw: Any) -> Iterator[Replicated]:
    """A replicated cluster (``kw``: ``replicas``, ``min_insync``, ``replica_timeout``) whose
    nodes relay to a sink that defers everything until opened, quick to retry; on the way
    out the clients stop, the nodes are killed, ``cleanups`` run (last first) and the sink
    stops, whatever the test left running."""
    sink, open_ = closed_sink()
    c = Cluster(tmp_path, etcd, enabled=True, smarthost=f"127.0.0.1:{sink.port}",
                max_connections=2, retry_initial="300ms", retry_max="1s", **kw)
    run = Replicated(c, sink, open_)
    try:
        yield run
    finally:
        stop_all(run.subs)
        c.stop()
        for cleanup in reversed(run.cleanups):
            cleanup()
        sink.stop()
