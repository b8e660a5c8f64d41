"""The queue tools a Postfix or KumoMTA admin reaches for, end to end over the admin API and
mtactl against real node processes delivering to a real SMTP sink: ``queue list`` (filters,
pages, cluster-wide), hold and release (durable across a restart), retry now, delete without
a DSN, bounce by filter with a confirmation count, and ``message show`` with its content and
each recipient's last reply.

The sink greylists held.test for ever and later.test once per address (see
tests/support greylisting_script); retry_initial is an hour, so nothing is retried by
itself while a test runs."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.queue.state import DeliveryState, Transient, is_held
from tests.support import (
    EtcdServer,
    NodeProcess,
    Sink,
    ctl,
    ctl_json,
    node_config,
    read_accounting,
    submit,
    wait_until_sync,
)
from tests.support.cluster import Cluster

SHARDS = 4


def _raw(work: Path, sink: Sink) -> dict[str, Any]:
    return node_config(work / "spool", spool={"shards": SHARDS}, delivery={
        "enabled": True, "smarthost": f"127.0.0.1:{sink.port}", "retry_initial": "1h",
        "retry_max": "2h", "idle_timeout": "1s", "accounting_log": str(work / "acct.jsonl")})


@pytest.fixture
def node(tmp_path: Path, sink: Sink) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path, _raw(tmp_path, sink)).start()
    yield proc
    proc.kill()


def _accounting(work: Path) -> list[dict[str, Any]]:
    return read_accounting(work / "acct.jsonl")


def _records(work: Path, kind: str, mid: str) -> list[dict[str, Any]]:
    return [r for r in _accounting(work) if r["type"] == kind and r["message_id"] == mid]


def _wait_deferred(node: NodeProcess, *ids: str) -> None:
    wait_until_sync(lambda: all(_records(node.workdir, "TransientFailure", m) for m in ids),
                    30, f"a deferral of each of {ids}")


def _delivered(sink: Sink, rcpt: str) -> bool:
    with sink.lock:
        return any(rcpt in m.recipients for m in sink.messages)


def _http(node: NodeProcess, method: str, path: str, body: dict[str, Any] | None = None
          ) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer t0ken", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _listed(node: NodeProcess | str, *args: str) -> list[str]:
    return [m["id"] for m in ctl_json(node, "queue", "list", *args)["messages"]]


def _restart(node: NodeProcess) -> None:
    node.signal(signal.SIGTERM)
    assert node.wait(30) == 0, node.log()
    node.start()


# --- queue list --------------------------------------------------------------------------


def test_queue_list_filters_pages_and_answers_http(node: NodeProcess) -> None:
    a = [submit(node, [f"a{i}@held.test"], i, sender="alice@ok.test") for i in range(3)]
    b = submit(node, ["b@held.test", "c@ok.test"], 3, sender="bob@ok.test")
    _wait_deferred(node, *a, b)
    assert ctl(node, "suspend", "paused.test").returncode == 0
    p = submit(node, ["p@paused.test"], 4, sender="bob@ok.test")  # never attempted: pending
    every = sorted([*a, b, p])

    listed = ctl_json(node, "queue", "list")
    assert [m["id"] for m in listed["messages"]] == every  # oldest (lowest id) first
    assert listed["nodes"] == ["test-node"] and listed["next_cursor"] is None
    first = listed["messages"][every.index(b)]
    assert first["sender"] == "bob@ok.test" and first["recipients"] == ["b@held.test"]
    assert first["state"] == "deferred" and first["attempts"] == 1
    assert first["next_attempt"] > time.time() + 600
    assert "451 4.7.1 Greylisted" in first["last_reply"]

    assert _listed(node, "--sender", "bob@ok.test") == sorted([b, p])
    assert _listed(node, "--sender", "BOB@ok.test", "--domain", "held.test") == [b]
    assert _listed(node, "--recipient", "a1@held.test") == [a[1]]
    assert _listed(node, "--recipient", "c@ok.test") == []  # delivered: not pending
    assert _listed(node, "--domain", "paused.test") == [p]
    assert _listed(node, "--state", "pending") == [p]
    assert _listed(node, "--state", "deferred") == sorted([*a, b])
    assert _listed(node, "--state", "held") == []
    assert _listed(node, "--older-than", "1h") == []
    assert _listed(node, "--newer-than", "1h") == every
    # Deferred ones wait an hour; the suspended domain's is looked at within a minute.
    assert _listed(node, "--next-before", "10m") == [p]

    seen, cursor, pages = [], None, 0
    while True:
        page = ctl_json(node, "queue", "list", "--limit", "2",
                        *(["--cursor", cursor] if cursor else []))
        assert len(page["messages"]) <= 2
        seen += [m["id"] for m in page["messages"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == every and pages == 3

    human = ctl(node, "queue", "list", "--sender", "alice@ok.test")
    assert human.returncode == 0
    assert human.stdout.splitlines()[0].split() == [
        "ID", "AGE", "SIZE", "STATE", "TRIES", "NEXT", "SENDER", "RECIPIENTS"]
    assert all(m in human.stdout for m in a) and b not in human.stdout
    assert "3 message(s) on 1 node(s)" in human.stdout
    # The summary verb is unchanged.
    assert ctl_json(node, "queue")["total"] == 5

    status, answer = _http(node, "GET", "/api/v1/queue/messages?state=held&limit=5")
    assert (status, answer["messages"]) == (200, [])
    for bad in ("older_than=soon", "state=frozen", "limit=0", "limit=5000", "cursor=%2F..",
                "domain=not%20a%20domain", "sendr=x@y.test"):
        status, answer = _http(node, "GET", f"/api/v1/queue/messages?{bad}")
        assert status == 400 and answer["error"], (bad, answer)
    res = ctl(node, "queue", "list", "--older-than", "soon")
    assert res.returncode == 1 and "older_than" in res.stderr


# --- the delivery state on disk ----------------------------------------------------------


def test_the_state_keeps_hold_and_transients_and_reads_every_older_spool() -> None:
    old = {"att": 2, "next": 1764500000.0, "r": {"1": ["d", "250 ok", "", "mx"]},
           "last": "451 busy"}
    state = DeliveryState.from_wire(old)  # as every spool written before holds existed
    assert not state.held and state.transients == {} and state.attempts == 2
    assert state.to_wire() == old  # nothing new written unless used
    state.held = True
    state.transients = {0: Transient("451 busy", "mx", 5.0, 2),
                        1: Transient("stale: settled since", "mx", 1.0)}
    wire = state.to_wire()
    assert wire["held"] is True and wire["lr"] == {"0": ["451 busy", "mx", 5.0, 2]}
    back = DeliveryState.from_wire(json.loads(json.dumps(wire)))
    assert back.held and back.transients == {0: Transient("451 busy", "mx", 5.0, 2)}
    assert is_held(wire) and not is_held(old) and not is_held(None)


# --- message show ------------------------------------------------------------------------


def test_message_show_content_and_each_recipients_last_reply(node: NodeProcess) -> None:
    mid = submit(node, ["x@held.test", "y@ok.test"], 7)
    _wait_deferred(node, mid)

    m = ctl_json(node, "message", "show", mid)
    rcpts = {r["address"]: r for r in m["recipients"]}
    assert rcpts["x@held.test"]["status"] == "pending"
    assert "451 4.7.1 Greylisted" in rcpts["x@held.test"]["reply"]
    assert rcpts["x@held.test"]["deferrals"] == 1
    assert rcpts["x@held.test"]["remote"] == "127.0.0.1"
    assert time.time() - 60 < rcpts["x@held.test"]["last_deferral"] <= time.time()
    assert rcpts["y@ok.test"]["status"] == "delivered"
    assert rcpts["y@ok.test"]["reply"].startswith("250")
    assert "content" not in m and "Subject: test 7" in m["headers"]
    # Tried again now: the count goes up, the last reply stays the recipient's own.
    assert ctl_json(node, "message", "retry", mid)["result"] in ("scheduled", "in_flight")
    again = wait_until_sync(
        lambda: next((r for r in ctl_json(node, "message", "show", mid)["recipients"]
                      if r["address"] == "x@held.test" and r["deferrals"] == 2), None), 30,
        "a second deferral")
    assert "451 4.7.1 Greylisted" in again["reply"]
    assert again["last_deferral"] >= rcpts["x@held.test"]["last_deferral"]
    human = ctl(node, "message", "show", mid).stdout
    row = next(line for line in human.splitlines() if line.startswith("x@held.test"))
    assert "451 4.7.1 Greylisted" in row, human  # the REPLY column says it, not "-"

    heads = ctl_json(node, "message", "show", mid, "--headers")["content"]
    assert heads["part"] == "headers" and not heads["truncated"]
    assert "Subject: test 7" in heads["text"] and "message 7 line" not in heads["text"]
    body = ctl_json(node, "message", "show", mid, "--body")["content"]
    assert body["text"].startswith("message 7 line") and "Subject:" not in body["text"]
    whole = ctl_json(node, "message", "show", mid, "--headers", "--body")["content"]
    assert whole["text"].startswith("Received: ") and "message 7 line" in whole["text"]
    assert whole["bytes"] == m["size"]
    capped = ctl_json(node, "message", "show", mid, "--body", "--max-bytes", "10")["content"]
    assert capped["text"] == "message 7 " and capped["truncated"]
    assert capped["bytes"] == body["bytes"] > 1000
    human = ctl(node, "message", "show", mid, "--body", "--max-bytes", "10").stdout
    assert "message 7" in human and "shown up to --max-bytes" in human

    status, answer = _http(node, "GET", f"/api/v1/messages/{mid}?part=body&max_bytes=4")
    assert status == 200 and answer["content"]["text"] == "mess"
    assert _http(node, "GET", f"/api/v1/messages/{mid}?part=nope")[0] == 400
    assert ctl(node, "message", "show", mid, "--max-bytes", "0").returncode == 2


# --- hold and release, retry -------------------------------------------------------------


def test_hold_is_durable_and_release_then_retry_delivers(node: NodeProcess,
                                                         sink: Sink) -> None:
    held = submit(node, ["h@later.test"], 10, sender="hold@ok.test")
    other = submit(node, ["h2@later.test"], 11, sender="hold@ok.test")
    _wait_deferred(node, held, other)

    answer = ctl_json(node, "message", "hold", held)
    assert answer == {"id": held, "node": "test-node", "held": True, "changed": True}
    again = ctl(node, "message", "hold", held)
    assert again.returncode == 1 and "already held" in again.stderr
    retry = ctl(node, "message", "retry", held)
    assert retry.returncode == 1 and "is held" in retry.stderr
    status, err = _http(node, "POST", f"/api/v1/messages/{held}/retry", {})
    assert status == 409 and "release it first" in err["hint"]
    assert ctl_json(node, "message", "show", held)["held"]

    _restart(node)
    assert _listed(node, "--state", "held") == [held]
    # Everything else waiting is tried now; once the other message is delivered, the held
    # one would have been tried too if holding did not stop it.
    assert ctl_json(node, "flush")["rescheduled"] == 1
    wait_until_sync(lambda: _delivered(sink, "h2@later.test"), 30, "the flushed message")
    assert not _delivered(sink, "h@later.test")
    assert len(_records(node.workdir, "TransientFailure", held)) == 1

    released = ctl(node, "message", "release", held)
    assert released.returncode == 0 and f"{held} released" in released.stdout
    assert _listed(node, "--state", "held") == [] and _listed(node) == [held]
    # Released, it keeps its recorded schedule (an hour away) until tried now:
    assert not _delivered(sink, "h@later.test")
    tried = ctl(node, "message", "retry", held)
    assert tried.returncode == 0 and "will be tried now" in tried.stdout
    wait_until_sync(lambda: _delivered(sink, "h@later.test"), 30, "the released message")
    wait_until_sync(lambda: ctl(node, "message", "show", held).returncode == 1, 10,
                    "the message to be done")


def test_a_held_message_takes_an_operator_bounce_and_no_attempt(node: NodeProcess,
                                                                 sink: Sink) -> None:
    mid = submit(node, ["x@held.test", "y@later.test"], 15, sender="hb@ok.test")
    marker = submit(node, ["m@later.test"], 16, sender="hb@ok.test")
    _wait_deferred(node, mid, marker)
    assert ctl_json(node, "message", "hold", mid)["changed"]

    bounced = ctl_json(node, "message", "bounce", "--domain", "held.test")
    assert bounced["bounced_recipients"] == 1 and bounced["messages"] == 1
    shown = ctl_json(node, "message", "show", mid)
    assert shown["held"]
    assert {r["address"]: r["status"] for r in shown["recipients"]} == {
        "x@held.test": "bounced", "y@later.test": "held"}
    # The bounce put the message back on the schedule; due now, it must still not be tried.
    ctl_json(node, "flush")
    wait_until_sync(lambda: _delivered(sink, "m@later.test"), 30, "the flushed marker")
    assert not _delivered(sink, "y@later.test")
    assert _listed(node, "--state", "held") == [mid]


def test_hold_and_release_by_filter(node: NodeProcess) -> None:
    mine = [submit(node, [f"f{i}@held.test"], 20 + i, sender="filter@ok.test")
            for i in range(2)]
    theirs = submit(node, ["g@held.test"], 22, sender="other@ok.test")
    _wait_deferred(node, *mine, theirs)

    res = ctl(node, "queue", "hold")
    assert res.returncode == 2 and "needs a filter" in res.stderr
    assert _http(node, "POST", "/api/v1/queue/hold", {})[0] == 400
    done = ctl_json(node, "queue", "hold", "--sender", "filter@ok.test")
    assert (done["matched"], done["messages"], done["nodes"]) == (2, 2, 1)
    assert _listed(node, "--state", "held") == sorted(mine)
    assert _listed(node, "--state", "deferred") == [theirs]
    again = ctl_json(node, "queue", "hold", "--sender", "filter@ok.test")
    assert (again["matched"], again["messages"]) == (2, 0)  # held already
    human = ctl(node, "queue", "release", "--state", "held")
    assert human.returncode == 0 and "released 2 of 2 matching" in human.stdout
    assert _listed(node, "--state", "held") == []


def test_retry_tries_one_message_now(node: NodeProcess, sink: Sink) -> None:
    mid = submit(node, ["r@later.test"], 30)
    _wait_deferred(node, mid)
    assert not _delivered(sink, "r@later.test")
    answer = ctl_json(node, "message", "retry", mid)
    assert answer["result"] in ("scheduled", "in_flight") and answer["id"] == mid
    wait_until_sync(lambda: _delivered(sink, "r@later.test"), 30, "the retried message")
    assert ctl(node, "message", "retry", "01KAQZZZZZ0000000000000000").returncode == 1


# --- delete and bounce by filter ---------------------------------------------------------


def test_delete_ends_a_message_without_a_dsn(node: NodeProcess, sink: Sink) -> None:
    one = submit(node, ["d1@held.test", "d2@held.test", "ok1@ok.test"], 40,
                 sender="del@ok.test")
    two = [submit(node, [f"e{i}@held.test"], 41 + i, sender="del2@ok.test") for i in range(2)]
    keep = submit(node, ["k@held.test"], 43, sender="keep@ok.test")
    _wait_deferred(node, one, *two, keep)

    answer = ctl_json(node, "message", "delete", one)
    assert answer == {"id": one, "node": "test-node", "deleted_recipients": 2}
    records = _records(node.workdir, "AdminDelete", one)
    assert sorted(r["recipient"] for r in records) == ["d1@held.test", "d2@held.test"]
    assert all(r["sender"] == "del@ok.test" for r in records)
    assert not _records(node.workdir, "AdminBounce", one)
    assert ctl(node, "message", "show", one).returncode == 1
    # No DSN was queued: it would be a Reception from the null sender, written before the
    # delete's reply.
    assert not [r for r in _accounting(node.workdir)
                if r["type"] == "Reception" and r["sender"] == ""]

    asked = ctl(node, "queue", "delete", "--sender", "del2@ok.test")
    assert asked.returncode == 1 and "2 message(s) match" in asked.stdout
    assert "--yes" in asked.stdout and sorted(_listed(node)) == sorted([*two, keep])
    done = ctl(node, "queue", "delete", "--sender", "del2@ok.test", "--yes")
    assert done.returncode == 0 and "deleted 2 of 2 matching" in done.stdout
    assert _listed(node) == [keep]
    assert all(_records(node.workdir, "AdminDelete", m) for m in two)

    _restart(node)  # the DONE records are in the spool: nothing comes back
    assert _listed(node) == [keep]
    assert not [r for r in _accounting(node.workdir)
                if r["type"] == "Reception" and r["sender"] == ""]


def test_bounce_by_filter_needs_yes_and_sends_dsns(node: NodeProcess, sink: Sink) -> None:
    old = [submit(node, [f"b{i}@held.test"], 50 + i, sender="bnc@ok.test") for i in range(2)]
    keep = submit(node, ["k2@held.test"], 52, sender="stay@ok.test")
    _wait_deferred(node, *old, keep)

    asked = ctl(node, "queue", "bounce", "--sender", "bnc@ok.test")
    assert asked.returncode == 1 and "2 message(s) match" in asked.stdout
    dry = json.loads(ctl(node, "--json", "queue", "bounce", "--sender", "bnc@ok.test").stdout)
    assert dry["dry_run"] and dry["matched"] == 2 and dry["messages"] == 0
    assert len(_listed(node)) == 3
    assert ctl(node, "queue", "bounce", "--sender", "bnc@ok.test", "--older-than",
               "1h", "--yes").stdout.startswith("bounced 0 of 0")
    done = ctl_json(node, "queue", "bounce", "--sender", "bnc@ok.test", "--yes")
    assert (done["matched"], done["messages"], done["recipients"]) == (2, 2, 2)
    assert _listed(node) == [keep]
    assert all(_records(node.workdir, "AdminBounce", m) for m in old)
    wait_until_sync(lambda: _delivered(sink, "bnc@ok.test"), 30, "the DSN to the sender")


def test_queue_by_tenant_and_campaign_and_a_cancelled_campaign(node: NodeProcess,
                                                                 sink: Sink) -> None:
    spring = [submit(node, [f"s{i}@held.test"], 60 + i, sender="shop@ok.test",
                     extra_headers="X-MTA-Tenant: acme\r\nX-MTA-Campaign: spring\r\n")
              for i in range(2)]
    other = submit(node, ["o@held.test"], 62, sender="shop@ok.test",
                   extra_headers="X-MTA-Tenant: acme\r\nX-MTA-Campaign: autumn\r\n")
    plain = submit(node, ["p@held.test"], 63)
    _wait_deferred(node, *spring, other, plain)

    summary = ctl_json(node, "queue")
    rows = {(t["tenant"], t["campaign"]): t["messages"] for t in summary["tenants"]}
    assert rows == {("acme", "spring"): 2, ("acme", "autumn"): 1}, summary["tenants"]
    table = ctl(node, "queue").stdout
    assert "TENANT" in table and "spring" in table and "autumn" in table
    assert sorted(_listed(node, "--tenant", "acme")) == sorted([*spring, other])
    assert _listed(node, "--tenant", "") == [plain]
    assert ctl(node, "queue", "list", "--campaign", "bad name").returncode != 0

    # Suspending a tenant is cluster-wide state, shown with the other suspensions.
    assert ctl(node, "suspend", "--tenant", "acme").returncode == 0
    assert "tenant:acme" in ctl_json(node, "throttle", "show")["suspended"]
    assert ctl(node, "suspend", "--tenant", "bad name").returncode != 0
    assert ctl(node, "resume", "--tenant", "acme").returncode == 0
    assert ctl(node, "resume", "--tenant", "acme").returncode != 0  # not suspended: said
    flushed = ctl_json(node, "flush", "--campaign", "autumn")
    assert flushed["rescheduled"] == 1, flushed

    done = ctl_json(node, "queue", "bounce", "--campaign", "spring", "--yes")
    assert (done["matched"], done["messages"]) == (2, 2)
    assert sorted(_listed(node)) == sorted([other, plain])
    for mid in spring:
        [rec] = _records(node.workdir, "AdminBounce", mid)
        assert (rec["tenant"], rec["campaign"]) == ("acme", "spring"), rec


# --- cluster-wide ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdServer,
            sink: Sink) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("qtools"), etcd, enabled=True,
                smarthost=f"127.0.0.1:{sink.port}", retry_initial="1h", retry_max="2h",
                idle_timeout="1s")
    try:
        for n in ("n1", "n2"):
            c.start_node(n)
        c.wait(c.settled({"n1", "n2"}), 30, "2 nodes settled")
        yield c
    finally:
        c.stop()


def test_queue_tools_span_a_two_node_cluster(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes["n1"], cluster.nodes["n2"]
    ids = {name: [submit(node, [f"{name}{i}@held.test"], 60 + i, sender="cl@ok.test")
                  for i in range(2)] for name, node in (("n1", n1), ("n2", n2))}
    for name, node in (("n1", n1), ("n2", n2)):
        _wait_deferred(node, *ids[name])
    every = sorted(ids["n1"] + ids["n2"])

    listed = ctl_json(n1, "queue", "list", "--sender", "cl@ok.test")
    assert [m["id"] for m in listed["messages"]] == every
    assert sorted(listed["nodes"]) == ["n1", "n2"] and listed["unreachable"] == []
    assert {m["node"] for m in listed["messages"]} == {"n1", "n2"}
    assert _listed(n2, "--local", "--sender", "cl@ok.test") == sorted(ids["n2"])
    seen, cursor = [], None
    for _ in range(5):
        page = ctl_json(n2, "queue", "list", "--sender", "cl@ok.test", "--limit", "1",
                        *(["--cursor", cursor] if cursor else []))
        seen += [m["id"] for m in page["messages"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == every

    held = ctl_json(n1, "queue", "hold", "--sender", "cl@ok.test")
    assert (held["matched"], held["messages"], held["nodes"]) == (4, 4, 2)
    assert _listed(n2, "--state", "held", "--sender", "cl@ok.test") == every
    # By id, on whichever node is asked: forwarded to the owner.
    theirs = ids["n2"][0]
    shown = ctl_json(n1, "message", "show", theirs, "--headers", "--max-bytes", "5")
    assert shown["node"] == "n2" and shown["held"] and shown["content"]["text"] == "Recei"
    assert ctl_json(n1, "message", "release", theirs)["node"] == "n2"
    assert not ctl_json(n2, "message", "show", theirs)["held"]

    gone = ctl_json(n2, "queue", "delete", "--sender", "cl@ok.test", "--yes")
    assert (gone["matched"], gone["messages"], gone["recipients"]) == (4, 4, 4)
    assert _listed(n1, "--sender", "cl@ok.test") == []
    for name, node in (("n1", n1), ("n2", n2)):
        assert all(_records(node.workdir, "AdminDelete", m) for m in ids[name])


def test_a_hold_or_release_that_changes_nothing_fails_and_says_so(node: NodeProcess) -> None:
    mid = submit(node, ["n@later.test"], 40, sender="noop@ok.test")
    _wait_deferred(node, mid)
    # Releasing what is not held: exit 1, said on stderr, nothing on stdout.
    for json_flag in ((), ("--json",)):
        res = ctl(node, *json_flag, "message", "release", mid)
        assert (res.returncode, res.stdout) == (1, ""), res
        assert res.stderr == f"mtactl: {mid} was not held\n", res.stderr
    assert ctl_json(node, "message", "hold", mid)["changed"]
    for json_flag in ((), ("--json",)):
        res = ctl(node, *json_flag, "message", "hold", mid)
        assert (res.returncode, res.stdout) == (1, ""), res
        assert res.stderr == f"mtactl: {mid} was already held\n", res.stderr
    assert _listed(node, "--state", "held") == [mid]
    released = ctl(node, "message", "release", mid)
    assert released.returncode == 0 and f"{mid} released" in released.stdout
    again = ctl(node, "message", "release", mid)
    assert again.returncode == 1 and "not held" in again.stderr
    assert _listed(node, "--state", "held") == []
