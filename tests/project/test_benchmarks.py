"""The benchmark harness itself: the load generator against the sink (every id accounted
for), the statistics, the generated report's verdicts and plots, and one tiny end-to-end run
of a scenario. Figures are not asserted: benchmarks measure, tests check behaviour."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import ROOT, Result, percentile, quantiles, summarize
from benchmarks.loadgen import Load, mean_size_kb, run_load, size_sampler
from benchmarks.report import render
from benchmarks.sink import Sink
from tests.support import free_port


def test_statistics() -> None:
    assert summarize([3.0, 1.0, 2.0, float("nan")]) == {"min": 1.0, "median": 2.0,
                                                          "max": 3.0, "n": 3}
    values = [float(i) for i in range(1, 1001)]
    assert percentile(values, 50) == 500.0
    assert percentile(values, 99) == 990.0
    assert percentile(values, 99.9) == 999.0
    cdf = quantiles(values)
    assert cdf[0][1] == 0.0 and cdf[-1] == [1000.0, 1.0]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(cdf))


def test_size_distributions() -> None:
    import random

    rng = random.Random(1)
    assert size_sampler("5")(rng) == 5 * 1024
    ranged = [size_sampler("2-64")(rng) for _ in range(2000)]
    assert min(ranged) >= 2 * 1024 and max(ranged) <= 64 * 1024
    mixed = [size_sampler("mix")(rng) for _ in range(5000)]
    assert abs(sum(mixed) / len(mixed) / 1024 - mean_size_kb("mix")) < 3


def test_loadgen_ids_all_reach_the_sink(tmp_path: Path) -> None:
    port = free_port()
    with Sink(tmp_path, port) as sink:
        ticks: list[int] = []
        res = run_load(port, Load(300, concurrency=6, procs=2, size="mix"), ticks.append)
        assert res.accepted == 300 and res.refused == 0 and res.errors == 0
        assert sum(ticks) == 300
        seen = sink.ids()
        assert set(seen) == set(res.ids) and len(res.ids) == 300
        assert sink.count == 300
        # Open loop at a fixed rate: latency counts from the scheduled time.
        res = run_load(port, Load(100, concurrency=4, procs=1, size="2", rate=400.0))
        assert res.accepted == 100 and len(res.latencies) == 100
        assert all(lat >= svc for lat, svc in zip(res.latencies, res.service, strict=True))
        assert len(sink.ids()) == 400


def _result(scenario: str, groups: list[tuple[dict, list[dict]]], **series: object) -> dict:
    r = Result(scenario, {"messages": 1000, "size": "5", "ttl": 2.0, "delivery": True})
    for labels, runs in groups:
        for run in runs:
            r.add(labels, run)
    r.series.update(series)
    data = json.loads(json.dumps(r.to_json()))
    data["file"] = f"{scenario}.json"
    data["dirty"] = False  # the test's own tree may have uncommitted changes
    return data


def test_report_verdicts_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    ingress = _result(
        "ingress",
        [({"target": "mta", "concurrency": c}, [{"msgs_per_s": 900.0 + c, "p50_ms": 2.0}])
         for c in (10, 50)]
        + [({"target": "postfix", "concurrency": c}, [{"msgs_per_s": 600.0}]) for c in (10, 50)],
        ratios=[{"what": "ingress", "labels": {"target": "mta", "concurrency": 50},
                 "ratio": 950 / 600}])
    recovery = _result("recovery", [({"messages": 1_000_000, "delivery": True},
                                     [{"seconds": s, "bytes_per_msg": 500.0}
                                      for s in (18.0, 19.0, 25.0)])])
    latency = _result("latency", [({"target": "mta", "offered": 500},
                                   [{"p99_ms": 5.0, "cdf_ms": [[1.0, 0.0], [2.0, 0.5],
                                                               [9.0, 1.0]]}])])
    failover = _result("failover", [({"ttl": 2.0}, [{
        "takeover": 2.1, "rto": 3.0, "lost": 0, "dupes": 1,
        "timeline": {"t": [-1.0, 0.0, 1.0], "acked_victim": [5.0, 0.0, 0.0],
                     "acked_survivors": [5.0, 5.0, 5.0], "delivered_victim": [0, 0, 4.0],
                     "delivered_survivors": [1.0, 1.0, 1.0]}}])])
    # A later result from a dirty tree, or with the profiler on, never judges a target.
    dirty = {**json.loads(json.dumps(ingress)), "dirty": True, "started": "9999"}
    dirty["series"]["ratios"][0]["ratio"] = 5.0
    profiled = json.loads(json.dumps(dirty))
    profiled.update(dirty=False, params={**profiled["params"], "profile": True})
    text = render([ingress, recovery, latency, failover, dirty, profiled], tmp_path / "plots")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ")}
    assert "**missed**" in rows["Durable ingress vs Postfix"]  # 1.58x < 2x
    assert "1.58x" in rows["Durable ingress vs Postfix"]
    assert "| met |" in rows["1M queued: recovery time"]  # median 19 s
    assert "19.00 (18.00-25.00)" in rows["1M queued: recovery time"]
    assert "not measured yet" in text  # relay, scale
    assert "### Where we miss" in text
    for png in ("ingress-concurrency.png", "latency-cdf.png", "failover-timeline.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000
        assert f"(plots/{png})" in text


def test_a_scenario_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "ingress", "--messages", "300",
         "--concurrency", "5", "--repeat", "1", "--peer", "none", "--no-save"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ingress mta c=5:"))
    assert float(line.split(":")[1].split()[0].replace(",", "")) > 0  # msg/s measured
    assert "saved" not in proc.stdout


def test_a_dkim_relay_run_delivers_signed_mail() -> None:
    """Issue 17: the mta-dkim target signs every message; the sink counts the signed ones and
    the sample's signature verifies with the run's key."""
    pytest.importorskip("dkim")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "relay", "--targets", "mta-dkim", "--messages",
         "200", "--concurrency", "5", "--repeat", "1", "--settle", "0", "--no-save"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "signed 200/200, sample signature verifies: True" in out, out[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("relay mta-dkim c=5:"))
    assert "lost 0" in line and "signed 200" in line


def test_report_dkim_section(tmp_path: Path) -> None:
    relay = _result("relay", [
        ({"target": "mta-dkim", "concurrency": 50},
         [{"msgs_per_s": 500.0, "node_cpu_us_per_msg": 1500.0, "signed": 1000,
           "sink_received": 1000, "sample_verified": True, "lost": 0}]),
        ({"target": "postfix", "concurrency": 50},
         [{"msgs_per_s": 400.0, "signed": 0, "sink_received": 1000, "lost": 0}]),
        ({"target": "mta", "concurrency": 50},
         [{"msgs_per_s": 1000.0, "node_cpu_us_per_msg": 600.0, "signed": 0,
           "sink_received": 1000, "lost": 0}])],
        ratios=[{"what": "relay-dkim", "labels": {"target": "mta-dkim", "concurrency": 50},
                 "ratio": 1.25}])
    relay["loadavg"] = {"start": [1.0, 2.0, 3.0], "end": [1.5, 2.0, 3.0]}
    text = render([relay], tmp_path / "plots")
    dkim = text.split("## DKIM signing (issue 17)", 1)[1]
    assert "| mta-dkim | 500 | 1,500 | 1.50 | 1,000 / 1,000, 1/1 samples verify | 0 |" in dkim
    assert "mta-dkim / Postfix **1.25x** (goal >= 2x: **missed**)" in dkim
    assert "**900 us of node CPU per message**" in dkim
    assert "1.00 / 2.00 / 3.00 at the start" in dkim
    row = next(x for x in text.splitlines() if x.startswith("| Relay, every message DKIM"))
    assert "**missed**" in row and "1.25x: mta-dkim 500" in row


def test_without_postfix_the_comparison_says_how_to_get_it(tmp_path: Path) -> None:
    # A PATH without /usr/sbin: no postfix binary. Never a made-up figure: exit 2 and say how.
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "compare", "--messages", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "apt-get install postfix" in proc.stderr
    assert "msg/s" not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "ingress", "--peer", "postfix",
                           "--no-save"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode != 0 and "apt-get install postfix" in proc.stderr


def test_partition_report_from_a_synthetic_run(tmp_path: Path) -> None:
    """The partition scenario's figures from a hand-made record: n1 is cut at t=100, fences at
    104, its lease expires at 105 and n2 claims its shard 1 at 105.2; heal at 110."""
    from benchmarks.partition import analyze, pick, possible

    cut, heal = 100.0, 110.0
    owners = {
        1: [[90.0, 104.9, "n1"], [105.0, 105.1, None], [105.2, 130.0, "n2"]],
        2: [[90.0, 130.0, "n3"]],
        # A gap in the polls (etcd unreadable 111-112): either side's owner is given the
        # benefit of the doubt.
        3: [[90.0, 111.0, "n2"], [112.0, 130.0, "n1"]],
    }
    presence = {"n1": [[90.0, 104.9, True], [105.0, 111.0, False], [111.2, 130.0, True]],
                "n2": [[90.0, 130.0, True]], "n3": [[90.0, 130.0, True]]}
    events = {"n1": [(104.0, "node.fenced", {"reason": "lease not refreshed"}),
                     (104.0, "cluster.fenced", {}), (111.0, "node.unfenced", {})],
              "n2": [(105.3, "cluster.shard_acquired", {"shard": 1})], "n3": []}
    acked = {i: ("n1", 95.0 + i) for i in range(1, 7)}
    acked[7] = ("n1", 111.5)  # n1 accepts again after the heal

    def d(i: int, node: str, shard: int, at: float) -> dict:
        return {"id": i, "node": node, "shard": shard, "data_at": at, "done_at": at + 0.3}

    deliveries = [
        d(1, "n1", 1, 99.0),  # before the cut: fine
        d(2, "n2", 1, 105.5),  # the new owner takes over: takeover 5.5 s
        d(2, "n1", 1, 106.0),  # the old owner, fenced and no longer owner: the bug
        d(3, "n3", 2, 101.0), d(3, "n3", 2, 102.0),  # the same node twice
        d(5, "n1", 3, 111.5),  # in the poll gap: n1 may own it (benefit of the doubt)
        d(6, "n2", 3, 111.6),  # in the poll gap: n2 may too
        d(7, "n1", 3, 112.5),  # n1 back as the owner
        # id 4 never arrives: lost
    ]
    r = analyze(acked, deliveries, owners, presence, events, cut, heal, ["n1"], 5.0)
    assert (r["acked"], r["delivered"], r["lost"], r["lost_ids"]) == (7, 6, 1, [4])
    assert r["duplicates"] == 2 and r["dupes_by_node"] == {"n1": 1, "n3": 1}
    assert (r["dupes_cross_node"], r["dupes_same_node"]) == (1, 1)
    assert r["non_owner"] == 1 and r["non_owner_by_node"] == {"n1": 1}
    assert r["while_fenced"] == 1 and r["victim_shards"] == 1
    assert r["fence"] == 4.0 and r["per_victim"]["n1"]["reason"] == "lease not refreshed"
    assert abs(r["expiry_minus_fence"] - 1.0) < 1e-9  # lease gone at 105: fenced 1 s before
    assert abs(r["claim_minus_fence"] - 1.2) < 1e-9  # n2's key first seen at 105.2
    assert abs(r["takeover"] - 5.5) < 1e-9 and r["shards_taken"] == 1
    assert abs(r["back"] - 1.5) < 1e-9 and abs(r["ack_back_all"] - 1.5) < 1e-9
    # A late fence is a negative margin; a fence never lifted covers every later delivery.
    late = {"n1": [(105.6, "node.fenced", {}), (105.5, "delivery.fenced", {})]}
    r2 = analyze(acked, deliveries, owners, presence, late, cut, heal, ["n1"], 5.0)
    assert r2["expiry_minus_fence"] == -0.5 and r2["claim_minus_fence"] < 0
    assert r2["while_fenced"] == 3
    assert possible([], 1.0) == {None}
    assert pick("pause") == ["pause", "pause+backlog"]
    assert pick("node-sink+backlog,backlog")[0] == "node-etcd+backlog"
    data = _result("partition", [({"scenario": "node-etcd", "ttl": 5.0}, [r])])
    text = render([data], tmp_path / "plots")
    row = next(line for line in text.splitlines() if "| node-etcd | 5.0 |" in line)
    assert "| 7 | 1 | 2 | 1 | 1 | 1 |" in row  # acked, lost, duplicates, by two, non-owner...


def test_partition_needs_root_and_iptables(tmp_path: Path) -> None:
    """No namespaces without root: one line, exit 2, nothing set up. As root, a PATH without
    iptables says how to install it."""
    import os

    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/nonexistent"}
    argv = ["benchmarks", "partition", "--quick"]
    root = os.geteuid() == 0
    if root:
        # Become nobody inside the interpreter (its binary may sit where nobody cannot exec
        # it), after importing what runs before the check.
        cmd = [sys.executable, "-c",
               "import os, runpy, sys, argparse, importlib, platform, benchmarks.harness, "
               "benchmarks.partition; "
               "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
               f"sys.argv = {argv!r}; runpy.run_module('benchmarks', run_name='__main__')"]
    else:
        cmd = [sys.executable, "-m", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("partition: needs root (network namespaces, veth pairs, "
                                   "iptables); run it as root")
    if not root:
        return
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "partition: iptables not found: apt-get install iptables"


def test_an_events_relay_run_gets_every_event_to_the_webhook() -> None:
    """Issue 18: the mta-events target ships every Reception and Delivery record to a
    webhook receiver in the harness, each POST's signature checked; the run says so."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "relay", "--targets", "mta-events", "--messages",
         "200", "--concurrency", "5", "--repeat", "1", "--settle", "0", "--no-save"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("relay mta-events c=5:"))
    assert "lost 0" in line
