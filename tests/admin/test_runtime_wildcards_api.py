"""Suspensions and throttles by wildcard and by site, over HTTP and through mtactl, against
node processes that deliver (through a real DNS server on loopback) to real SMTP sinks:
bad keys are refused with a 400 naming the problem, held mail waits without an attempt and
goes out on resume, and the queue and ``throttle show`` say what holds what. The last test
sets a wildcard suspension on one node of a two-node cluster and sees it hold mail on the
other.

retry_initial is 30 s: what a test sees delivered after a resume went because the resume
released it, not because a retry came round."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    DNSServer,
    EtcdServer,
    NodeProcess,
    Sink,
    ctl,
    ctl_json,
    free_port_on,
    node_config,
    read_accounting,
    submit,
    wait_until_sync,
)
from tests.support.cluster import Cluster

SHARED_MX = "mx1.shared.test"


def _zone() -> dict[str, Any]:
    mx = {"MX": [(10, "mx.example.test")]}
    shared = {"MX": [(10, SHARED_MX)]}
    return {"example.test": mx, "a.example.test": mx, "b.example.test": mx,
            "mx.example.test": {"A": ["127.0.0.2"]},
            "one.test": shared, "two.test": shared, SHARED_MX: {"A": ["127.0.0.2"]},
            "other.test": {"MX": [(10, "mx.other.test")]},
            "three.test": {"MX": [(10, "mx.other.test")]},
            "mx.other.test": {"A": ["127.0.0.3"]}}


class Net:
    """The DNS server and the two sinks every test here delivers to."""

    def __init__(self) -> None:
        self.port = free_port_on("127.0.0.2", "127.0.0.3")
        self.dns = DNSServer(_zone())
        self.sinks = [Sink("127.0.0.2", self.port), Sink("127.0.0.3", self.port)]
        for sink in self.sinks:
            sink.start()

    def delivery(self, work: Path) -> dict[str, Any]:
        return {"enabled": True, "nameservers": [f"127.0.0.1:{self.dns.port}"],
                "mx_port": self.port, "retry_initial": "30s", "retry_max": "1m",
                "idle_timeout": "1s", "accounting_log": str(work / "acct.jsonl")}

    def delivered(self) -> set[str]:
        out: set[str] = set()
        for sink in self.sinks:
            with sink.lock:
                out.update(r for m in sink.messages for r in m.recipients)
        return out

    def close(self) -> None:
        for sink in self.sinks:
            sink.stop()
        self.dns.close()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


@pytest.fixture
def node(tmp_path: Path, net: Net) -> Iterator[NodeProcess]:
    proc = NodeProcess(tmp_path, node_config(tmp_path / "spool",
                                             delivery=net.delivery(tmp_path))).start()
    yield proc
    proc.kill()


def _http(node: NodeProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{node.admin_port}{path}", method="POST",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer t0ken", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _domains(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {d["domain"]: d for d in ctl_json(node, "queue")["domains"]}


def _held_by(node: NodeProcess, domain: str) -> str | None:
    return _domains(node).get(domain, {}).get("held_by")


def _deferrals(work: Path) -> list[dict[str, Any]]:
    return [r for r in read_accounting(work / "acct.jsonl") if r["type"] == "TransientFailure"]


def _attempts(node: NodeProcess, mid: str) -> int:
    return int(ctl_json(node, "message", "show", mid)["attempts"])


@pytest.mark.parametrize(("path", "body", "problem"), [
    ("/api/v1/suspend", {"domain": "a.*.example.com"}, "at the start only"),
    ("/api/v1/suspend", {"domain": "*example.com"}, "at the start only"),
    ("/api/v1/suspend", {"domain": "*.*.example.com"}, "at the start only"),
    ("/api/v1/suspend", {"domain": "*."}, "not a domain: '*.'"),
    ("/api/v1/suspend", {"domain": "*"}, "at the start only"),
    ("/api/v1/suspend", {"domain": "*.[192.0.2.1]"}, "not an address literal"),
    ("/api/v1/suspend", {"domain": "mx1.example.net:25"}, "host:port names a site"),
    ("/api/v1/suspend", {"domain": "bad domain.test"}, "not a domain: 'bad domain.test'"),
    ("/api/v1/suspend", {"domain": "x.test", "site": "mx.test"}, "not both"),
    ("/api/v1/suspend", {"site": "mx1.test,mx2.test"}, "one host per site key"),
    ("/api/v1/suspend", {"site": "mx1.example.net:99999"}, "port out of range"),
    ("/api/v1/suspend", {"site": "mx1.*.example.net"}, "at the start only"),
    ("/api/v1/suspend", {"site": ""}, "site: expected a string"),
    ("/api/v1/suspend", {}, "expected {\"domain\""),
    ("/api/v1/resume", {"domain": "a.*.example.com"}, "at the start only"),
    ("/api/v1/throttles", {"key": "a.*.example.com", "spec": "1/s"}, "at the start only"),
    ("/api/v1/throttles", {"key": "relay.test:2525", "spec": "1/s"}, "host:port names a site"),
    ("/api/v1/throttles", {"site": "*.x.test:0", "spec": "1/s"}, "port out of range"),
    ("/api/v1/throttles", {"spec": "1/s"}, "expected {\"key\""),
])
def test_bad_keys_are_refused_with_a_400_naming_the_problem(
        node: NodeProcess, path: str, body: dict[str, Any], problem: str) -> None:
    status, answer = _http(node, path, body)
    assert status == 400, answer
    assert problem in answer["error"], answer
    assert answer["hint"]
    assert ctl_json(node, "throttle", "show")["suspended"] == []
    assert ctl_json(node, "throttle", "show")["runtime"] == {}


def test_a_tenant_throttle_is_set_shown_and_cleared(node: NodeProcess) -> None:
    res = ctl(node, "throttle", "set", "--tenant", "acme", "5/s")
    assert res.returncode == 0 and "throttle for tenant acme set to 5/s" in res.stdout, res
    assert ctl_json(node, "throttle", "show")["runtime"] == {"tenant:acme": 5.0}
    shown = ctl(node, "throttle", "show").stdout
    assert re.search(r"tenant:acme\s+5\.000\s+runtime, tenant", shown), shown
    res = ctl(node, "throttle", "set", "--tenant", "not a name", "5/s")
    assert res.returncode == 1 and "a tenant is 1-64 letters" in res.stderr, res.stderr
    assert ctl(node, "throttle", "set", "--tenant", "--site", "x", "5/s").returncode == 2
    status, answer = _http(node, "/api/v1/throttles", {"campaign": "spring", "spec": "1/s"})
    assert status == 400 and "campaign has no throttle" in answer["error"], answer
    status, answer = _http(node, "/api/v1/throttles", {"tenant": "a", "key": "b.test",
                                                      "spec": "1/s"})
    assert status == 400, answer
    assert ctl(node, "throttle", "clear", "--tenant", "acme").returncode == 0
    assert ctl_json(node, "throttle", "show")["runtime"] == {}


def test_mtactl_exit_codes_for_wildcard_and_site_keys(node: NodeProcess) -> None:
    res = ctl(node, "suspend", "mx1.example.net:25")
    assert res.returncode == 1 and "host:port names a site" in res.stderr, res.stderr
    res = ctl(node, "suspend", "--site", "mx1.example.net:25")
    assert res.returncode == 0, res.stderr
    assert "suspended domains: site:mx1.example.net:25" in res.stdout
    res = ctl(node, "resume", "site:mx1.example.net:25")  # as the answers show it
    assert res.returncode == 0, res.stderr
    assert ctl(node, "suspend").returncode == 2  # no KEY: a usage error
    res = ctl(node, "throttle", "show", "--site")
    assert res.returncode == 2 and "takes no KEY, --site or --tenant" in res.stderr
    assert ctl(node, "throttle", "set", "--site", "*.x.test").returncode == 2  # no SPEC
    res = ctl(node, "throttle", "set", "*.x.*.test", "5/s")
    assert res.returncode == 1 and "at the start only" in res.stderr


def test_wildcard_suspension_holds_subdomains_until_resumed(node: NodeProcess, net: Net
                                                            ) -> None:
    res = ctl(node, "suspend", "*.Example.TEST")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("suspended *.Example.TEST; suspended domains: "
                                  "*.example.test")
    assert ctl(node, "throttle", "set", "*.example.test", "10/s").returncode == 0
    assert ctl(node, "throttle", "set", "b.example.test", "2/s").returncode == 0
    held = [submit(node, ["x@a.example.test"], 0), submit(node, ["y@b.example.test"], 1)]
    submit(node, ["p@example.test", "q@other.test"], 2)
    wait_until_sync(lambda: {"p@example.test", "q@other.test"} <= net.delivered(), 15,
                    "mail nothing holds (example.test itself is not under the wildcard)")
    wait_until_sync(lambda: _held_by(node, "a.example.test") == "*.example.test"
                    and _held_by(node, "b.example.test") == "*.example.test", 10,
                    "both subdomains shown held by the wildcard")
    domains = _domains(node)
    assert domains["a.example.test"]["suspended"] and domains["a.example.test"]["throttle"] \
        == 10.0
    assert domains["b.example.test"]["throttle"] == 2.0  # exact beats the wildcard
    text = ctl(node, "queue").stdout
    assert "held (*.example.test)" in text and "10/s" in text, text
    shown = ctl(node, "throttle", "show").stdout
    assert "*.example.test" in shown and "domain (wildcard)" in shown, shown
    # A subdomain cannot be resumed alone: the answer names what holds it.
    res = ctl(node, "resume", "a.example.test")
    assert res.returncode == 1 and "held by *.example.test" in res.stderr, res.stderr
    assert not {"x@a.example.test", "y@b.example.test"} & net.delivered()
    assert [_attempts(node, mid) for mid in held] == [0, 0]
    assert ctl(node, "resume", "*.example.test").returncode == 0
    wait_until_sync(lambda: {"x@a.example.test", "y@b.example.test"} <= net.delivered(), 5,
                    "the held mail, released by the resume")
    assert _deferrals(node.workdir) == []
    res = ctl(node, "resume", "*.example.test")  # never suspended now: refused
    assert res.returncode == 1 and "is not suspended" in res.stderr
    assert ctl(node, "throttle", "clear", "*.example.test").returncode == 0
    assert ctl(node, "throttle", "clear", "*.example.test").returncode == 1
    assert ctl_json(node, "throttle", "show")["runtime"] == {"b.example.test": 2.0}


def test_site_suspension_holds_every_domain_routed_to_it(node: NodeProcess, net: Net
                                                          ) -> None:
    res = ctl(node, "suspend", "--site", SHARED_MX.upper())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"suspended site {SHARED_MX.upper()}; suspended domains: "
                                  f"site:{SHARED_MX}")
    assert ctl(node, "throttle", "set", "--site", "*.shared.test", "5/s").returncode == 0
    held = [submit(node, ["a@one.test"], 0), submit(node, ["b@two.test"], 1)]
    submit(node, ["c@three.test"], 2)
    wait_until_sync(lambda: "c@three.test" in net.delivered(), 15, "three.test's mail")
    key = f"site:{SHARED_MX}"
    wait_until_sync(lambda: _held_by(node, "one.test") == key
                    and _held_by(node, "two.test") == key, 10,
                    "both domains shown held by the site")
    [site] = [s for s in ctl_json(node, "queue")["sites"] if s["site"] == SHARED_MX]
    assert site["held_by"] == key and site["rate"] == 5.0
    text = ctl(node, "queue").stdout
    assert f"held ({key})" in text, text
    shown = ctl(node, "throttle", "show").stdout
    assert "site:*.shared.test" in shown and "site (wildcard)" in shown, shown
    assert not {"a@one.test", "b@two.test"} & net.delivered()
    assert [_attempts(node, mid) for mid in held] == [0, 0]
    assert ctl(node, "resume", "--site", SHARED_MX).returncode == 0
    wait_until_sync(lambda: {"a@one.test", "b@two.test"} <= net.delivered(), 5,
                    "the held mail, released by the resume")
    assert _deferrals(node.workdir) == []
    assert ctl(node, "resume", "--site", SHARED_MX).returncode == 1
    assert ctl(node, "throttle", "clear", "site:*.shared.test").returncode == 0
    assert ctl_json(node, "throttle", "show")["runtime"] == {}


def test_a_wildcard_suspended_on_one_node_holds_mail_on_the_other(
        tmp_path: Path, etcd: EtcdServer, net: Net) -> None:
    cluster = Cluster(tmp_path, etcd, **net.delivery(tmp_path))
    try:
        a, b = cluster.start_node("n1"), cluster.start_node("n2")
        assert ctl(a, "suspend", "*.example.test").returncode == 0
        wait_until_sync(lambda: ctl_json(b, "throttle", "show")["suspended"]
                        == ["*.example.test"], 10, "the suspension seen on n2")
        mids = [submit(b, [f"x{n}@a.example.test"], n) for n in range(4)]
        submit(b, ["q@other.test"], 9)
        wait_until_sync(lambda: "q@other.test" in net.delivered(), 15, "other.test's mail")
        # The shards of the four messages spread over both nodes: each holds its own.
        wait_until_sync(lambda: _held_by(b, "a.example.test") == "*.example.test"
                        and _domains(b)["a.example.test"]["messages"] == 4, 10,
                        "a.example.test held cluster-wide")
        assert not any(r.endswith("@a.example.test") for r in net.delivered())
        assert [_attempts(b, mid) for mid in mids] == [0] * 4
        assert ctl(b, "resume", "*.example.test").returncode == 0
        wait_until_sync(lambda: {f"x{n}@a.example.test" for n in range(4)} <= net.delivered(),
                        10, "the held mail after the resume on n2")
    finally:
        cluster.stop()
