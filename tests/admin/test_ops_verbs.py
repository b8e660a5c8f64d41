"""Every mtactl verb end to end against a real standalone node that delivers to a real sink:
human and --json output, exit codes, and what each verb really did to the mail.

Each test has a node of its own, so the counts it sees are exactly its own mail's, whatever
ran before it."""

from __future__ import annotations

import json
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    NodeProcess,
    Sink,
    ctl,
    ctl_json,
    node_config,
    read_accounting,
    submit,
    toml_dumps,
)
from tests.support import wait_until_sync as wait_for

SHARDS = 4


def _raw(work: Path, sink: Sink, **extra: dict[str, Any]) -> dict[str, Any]:
    sections: dict[str, dict[str, Any]] = {
        "spool": {"shards": SHARDS},
        "delivery": {"enabled": True, "smarthost": f"127.0.0.1:{sink.port}",
                     "retry_initial": "1h", "retry_max": "2h", "idle_timeout": "1s",
                     "accounting_log": str(work / "acct.jsonl")},
        "probe": {"recipient": "probe@ok.test", "timeout": "20s"},
        "slo": {"sample_interval": "200ms"}}
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return node_config(work / "spool", **sections)


@pytest.fixture
def node(tmp_path: Path, sink: Sink) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path, _raw(tmp_path, sink)).start()
    yield proc
    proc.kill()


def accounting(node: NodeProcess) -> list[dict[str, Any]]:
    return read_accounting(node.workdir / "acct.jsonl")


def deferred(node: NodeProcess, mid: str) -> bool:
    return any(r["type"] == "TransientFailure" and r["message_id"] == mid
               for r in accounting(node))


def test_queue_and_message_show_report_what_waits(node: NodeProcess) -> None:
    ids = [submit(node, ["a@held.test", "b@ok.test"], 1), submit(node, ["c@held.test"], 2),
           submit(node, ["d@held.test"], 3)]
    wait_for(lambda: all(deferred(node, m) for m in ids), what="three deferrals")

    q = ctl_json(node, "queue")
    held = next(d for d in q["domains"] if d["domain"] == "held.test")
    assert held["messages"] == 3 and held["in_flight"] == 0 and not held["suspended"]
    assert held["next_attempt"] > time.time() + 600  # retry_initial is an hour
    assert held["site"].startswith("smarthost:127.0.0.1:")
    site = next(s for s in q["sites"] if s["site"] == held["site"])
    assert site["breaker"] == "closed"
    assert q["total"] == 3 and q["nodes"] == ["test-node"] and q["unreachable"] == []
    # b@ok.test was delivered: a domain with nothing pending is not in the queue.
    assert all(d["domain"] != "ok.test" for d in q["domains"]), q["domains"]
    human = ctl(node, "queue")
    assert human.returncode == 0
    assert re.search(r"held\.test\s+3\s+0\s+\S+\s+in ", human.stdout), human.stdout
    assert "SITE" in human.stdout and "closed" in human.stdout

    m = ctl_json(node, "message", "show", ids[0])
    assert m["id"] == ids[0] and m["sender"] == "app@ok.test" and m["attempts"] == 1
    status = {r["address"]: r["status"] for r in m["recipients"]}
    assert status == {"a@held.test": "pending", "b@ok.test": "delivered"}
    assert "451 4.7.1 Greylisted" in m["last_reply"]
    assert "Subject: test 1" in m["headers"]
    human = ctl(node, "message", "show", ids[0].lower())
    assert human.returncode == 0 and "a@held.test" in human.stdout and "pending" in human.stdout


def test_message_bounce_by_id_and_by_domain_sends_dsns(node: NodeProcess, sink: Sink) -> None:
    one = submit(node, ["x@held.test", "y@held.test"], 10)
    two = submit(node, ["z@held.test", "w@other.test"], 11)
    wait_for(lambda: deferred(node, one) and deferred(node, two), what="deferrals")
    before = len(sink.messages)

    res = ctl(node, "message", "bounce", one)
    assert res.returncode == 0 and "bounced 2 pending recipient(s)" in res.stdout, res.stdout
    gone = ctl(node, "message", "show", one)
    assert gone.returncode == 1 and f"no live message {one}" in gone.stderr
    bounces = [r for r in accounting(node)
               if r["type"] == "AdminBounce" and r["message_id"] == one]
    assert {r["recipient"] for r in bounces} == {"x@held.test", "y@held.test"}
    assert all("bounced by the administrator" in r["response"] for r in bounces)

    data = ctl_json(node, "message", "bounce", "--domain", "held.test")
    # Of two, z@held.test was pending; w@other.test was delivered at the first attempt.
    assert data == {"domain": "held.test", "messages": 1, "bounced_recipients": 1,
                    "unreachable": []}
    # two's other.test recipient was delivered at the first attempt: the message is done.
    assert ctl(node, "message", "show", two).returncode == 1
    q = ctl_json(node, "queue")
    assert all(d["domain"] != "held.test" for d in q["domains"]), q["domains"]
    # The senders (at ok.test) get their DSNs through the same smarthost.
    dsns = wait_for(lambda: [m for m in sink.messages[before:] if m.sender == "<>"] or None,
                    what="DSNs at the sink")
    assert b"bounced by the administrator" in dsns[0].content


def test_flush_retries_a_domain_now(node: NodeProcess, sink: Sink) -> None:
    mid = submit(node, ["later@later.test"], 20)
    wait_for(lambda: deferred(node, mid), what="a deferral")
    data = ctl_json(node, "flush", "--domain", "later.test")
    assert data["rescheduled"] == 1 and data["nodes"] == 1
    wait_for(lambda: any(r["type"] == "Delivery" and r["message_id"] == mid
                         for r in accounting(node)), what="delivery after flush")
    assert ctl(node, "flush").returncode == 0


def test_probe_measures_end_to_end_and_exports_metrics(node: NodeProcess, sink: Sink) -> None:
    data = ctl_json(node, "probe")
    assert data["ok"] and data["stage"] == "done" and data["total_seconds"] > 0
    assert data["submit_seconds"] <= data["total_seconds"]
    got = [m for m in sink.messages if "probe@ok.test" in m.recipients]
    assert got and b"X-Mta-Probe:" in got[-1].content
    human = ctl(node, "probe")
    assert human.returncode == 0 and "probe delivered to probe@ok.test" in human.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics") as resp:
        metrics = resp.read().decode()
    assert "mta_probe_success 1.0" in metrics
    assert 'mta_probes_total{result="success"} 2.0' in metrics  # the two runs above


def test_slo_report_in_both_modes(node: NodeProcess) -> None:
    mid = submit(node, ["s@ok.test", "s@held.test"], 30)  # one delivered, one greylisted
    wait_for(lambda: deferred(node, mid), what="the greylisted recipient deferred")
    # The report samples the counters every 200 ms: wait until it has seen both outcomes.
    # A minute that begins before the tracker's first sample in it counts as unavailable
    # for that instant, so wait for the figure of a node that was ready all along.
    data = wait_for(lambda: (d := ctl_json(node, "slo", "--window", "1h"))["delivered"] >= 1
                    and d["deferred"] >= 1 and d["checks"]["availability"]["value"] == 1.0
                    and d, what="SLO counts")
    assert (data["submitted"], data["delivered"], data["deferred"], data["failed"]) == (1, 1, 1, 0)
    checks = data["checks"]
    assert checks["availability"] == {"value": 1.0, "objective": 0.999, "met": True}
    assert checks["submit_p99_seconds"]["value"] is not None
    assert checks["delivery_success"] == {"value": 1.0, "objective": 0.999, "met": True}
    assert data["deferral_rate"] == 0.5  # one of two attempts: s@held.test was greylisted
    human = ctl(node, "slo")
    assert human.returncode == 0 and "availability" in human.stdout
    assert "delivery success" in human.stdout
    bad = ctl(node, "slo", "--window", "1y")
    assert bad.returncode == 1 and "window" in bad.stderr
    # The history is saved every few ticks (and at a graceful stop), not at each report.
    wait_for(lambda: list((node.workdir / "spool").glob("slo-test-node.json")),
             what="the SLO history saved in the spool")


def test_standalone_cluster_verbs(node: NodeProcess) -> None:
    nodes = ctl_json(node, "nodes")["nodes"]
    assert [(n["node"], n["leader"], n["shards"]) for n in nodes] == [("test-node", True, SHARDS)]
    assert nodes[0]["admin"] == f"http://127.0.0.1:{node.admin_port}"
    assert "test-node" in ctl(node, "nodes").stdout
    shards = ctl_json(node, "shards")
    assert shards["unowned"] == 0 and {s["owner"] for s in shards["shards"]} == {"test-node"}
    assert f"{SHARDS} of {SHARDS} shards owned" in ctl(node, "shards").stdout
    res = ctl(node, "drain", "test-node")
    assert res.returncode == 1 and "needs a cluster" in res.stderr and "standalone" in res.stderr
    res = ctl(node, "rebalance")
    assert res.returncode == 1 and "needs a cluster" in res.stderr


def test_bad_ids_and_usage_get_clear_answers(node: NodeProcess) -> None:
    res = ctl(node, "message", "show", "nonsense")
    assert res.returncode == 1 and "26 characters" in res.stderr
    res = ctl(node, "message", "show", "01KAQZZZZZ0000000000000000")
    assert res.returncode == 1 and "no live message" in res.stderr
    res = ctl(node, "message", "bounce")
    assert res.returncode == 2 and "message ID or --domain" in res.stderr
    res = ctl(node, "queue", "--limit", "many")
    assert res.returncode == 2 and "invalid int value" in res.stderr


def test_mtactl_reads_url_and_token_from_the_node_config(node: NodeProcess) -> None:
    res = subprocess.run([sys.executable, "-m", "mta.cli.ctl", "--config",
                          str(node.config_path), "--json", "status"],
                         capture_output=True, text=True, timeout=30, env={"PATH": ""})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["node"] == "test-node"
    res = subprocess.run([sys.executable, "-m", "mta.cli.ctl", "--config", "/nonexistent.toml",
                          "status"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "/nonexistent.toml" in res.stderr


def test_sighup_reloads_throttles_and_keeps_serving_on_a_bad_file(
        tmp_path: Path, sink: Sink) -> None:
    raw = _raw(tmp_path, sink)
    proc = NodeProcess(tmp_path, raw).start()
    try:
        assert ctl_json(proc, "throttle", "show")["configured"] == {}
        raw["delivery"]["domains"] = {"gmail.com": {"rate": "36000/h"}}
        raw["smtp"]["listen"] = f"127.0.0.1:{proc.smtp_port}"
        raw["admin"]["listen"] = f"127.0.0.1:{proc.admin_port}"
        proc.config_path.write_text(toml_dumps(raw))
        proc.signal(signal.SIGHUP)
        wait_for(lambda: ctl_json(proc, "throttle", "show")["configured"] == {"gmail.com": 10.0},
                 what="the reloaded throttle")
        with smtplib.SMTP("127.0.0.1", proc.smtp_port, timeout=10) as smtp:
            smtp.noop()  # a session opened before the next reload...
            proc.config_path.write_text("[delivery\nbroken")
            proc.signal(signal.SIGHUP)
            wait_for(lambda: "node.reload_failed" in proc.log(), what="reload_failed in the log")
            assert smtp.noop()[0] == 250  # ...survives it
        assert ctl_json(proc, "throttle", "show")["configured"] == {"gmail.com": 10.0}
        assert proc.proc is not None and proc.proc.poll() is None
    finally:
        proc.kill()


def test_sighup_reloads_users_and_tls_certificates(tmp_path: Path, sink: Sink) -> None:
    import ssl

    import trustme

    from mta.ingress.auth import hash_password

    def write_cert(ca: trustme.CA) -> bytes:
        cert = ca.issue_cert("mx.test.example")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "tls.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())

    def peer_cert() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", proc.smtp_port, timeout=10) as s:
            s.starttls(context=ctx)
            return s.sock.getpeercert(binary_form=True)

    def can_login(user: str, password: str) -> bool:
        with smtplib.SMTP("127.0.0.1", proc.smtp_port, timeout=10) as s:
            try:
                s.login(user, password)
                return True
            except smtplib.SMTPAuthenticationError:
                return False

    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('pw-a', ln=4)}\n")
    first = write_cert(trustme.CA())
    raw = _raw(tmp_path, sink, smtp={"users_file": str(users),
                                     "tls_cert": str(tmp_path / "tls.pem"),
                                     "tls_key": str(tmp_path / "key.pem")})
    proc = NodeProcess(tmp_path, raw).start()
    try:
        assert peer_cert() == first
        assert can_login("alice", "pw-a") and not can_login("bob", "pw-b")
        with smtplib.SMTP("127.0.0.1", proc.smtp_port, timeout=10) as old:
            old.ehlo("before.test")
            users.write_text(f"bob:{hash_password('pw-b', ln=4)}\n")
            second = write_cert(trustme.CA())
            proc.signal(signal.SIGHUP)
            wait_for(lambda: can_login("bob", "pw-b"), what="the reloaded users file")
            assert old.noop()[0] == 250  # the session opened before the reload goes on
        assert peer_cert() == second != first
        assert not can_login("alice", "pw-a")
    finally:
        proc.kill()


def test_periodic_probe_runs_by_itself(tmp_path: Path, sink: Sink) -> None:
    raw = _raw(tmp_path, sink, probe={"recipient": "periodic@ok.test", "interval": "300ms",
                                      "timeout": "10s"})
    proc = NodeProcess(tmp_path, raw).start()
    try:
        def probes() -> float:
            url = f"http://127.0.0.1:{proc.admin_port}/metrics"
            with urllib.request.urlopen(url) as resp:
                m = re.search(r'^mta_probes_total\{result="success"\} (\S+)$',
                              resp.read().decode(), re.M)
            return float(m.group(1)) if m else 0.0

        wait_for(lambda: probes() >= 3, what="three periodic probes")
        assert sum("periodic@ok.test" in m.recipients for m in sink.messages) >= 3
    finally:
        proc.kill()
