"""``python -m benchmarks report``: rebuild benchmarks/RESULTS.md and its plots from the JSON
results under benchmarks/results/ (every scenario does this itself after a saved run)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, fmt, load_results, num

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
PLOTS = ROOT / "benchmarks" / "plots"
NOTES = ROOT / "benchmarks" / "notes"
RECENT = 8  # result files per scenario in its table

Data = dict[str, Any]


def date(r: Data) -> str:
    return r["started"][:10]


def commit(r: Data) -> str:
    return r["commit"] + ("+" if r.get("dirty") else "")


def machine(r: Data) -> str:
    m = r["machine"]
    return f"{m['cores']} cores, Py {m['python']}"


def load_desc(p: Data) -> str:
    reuse = "" if not p.get("no_reuse") else ", no reuse"
    client = ", smtp-source" if p.get("client") == "smtp-source" else ""
    return f"{p.get('messages')} x {p.get('size')} KB{reuse}{client}"


def all_runs(r: Data) -> list[Data]:
    return [run for g in r["groups"] for run in g["runs"]]


def group_summary(r: Data, metric: str, **labels: Any) -> Data | None:
    for g in r["groups"]:
        if all(g["labels"].get(k) == v for k, v in labels.items()):
            return g["summary"].get(metric)
    return None


# -- targets -------------------------------------------------------------------------------

class Target:
    """One of issue 7's goals, checked against the latest result that measures it."""

    def __init__(self, name: str, goal: str, scenario: str,
                 measure: Callable[[Data], tuple[float, str] | None],
                 met: Callable[[float], bool], see: str = "") -> None:
        self.name, self.goal, self.scenario = name, goal, scenario
        self.measure, self.met = measure, met
        self.see = see  # where the page says more on a miss


def standard(r: Data, client: str = "loadgen") -> bool:
    """A run fit to judge a target by: a committed tree, the given client (the default:
    ours), the default size and connection reuse, and no profiler slowing the node down."""
    p = r["params"]
    return (not r.get("dirty") and not p.get("profile") and not p.get("no_reuse")
            and p.get("client", "loadgen") == client and str(p.get("size", "5")) == "5")


def _ratio(what: str, client: str = "loadgen") -> Callable[[Data], tuple[float, str] | None]:
    def measure(r: Data) -> tuple[float, str] | None:
        if not standard(r, client):
            return None
        ratios = [x for x in r.get("series", {}).get("ratios", []) if x["what"] == what]
        if not ratios:
            return None
        pick = next((x for x in ratios if x["labels"].get("concurrency") == 50), ratios[0])
        lab = pick["labels"]
        ours = group_summary(r, "msgs_per_s", **lab)
        theirs = group_summary(r, "msgs_per_s", **{**lab, "target": "postfix"})
        return pick["ratio"], (f"{pick['ratio']:.2f}x: {lab.get('target')} {fmt(ours)} vs Postfix "
                               f"{fmt(theirs)} msg/s ({load_desc(r['params'])}, "
                               f"{lab.get('concurrency')} sessions)")
    return measure


def _cpu(r: Data) -> tuple[float, str] | None:
    """CPU seconds per 1,000 messages, ours and Postfix's (all its processes), in one run:
    how many times less ours takes (the goal is that both are reported)."""
    if not standard(r):
        return None
    ours = group_summary(r, "node_cpu_us_per_msg", target="mta", concurrency=50)
    theirs = group_summary(r, "node_cpu_us_per_msg", target="postfix", concurrency=50)
    if not ours or not theirs or not ours.get("n") or not theirs.get("n") \
            or theirs["median"] != theirs["median"]:  # NaN: before Postfix's was read
        return None
    ratio = theirs["median"] / ours["median"]
    return ratio, (f"mta {ours['median'] / 1000:.2f} vs Postfix {theirs['median'] / 1000:.2f} "
                   f"CPU s per 1,000 msgs: {ratio:.1f}x less")


def _p99(offered: int) -> Callable[[Data], tuple[float, str] | None]:
    def measure(r: Data) -> tuple[float, str] | None:
        if r.get("dirty"):
            return None
        s = group_summary(r, "p99_ms", target="mta", offered=offered)
        if not s or not s.get("n"):
            return None
        return s["median"], f"{fmt(s, 1)} ms (durable accept, delivery off)"
    return measure


def _scale(r: Data) -> tuple[float, str] | None:
    if r.get("dirty"):
        return None
    ratios = [x for x in r.get("series", {}).get("ratios", [])
              if x["labels"]["processes"] == 2 and x["labels"].get("base") == 1]
    if not ratios:
        return None
    one = group_summary(r, "msgs_per_s", processes=1)
    two = group_summary(r, "msgs_per_s", processes=2)
    return ratios[0]["ratio"], (f"{ratios[0]['ratio']:.2f}x: {fmt(two)} vs {fmt(one)} "
                                f"msg/s (client {r['params'].get('client', 'loadgen')})")


def _recovery(metric: str) -> Callable[[Data], tuple[float, str] | None]:
    def measure(r: Data) -> tuple[float, str] | None:
        if r.get("dirty"):
            return None
        s = group_summary(r, metric, messages=1_000_000)
        if not s or not s.get("n"):
            return None
        mode = "with delivery scheduling" if r["params"].get("delivery") else "delivery off"
        unit = "s" if metric == "seconds" else "bytes/msg"
        return s["median"], f"{fmt(s, 2 if unit == 's' else 0)} {unit} ({mode})"
    return measure


def _replicated_p99(r: Data) -> tuple[float, str] | None:
    if r.get("dirty"):
        return None
    s = group_summary(r, "p99_ms", target="mta-replicated", offered=1000)
    if not s or not s.get("n"):
        return None
    return s["median"], f"{fmt(s, 1)} ms (2 nodes, replicas 2, min_insync 2)"


def _tenants(r: Data) -> tuple[float, str] | None:
    """B's span in the worst run with tenants (inf when A had nothing left queued at B's
    last: then the run cannot tell fairness from an empty queue)."""
    runs = [x for x in all_runs(r) if x.get("mode") == "tenants"]
    if r.get("dirty") or not runs:
        return None
    worst = max(x["b_span_s"] if x.get("b_span_s") is not None else float("inf")
                for x in runs)
    left = group_summary(r, "a_left_at_b_done", mode="tenants")
    base = group_summary(r, "b_span_s", mode="one-tenant")
    span = group_summary(r, "b_span_s", mode="tenants")
    p = r["params"]
    value = worst if left and left.get("n") and left["min"] > 0 else float("inf")
    return value, (f"B's {p['urgent']} at the sink {fmt(span, 2)} s "
                   f"after its first submission (worst {worst:.2f} s), {fmt(left)} of A's "
                   f"{p['bulk']:,} still queued; one tenant name: {fmt(base, 2)} s "
                   f"({p['rate']} site)")


def _disk_loss(r: Data) -> tuple[float, str] | None:
    """RTO against TTL + 2 s (the worst trial; any lost message misses the goal)."""
    runs = all_runs(r)
    if r.get("dirty") or not runs:
        return None
    ttl = r["params"]["ttl"]
    worst = max((x["rto"] if x.get("rto") is not None else float("inf")) for x in runs)
    lost = sum(int(x.get("lost") or 0) for x in runs)
    s = group_summary(r, "rto")
    return (worst - (ttl + 2) if not lost else float("inf"),
            f"RTO {fmt(s, 2)} s, max {worst:.2f} s over {len(runs)} trials (TTL {ttl:g} s); "
            f"lost {lost}")


TARGETS = [
    Target("Durable ingress vs Postfix", ">= 2x", "ingress", _ratio("ingress"),
           lambda v: v >= 2.0),
    Target("Replicated ingress vs Postfix (issue 16)", ">= 1.5x", "ingress",
           _ratio("ingress-replicated"), lambda v: v >= 1.5),
    Target("Replicated: p99 at 1,000 msg/s (issue 16)", "<= 30 ms", "latency",
           _replicated_p99, lambda v: v <= 30.0),
    Target("Failover with disk loss (issue 16)", "RTO <= TTL + 2 s, 0 lost",
           "failover-replicated", _disk_loss, lambda v: v <= 0.0),
    Target("Relay vs Postfix", ">= 2x", "relay", _ratio("relay"), lambda v: v >= 2.0),
    Target("Relay, every message DKIM-signed (RSA-2048), vs Postfix unsigned (issue 17)",
           ">= 2x", "relay", _ratio("relay-dkim"), lambda v: v >= 2.0,
           see="The cost of signing per message, split into its parts, and both relay and "
               "ingress beside plain mta: *DKIM signing (issue 17)* below."),
    Target("Relay, every message DKIM-signed, 2 node processes on one port, vs Postfix "
           "unsigned (issues 17, 20)", ">= 2x", "relay", _ratio("relay-dkim-x2"),
           lambda v: v >= 2.0),
    Target("Relay, every record shipped to an events webhook, vs Postfix (issue 18)", ">= 2x",
           "relay", _ratio("relay-events"), lambda v: v >= 2.0),
    Target("One tenant's backlog does not hold up another's mail (issue 18)",
           "B's mail within a few seconds (<= 5 s), not after A's", "tenants", _tenants,
           lambda v: v <= 5.0),
    Target("Durable ingress vs Postfix, our load generator (issue 20)", ">= 3x", "ingress",
           _ratio("ingress"), lambda v: v >= 3.0),
    Target("Durable ingress vs Postfix, smtp-source (issue 20)", ">= 3x", "ingress",
           _ratio("ingress", "smtp-source"), lambda v: v >= 3.0),
    Target("Relay vs Postfix, our load generator (issue 20)", ">= 3x", "relay",
           _ratio("relay"), lambda v: v >= 3.0),
    Target("Relay vs Postfix, smtp-source (issue 20)", ">= 3x", "relay",
           _ratio("relay", "smtp-source"), lambda v: v >= 3.0),
    Target("Durable ingress vs Postfix, 2 node processes on one port, our load generator "
           "(issue 20)", ">= 3x", "ingress", _ratio("ingress-x2"), lambda v: v >= 3.0),
    Target("Durable ingress vs Postfix, 2 node processes on one port, smtp-source (issue 20)",
           ">= 3x", "ingress", _ratio("ingress-x2", "smtp-source"), lambda v: v >= 3.0),
    Target("Relay vs Postfix, 2 node processes on one port, our load generator (issue 20)",
           ">= 3x", "relay", _ratio("relay-x2"), lambda v: v >= 3.0),
    Target("Relay vs Postfix, 2 node processes on one port, smtp-source (issue 20)",
           ">= 3x", "relay", _ratio("relay-x2", "smtp-source"), lambda v: v >= 3.0),
    Target("Ingress CPU per 1,000 messages, ours and Postfix's (issue 20)", "reported",
           "ingress", _cpu, lambda v: v > 0),
    Target("Relay CPU per 1,000 messages, ours and Postfix's (issue 20)", "reported",
           "relay", _cpu, lambda v: v > 0),
    Target("Submission p99 at 1,500 msg/s offered (issue 20)", "<= 20 ms", "latency",
           _p99(1500), lambda v: v <= 20.0),
    Target("2 node processes vs 1", ">= 1.7x", "scale", _scale, lambda v: v >= 1.7),
    Target("1M queued: recovery time", "<= 20 s", "recovery", _recovery("seconds"),
           lambda v: v <= 20.0),
    Target("1M queued: RSS per message", "<= 1 KB", "recovery", _recovery("bytes_per_msg"),
           lambda v: v <= 1024),
]


def targets_section(by: dict[str, list[Data]]) -> list[str]:
    out = ["## Targets (issues 7, 16, 17, 18 and 20)", "",
           "Each goal is checked against the latest result that measures it from a committed "
           "tree (ingress and relay: our load generator unless the goal names smtp-source, "
           "5 KB, connection reuse, no profiler).",
           "",
           "| goal | target | measured | verdict | result file |", "|---|---|---|---|---|"]
    misses = []
    for t in TARGETS:
        found = None
        for r in reversed(by.get(t.scenario, [])):
            if (m := t.measure(r)) is not None:
                found = (r, m)
                break
        if found is None:
            out.append(f"| {t.name} | {t.goal} | not measured yet | - | - |")
            continue
        r, (value, text) = found
        ok = t.met(value)
        out.append(f"| {t.name} | {t.goal} | {text} | {'met' if ok else '**missed**'} | "
                   f"`{r['file']}` ({commit(r)}, {date(r)}) |")
        if not ok:
            # The profile may come from a separate run (py-spy slows the node it samples,
            # so ratio runs go without it); scale's hot path is ingress's.
            prof = next((x for scen in (t.scenario, "ingress") for x in reversed(by.get(scen, []))
                         if x.get("series", {}).get("profile")), None)
            misses.append((t, prof))
    if misses:
        out += ["", "### Where we miss, and why", ""]
        told: set[str] = set()  # scenarios whose note and profile are already on the page
        for t, pr in misses:
            out.append(f"**{t.name}** ({t.goal}).")
            if t.see:
                out += ["", t.see]
            if t.scenario in told:
                out += ["", "Why: as for the miss above of the same scenario.", ""]
                continue
            told.add(t.scenario)
            prof = _profile(pr) if pr else None
            note = NOTES / f"miss-{t.scenario}.md"
            if note.exists():
                out += ["", note.read_text().strip()]
            if prof:
                out += ["", f"Profile of our node under that load (py-spy, "
                            f"{prof['samples']} samples, `{pr['file']}`; *total* includes "
                            f"callees):", "", *prof["table"]]
            out.append("")
    return [*out, ""]


def _profile(r: Data) -> Data | None:
    prof = r.get("series", {}).get("profile")
    if not prof:
        return None
    rows = ["| function | thread | self % | total % |", "|---|---|---|---|"]
    rows += [f"| `{f['name']}` | {f.get('thread', '?')} | {f['self']:.1f} | {f['total']:.1f} |"
             for f in prof["top"]]
    if "threads_pct" in prof:
        rows.append(f"\n{prof['threads_pct']:.0f}% of the samples are in worker threads (the "
                    f"spool's group-commit writer; with DKIM signed in threads, before 7944302 or "
                    f"with `processes = 0`, those threads too), "
                    f"the rest on the event loop.")
    return {"samples": prof["samples"], "table": rows}


# -- scenario sections ---------------------------------------------------------------------

Col = tuple[str, Callable[[Data, Data], str]]


def metric(name: str, digits: int = 0) -> Callable[[Data, Data], str]:
    return lambda r, g: fmt(g["summary"].get(name), digits)


def per_thousand(name: str) -> Callable[[Data, Data], str]:
    """A us-per-message metric as seconds per 1,000 messages (us / 1000)."""
    def cell(r: Data, g: Data) -> str:
        s = g["summary"].get(name)
        if not s or not s.get("n"):
            return fmt(s, 2)
        return fmt({**s, **{k: s[k] / 1000 for k in ("min", "median", "max")}}, 2)
    return cell


def label(name: str) -> Callable[[Data, Data], str]:
    return lambda r, g: str(g["labels"].get(name, ""))


def total(name: str) -> Callable[[Data, Data], str]:
    return lambda r, g: str(sum(int(run.get(name) or 0) for run in g["runs"]))


SECTIONS: dict[str, Data] = {
    "ingress": {
        "title": "Ingress: durable accept (`250` only after fdatasync)",
        "how": "`python -m benchmarks ingress`: msg/s from the common start to the last "
               "`250`; latency from the final dot to the `250` (includes the group commit); CPU: "
               "every thread of our node and its DKIM signing processes, or every process of "
               "Postfix's (the exited ones "
               "from its master's children's times), from /proc, over the run.",
        "cols": [("target", label("target")), ("sessions", label("concurrency")),
                 ("load", lambda r, g: load_desc(r["params"])),
                 ("msg/s", metric("msgs_per_s")), ("MB/s", metric("mb_per_s", 1)),
                 ("p50 ms", metric("p50_ms", 1)), ("p99 ms", metric("p99_ms", 1)),
                 ("records/fsync", metric("batch", 1)),
                 ("CPU us/msg", metric("node_cpu_us_per_msg")),
                 ("CPU s/1,000 msgs", per_thousand("node_cpu_us_per_msg"))],
    },
    "relay": {
        "title": "Relay: accept and deliver to a loopback sink, end to end",
        "how": "`python -m benchmarks relay`: msg/s until the sink holds every accepted "
               "message; *lost* counts `250`s whose message never reached the sink (must be "
               "0); delivery latency (reception to remote `250`) from our accounting log; CPU "
               "as for ingress (the client and the sink not included).",
        "cols": [("target", label("target")), ("sessions", label("concurrency")),
                 ("load", lambda r, g: f"{load_desc(r['params'])}, "
                                       f"{r['params'].get('route')}"),
                 ("msg/s", metric("msgs_per_s")), ("lost", total("lost")),
                 ("duplicates", total("duplicates")),
                 ("delivery p50 ms", metric("delivery_p50_ms")),
                 ("delivery p99 ms", metric("delivery_p99_ms")),
                 ("CPU us/msg", metric("node_cpu_us_per_msg")),
                 ("CPU s/1,000 msgs", per_thousand("node_cpu_us_per_msg")),
                 ("signed", total("signed"))],
    },
    "latency": {
        "title": "Latency at fixed offered loads (open loop)",
        "how": "`python -m benchmarks latency`: messages scheduled at the offered rate over "
               "reused sessions; latency from the scheduled time to the `250` (no "
               "coordinated omission). Durable accept, delivery off.",
        "cols": [("target", label("target")), ("offered/s", label("offered")),
                 ("achieved/s", metric("achieved")), ("p50 ms", metric("p50_ms", 1)),
                 ("p99 ms", metric("p99_ms", 1)), ("p99.9 ms", metric("p999_ms", 1)),
                 ("max ms", metric("max_ms", 1)), ("errors", total("errors"))],
    },
    "scale": {
        "title": "Scale: node processes sharing one SMTP port (SO_REUSEPORT)",
        "how": "`python -m benchmarks scale`: standalone nodes with their own spools behind "
               "one port; the load generator shares the machine's cores.",
        "cols": [("processes", label("processes")), ("client", label("client")),
                 ("load", lambda r, g: load_desc(r["params"])),
                 ("msg/s", metric("msgs_per_s")),
                 ("node CPU us/msg", metric("node_cpu_us_per_msg")),
                 ("node cores busy", metric("node_cores", 2)),
                 ("client cores busy", metric("client_cores", 2))],
    },
    "recovery": {
        "title": "Recovery: restart with a full queue",
        "how": "`python -m benchmarks recovery`: exec to SMTP answering (every shard scanned, "
               "crc-checked, indexed), RSS per queued message over an empty node's.",
        "cols": [("messages", label("messages")),
                 ("delivery scheduling", lambda r, g: "on" if g["labels"].get("delivery")
                  else "off"),
                 ("up in s", metric("seconds", 2)), ("RSS MB", metric("rss_mb")),
                 ("bytes/msg", metric("bytes_per_msg")),
                 ("disk MB", metric("disk_mb"))],
    },
    "backlog": {
        "title": "Backlog: memory while undeliverable mail piles up",
        "how": "`python -m benchmarks backlog`: a running node accepts mail for a destination "
               "that does not answer; bytes per queued message is the slope of RSS over queue "
               "depth.",
        "cols": [("queued", metric("queued")), ("RSS empty MB", metric("rss_empty_mb")),
                 ("RSS full MB", metric("rss_full_mb")),
                 ("bytes/msg", metric("bytes_per_msg")),
                 ("marginal bytes/msg", metric("marginal_bytes_per_msg"))],
    },
    "loadgen": {
        "title": "Calibration: the load generators against a null sink",
        "how": "`python -m benchmarks loadgen`: the generator's own ceiling (the sink does no "
               "work); far above the servers' figures means it is not what limits them.",
        "cols": [("client", label("client")), ("load", lambda r, g: load_desc(r["params"])),
                 ("msg/s", metric("msgs_per_s"))],
    },
    "failover": {
        "title": "Failover: SIGKILL a node of a 3-node cluster under load",
        "how": "`python -m benchmarks failover`: *takeover* from the kill until survivors own "
               "every shard; *RTO* until a survivor delivers the first of the dead node's "
               "messages; *lost* acknowledged messages never delivered (must be 0). In the "
               "timeline the survivors keep taking load until `--after` seconds (6) past the "
               "kill, then the load stops; the sink holds each message 30 ms, so deliveries "
               "run at its pace.",
        "cols": [("lease TTL s", label("ttl")), ("trials", lambda r, g: str(len(g["runs"]))),
                 ("takeover s", metric("takeover", 2)), ("RTO s", metric("rto", 2)),
                 ("lost", total("lost")), ("duplicates", total("dupes")),
                 ("acked", total("acked")), ("acked after kill", total("acked_after_kill"))],
    },
    "failover-replicated": {
        "title": "Failover with disk loss: replicated spool, SIGKILL a node and delete its spool",
        "how": "`python -m benchmarks failover --replicated`: 3 nodes, each its own spool, "
               "replicas 2; *RTO* from the kill until the sink receives, from a survivor, the "
               "first message of a shard the dead node owned; *re-replicated* until every "
               "shard has 2 in-sync copies on the survivors; *pause* the survivors' longest "
               "time without a `250` after the kill; *lost* must be 0.",
        "cols": [("lease TTL s", label("ttl")), ("min_insync", label("min_insync")),
                 ("trials", lambda r, g: str(len(g["runs"]))),
                 ("takeover s", metric("takeover", 2)), ("RTO s", metric("rto", 2)),
                 ("re-replicated s", metric("rereplicated", 2)),
                 ("pause s", metric("ack_pause", 2)), ("lost", total("lost")),
                 ("duplicates", total("dupes")), ("451 after kill", total("refused_after_kill")),
                 ("acked", total("acked"))],
    },
    "partition": {
        "title": "Partitions: network faults and pauses, 3 etcd members + 3 nodes in namespaces",
        "how": "`python -m benchmarks partition` (root): silent DROP partitions and a SIGSTOP "
               "under steady load; *non-owner* deliveries while etcd said another node (or "
               "none) owned the shard, *fenced* deliveries between a node's fence and "
               "unfence, *expiry-fence* and *claim-fence* seconds from the victim's fence to "
               "its lease expiry and to the first foreign claim of its shards (goal: > 0), "
               "*takeover* from the fault to a new owner's first delivery (goal: TTL + 2 s), "
               "*recovered* from the heal until the victims serve their share again.",
        "cols": [("scenario", label("scenario")), ("lease TTL s", label("ttl")),
                 ("acked", total("acked")), ("lost", total("lost")),
                 ("duplicates", total("duplicates")), ("by two nodes", total("dupes_cross_node")),
                 ("non-owner", total("non_owner")), ("fenced", total("while_fenced")),
                 ("fence s", metric("fence", 2)),
                 ("expiry-fence s", metric("expiry_minus_fence", 2)),
                 ("claim-fence s", metric("claim_minus_fence", 2)),
                 ("takeover s", metric("takeover", 2)), ("recovered s", metric("recovered", 2))],
    },
}


def section(name: str, results: list[Data], plots: list[str]) -> list[str]:
    spec = SECTIONS[name]
    out = [f"## {spec['title']}", "", spec["how"], ""]
    out += [f"![{p}](plots/{p})" for p in plots]
    if plots:
        out.append("")
    if not results:
        return [*out, "No saved result yet.", ""]
    cols: list[Col] = spec["cols"]
    out.append("| date | commit | " + " | ".join(c for c, _ in cols) + " | machine |")
    out.append("|---|---|" + "---|" * len(cols) + "---|")
    for r in results[-RECENT:]:
        for g in r["groups"]:
            out.append(f"| {date(r)} | {commit(r)} | "
                       + " | ".join(fn(r, g) for _, fn in cols) + f" | {machine(r)} |")
    notes = [f"- {date(r)} {commit(r)}: {n}" for r in results[-RECENT:]
             for n in r.get("notes", []) if n]
    if notes:
        out += ["", "Notes given with the runs:", *notes]
    if (reading := NOTES / f"{name}.md").exists():
        out += ["", reading.read_text().strip()]
    out.append("")
    return out


# -- DKIM signing (issue 17) ----------------------------------------------------------------

def _has(r: Data, tgt: str) -> bool:
    return any(g["labels"].get("target") == tgt for g in r["groups"])


def _loadavg(r: Data) -> str:
    la = r.get("loadavg") or {}
    if not la:
        return "load average not recorded"
    return (f"load average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in la['start'])} at the "
            f"start, {' / '.join(f'{x:.2f}' for x in la['end'])} at the end")


def _median(r: Data, metric_name: str, **labels: Any) -> float | None:
    s = group_summary(r, metric_name, **labels)
    return s["median"] if s and s.get("n") else None


def _dkim_rows(r: Data, relay: bool) -> list[str]:
    extra = " signed / received | lost |" if relay else " signed (in spool) |"
    out = ["| target | msg/s | node CPU us/msg | node CPU s per 1,000 msgs |" + extra,
           "|---|---|---|---|" + "---|" * extra.count("|")]
    for g in r["groups"]:
        tgt = g["labels"]["target"]
        cpu = g["summary"].get("node_cpu_us_per_msg")
        per_k = per_thousand("node_cpu_us_per_msg")(r, g)
        row = f"| {tgt} | {fmt(g['summary'].get('msgs_per_s'))} | {fmt(cpu)} | {per_k} |"
        signed = sum(int(x.get("signed") or 0) for x in g["runs"])
        if relay:
            got = sum(int(x.get("sink_received") or 0) for x in g["runs"])
            ok = sum(1 for x in g["runs"] if x.get("sample_verified"))
            verified = f", {ok}/{len(g['runs'])} samples verify" if tgt == "mta-dkim" else ""
            row += (f" {signed:,} / {got:,}{verified} | "
                    f"{sum(int(x.get('lost') or 0) for x in g['runs'])} |")
        else:
            row += f" {signed:,} |" if tgt == "mta-dkim" else " - |"
        out.append(row)
    return [*out, ""]


def _dkim_facts(r: Data, relay: bool) -> list[str]:
    facts = []
    pf = _median(r, "msgs_per_s", target="postfix")
    signed_rate = _median(r, "msgs_per_s", target="mta-dkim")
    plain = _median(r, "msgs_per_s", target="mta")
    if pf and signed_rate:
        verdict = (" (goal >= 2x: " + ("met" if signed_rate / pf >= 2.0 else "**missed**")
                   + ")") if relay else ""
        facts.append(f"mta-dkim / Postfix **{signed_rate / pf:.2f}x**{verdict}"
                     + (f"; mta / Postfix {plain / pf:.2f}x" if plain else ""))
    if plain and signed_rate:
        facts.append(f"signing keeps {signed_rate / plain:.0%} of the unsigned throughput")
    c1 = _median(r, "node_cpu_us_per_msg", target="mta-dkim")
    c0 = _median(r, "node_cpu_us_per_msg", target="mta")
    if c1 is not None and c0 is not None:
        facts.append(f"cost of signing: **{c1 - c0:,.0f} us of node CPU per message** "
                     f"({c0:,.0f} -> {c1:,.0f}; {(c1 - c0) / 1000:.2f} CPU-seconds per "
                     "1,000 messages)")
    cost = r.get("series", {}).get("dkim_sign_cost") or {}
    if "sign_us" in cost:
        facts.append(
            f"signing alone (this tree's signer run by the harness on one thread, "
            f"{cost['messages']} messages) takes {cost['sign_us']:,.0f} us of CPU per message: "
            f"the RSA-2048 operation {cost['rsa_us']:,.0f}, the relaxed body canonicalisation "
            f"{cost['body_canon_us']:,.0f}, the rest (header fields, h=, base64, folding) "
            f"{cost['other_us']:,.0f}"
            + (f"; the node's other {c1 - c0 - cost['sign_us']:,.0f} us per signed message are "
               "spent outside the signer: handing each message to the signer and back (a "
               "signing process since 7944302, threads that contended with the event loop for "
               "the GIL before), and storing and sending the larger message"
               if c1 is not None and c0 is not None else ""))
    return [("Relay: " if relay else "Ingress: ") + "; ".join(facts) + ".", ""] if facts else []


def dkim_section(by: dict[str, list[Data]]) -> list[str]:
    """Issue 17: the latest relay and ingress results with an ``mta-dkim`` target (every
    message signed, RSA-2048) beside plain ``mta`` and Postfix, same invocation, interleaved."""
    out = ["## DKIM signing (issue 17)", "",
           "`python -m benchmarks relay --targets mta-dkim,postfix,mta` and `ingress --targets "
           "mta,mta-dkim,postfix`: `mta-dkim` is our node with `[dkim] required = true` and an "
           "rsa-sha256 key of 2048 bits made for the run, for the load's From: domain, so every "
           "message is signed (one it could not sign would be refused). Relay runs count the "
           "messages the sink received with a `DKIM-Signature` and verify the first one's "
           "signature (dkimpy, the run's public key); ingress runs count the signatures in the "
           "spool. A run where any message went unsigned stops the scenario. Postfix relays "
           "unsigned. *Node CPU* is user + system of the node process (every thread) and of its "
           "child processes (the DKIM signing processes, `[dkim] processes`) from `/proc`, "
           "over the run, per message (relay: reception and delivery).", ""]
    relay = next((r for r in reversed(by.get("relay", []))
                  if _has(r, "mta-dkim") and standard(r)), None)
    ingress = next((r for r in reversed(by.get("ingress", []))
                    if _has(r, "mta-dkim") and standard(r)), None)
    if relay is None and ingress is None:
        return [*out, "No saved result yet.", ""]
    for r, what in ((relay, "Relay"), (ingress, "Ingress (durable accept, no delivery)")):
        if r is None:
            out += [f"{what}: no saved result yet.", ""]
            continue
        conc = r["groups"][0]["labels"].get("concurrency")
        runs = len(r["groups"][0]["runs"])
        out += [f"**{what}**: `{r['file']}` ({commit(r)}, {date(r)}; "
                f"{load_desc(r['params'])}, {conc} sessions, median (min-max) of {runs} "
                f"interleaved runs; {_loadavg(r)}).", "",
                *_dkim_rows(r, what == "Relay"), *_dkim_facts(r, what == "Relay")]
    prof = next((x for x in reversed(by.get("relay", []) + by.get("ingress", []))
                 if x.get("series", {}).get("profile_target") == "mta-dkim"), None)
    if prof and (table := _profile(prof)):
        out += [f"Profile of `mta-dkim` under that load (py-spy, {table['samples']} samples, "
                f"`{prof['file']}`, a separate profiled run; *total* includes callees):", "",
                *table["table"], ""]
    return out


# -- tenants (issue 18) ----------------------------------------------------------------------

_TENANT_MODES = {"tenants": "tenants (B: `alerts`)", "one-tenant": "one tenant (B: `bulk`)"}


def tenants_section(by: dict[str, list[Data]]) -> list[str]:
    """Issue 18: tenant A's backlog at a paced site, then tenant B's few messages; with
    tenants and, as the baseline, under A's name (first come, first served)."""
    out = ["## Tenants: one tenant's backlog and another's mail (issue 18)", "",
           "`python -m benchmarks tenants`: one standalone node relays to a loopback sink "
           "standing for one receiving site, paced by the node (`[delivery.sites] rate`, 20 "
           "connections). Tenant A (`X-MTA-Tenant: bulk`) submits its messages over 50 "
           "sessions as fast as the node takes them; once it has every `250`, tenant B "
           "(`X-MTA-Tenant: alerts`) submits its own over 4 sessions. The sink records when "
           "each message arrived. *B span*: from B's first submission to its last message at "
           "the sink; *B p50/p99*: each B message from its `250` to the sink; *A queued*: A's "
           "messages not yet at the sink when B began, and when B's last arrived; *A drained*: "
           "A's first submission to its last message at the sink. Baseline *one tenant*: B's "
           "mail carries A's name, so it waits oldest-first behind A's backlog (no fairness "
           "without changing the node). Every run waits for every accepted message (*lost* "
           "must be 0). Goal: B's mail within a few seconds (read: <= 5 s), not after A's.", ""]
    results = by.get("tenants", [])
    if not results:
        return [*out, "No saved result yet.", ""]
    out += ["![tenants-timeline.png](plots/tenants-timeline.png)", "",
            "| date | commit | mode | load | B span s | B p50 s | B p99 s | A queued when B "
            "began | A queued at B's last | A drained s | site msg/s | lost | load average "
            "(1/5/15 min) at the start | machine |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results[-RECENT:]:
        p = r["params"]
        la = (r.get("loadavg") or {}).get("start")
        for g in r["groups"]:
            s = g["summary"]
            mode = g["labels"]["mode"]
            out.append(
                f"| {date(r)} | {commit(r)} | {_TENANT_MODES.get(mode, mode)} | A {p['bulk']:,} "
                f"then B {p['urgent']:,} x {p['size']} KB, site {p['rate']} | "
                f"{fmt(s.get('b_span_s'), 2)} | {fmt(s.get('b_p50_s'), 2)} | "
                f"{fmt(s.get('b_p99_s'), 2)} | {fmt(s.get('a_queued_at_b_start'))} | "
                f"{fmt(s.get('a_left_at_b_done'))} | {fmt(s.get('a_drained_s'), 1)} | "
                f"{fmt(s.get('site_msgs_per_s'))} | "
                f"{sum(int(x.get('lost') or 0) for x in g['runs'])} | "
                f"{' / '.join(f'{x:.2f}' for x in la) if la else 'n/a'} | {machine(r)} |")
    r = results[-1]
    fair = group_summary(r, "b_span_s", mode="tenants")
    base = group_summary(r, "b_span_s", mode="one-tenant")
    runs = len(r["groups"][0]["runs"])
    facts = [f"Latest: `{r['file']}` ({commit(r)}, {date(r)}; median (min-max) of {runs} "
             f"interleaved runs per mode; {_loadavg(r)})"]
    if fair and fair.get("n"):
        left = group_summary(r, "a_left_at_b_done", mode="tenants")
        facts.append(f"with tenants, B's {r['params']['urgent']} messages were all at the sink "
                     f"**{fmt(fair, 2)} s** after its first submission while {fmt(left)} of "
                     f"A's were still queued (goal <= 5 s: "
                     + ("met" if fair["max"] <= 5.0 and left and left["min"] > 0
                        else "**missed**") + ")")
    if base and base.get("n"):
        facts.append(f"under A's name they took **{fmt(base, 2)} s**, behind A's backlog")
    out += ["", "; ".join(facts) + ".", ""]
    if (reading := NOTES / "tenants.md").exists():
        out += [reading.read_text().strip(), ""]
    return out


# -- plots ---------------------------------------------------------------------------------

def _plot_ingress(plt: Any, by: dict[str, list[Data]]) -> Any:
    sweep = next((r for r in reversed(by.get("ingress", []))
                  if len({g["labels"]["concurrency"] for g in r["groups"]}) > 1), None)
    if not sweep:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for tgt in sorted({g["labels"]["target"] for g in sweep["groups"]}):
        gs = sorted((g for g in sweep["groups"] if g["labels"]["target"] == tgt),
                    key=lambda g: g["labels"]["concurrency"])
        xs = [g["labels"]["concurrency"] for g in gs]
        med = [g["summary"]["msgs_per_s"]["median"] for g in gs]
        lo = [m - g["summary"]["msgs_per_s"]["min"] for m, g in zip(med, gs, strict=True)]
        hi = [g["summary"]["msgs_per_s"]["max"] - m for m, g in zip(med, gs, strict=True)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=tgt)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent SMTP sessions")
    ax.set_ylabel("durable msg/s (median, min-max)")
    ax.set_title(f"Ingress throughput vs concurrency ({commit(sweep)}, "
                 f"{sweep['params']['size']} KB)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _plot_latency(plt: Any, by: dict[str, list[Data]]) -> Any:
    if not (lat := by.get("latency")):
        return None
    r = lat[-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for g in r["groups"]:
        run = sorted(g["runs"], key=lambda x: x.get("p99_ms") or 0)[len(g["runs"]) // 2]
        cdf = run.get("cdf_ms") or []
        if not cdf:
            continue
        xs = [max(v, 1e-3) for v, _ in cdf]
        lab = f"{g['labels']['target']} {g['labels']['offered']}/s"
        style = "-" if g["labels"]["target"] == "mta" else "--"
        a1.plot(xs, [f for _, f in cdf], style, label=lab)
        a2.plot(xs, [max(1 - f, 1e-5) for _, f in cdf], style, label=lab)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("submission latency, ms (scheduled time to 250)")
        ax.grid(alpha=0.3)
    a1.set_ylabel("fraction of messages")
    a1.set_title("Latency CDF")
    a2.set_yscale("log")
    a2.set_ylabel("fraction slower (1 - CDF)")
    a2.set_title("Tail")
    a2.legend(fontsize=8)
    return fig


def _plot_failover(plt: Any, by: dict[str, list[Data]], scenario: str = "failover") -> Any:
    if not (fo := by.get(scenario)):
        return None
    runs = [x for x in all_runs(fo[-1]) if x.get("timeline")]
    if not runs:
        return None
    run = sorted(runs, key=lambda x: x.get("rto") or 0)[len(runs) // 2]
    tl = run["timeline"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for key, lab in (("acked_survivors", "acknowledged by survivors"),
                     ("acked_victim", "acknowledged by the killed node"),
                     ("delivered_survivors", "delivered: survivors' mail"),
                     ("delivered_victim", "delivered: the killed node's mail")):
        ax.plot(tl["t"], tl[key], label=lab)
    ax.axvline(0, color="red", ls="--", label="SIGKILL")
    if run.get("takeover") is not None:
        ax.axvline(run["takeover"], color="green", ls=":",
                   label=f"shards taken over ({run['takeover']:.1f} s)")
    if run.get("rto") is not None:
        ax.axvline(run["rto"], color="purple", ls="-.",
                   label=f"first delivery of its mail ({run['rto']:.1f} s)")
    # The tail is the sink draining the backlog at its fixed pace: show the kill, the
    # takeover and the recovery, not minutes of flat line.
    marks = [v for v in (run.get("takeover"), run.get("rto")) if v is not None]
    ax.set_xlim(tl["t"][0], min(tl["t"][-1], max(marks, default=0.0) + 12.0))
    ax.set_xlabel("seconds from the kill")
    ax.set_ylabel("messages per second")
    what = ("Failover with disk loss, replicated spool" if scenario == "failover-replicated"
            else "Failover timeline")
    ax.set_title(f"{what} ({commit(fo[-1])}, lease TTL {fo[-1]['params']['ttl']:g} s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_backlog(plt: Any, by: dict[str, list[Data]]) -> Any:
    if not (bl := by.get("backlog")):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(all_runs(bl[-1])):
        curve = run.get("curve") or []
        ax.plot([q for q, _ in curve], [m for _, m in curve], marker="o",
                label=f"run {i + 1}: {num(run.get('bytes_per_msg'))} B/msg")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("queued messages")
    ax.set_ylabel("node RSS, MB")
    ax.set_title(f"RSS vs backlog ({commit(bl[-1])})")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _plot_tenants(plt: Any, by: dict[str, list[Data]]) -> Any:
    """Cumulative arrivals at the sink of A's and B's mail, the median run of each mode."""
    if not (tn := by.get("tenants")):
        return None
    r = tn[-1]
    fig, ax = plt.subplots(figsize=(9, 4))
    b_axis = ax.twinx()
    for g, style in zip(r["groups"], ("-", "--"), strict=False):
        runs = sorted((x for x in g["runs"] if x.get("timeline")),
                      key=lambda x: x.get("b_span_s") or 0)
        if not runs:
            continue
        run = runs[len(runs) // 2]
        tl = run["timeline"]
        mode = g["labels"]["mode"]
        for key, axis, color, who in (("a", ax, "tab:blue", "A (bulk)"),
                                      ("b", b_axis, "tab:red", "B")):
            total, ys = 0, []
            for n in tl[key]:
                total += n
                ys.append(total)
            xs = [(i + 1) * tl["bin_s"] for i in range(len(ys))]
            axis.plot(xs, ys, style, color=color, label=f"{who}, {mode}")
        ax.axvline(tl["b_start_s"], color="grey", ls=style, lw=0.8)
    ax.set_xlabel("seconds from A's first submission (grey: B's first submission)")
    ax.set_ylabel("A's messages at the sink", color="tab:blue")
    b_axis.set_ylabel("B's messages at the sink", color="tab:red")
    ax.set_ylim(bottom=0)
    b_axis.set_ylim(bottom=0)
    ax.set_title(f"Tenants: A's backlog, then B's mail ({commit(r)}, site {r['params']['rate']})")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = b_axis.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    return fig


# (scenario, file, plotter): drawn in this order, each when the results allow it.
_PLOTTERS = (("ingress", "ingress-concurrency.png", _plot_ingress),
             ("latency", "latency-cdf.png", _plot_latency),
             ("failover", "failover-timeline.png", _plot_failover),
             ("failover-replicated", "failover-replicated-timeline.png",
              lambda plt, by: _plot_failover(plt, by, "failover-replicated")),
             ("backlog", "backlog-rss.png", _plot_backlog),
             ("tenants", "tenants-timeline.png", _plot_tenants))


def _plots(by: dict[str, list[Data]], plots_dir: Path) -> dict[str, list[str]] | None:
    """Draw every plot the results allow; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plots_dir.mkdir(exist_ok=True)
    made: dict[str, list[str]] = {}
    for scenario, name, plot in _PLOTTERS:
        fig = plot(plt, by)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(plots_dir / name, dpi=90)
        plt.close(fig)
        made.setdefault(scenario, []).append(name)
    return made


# -- the file --------------------------------------------------------------------------------

def render(results: list[Data], plots_dir: Path = PLOTS) -> str:
    by: dict[str, list[Data]] = {}
    for r in results:
        by.setdefault(r["scenario"], []).append(r)
    plots = _plots(by, plots_dir)
    machines = sorted({f"{r['machine']['cpu']} ({r['machine']['cores']} cores, "
                       f"{r['machine']['mem_gib']} GiB, kernel {r['machine']['kernel']}, "
                       f"Python {r['machine']['python']}, {r['machine']['loop']})"
                       for r in results})
    out = ["# Benchmark results", "",
           "<!-- Generated by `python -m benchmarks report` from benchmarks/results/*.json. "
           "Edit benchmarks/report.py or benchmarks/notes/ (SCENARIO.md under its section, "
           "miss-SCENARIO.md under a missed target), not this file. -->", "",
           "Every figure below comes from a JSON file under `benchmarks/results/` (commit, "
           "machine, parameters, every run). Cells read *median (min-max)* over the runs; a "
           "commit with `+` had uncommitted changes. The load generator runs on the same "
           "machine as the server measured. How to run and read each scenario: "
           "[README.md](README.md); figures recorded by hand before this harness: "
           "[HISTORY.md](HISTORY.md).", "",
           "Machines: " + ("; ".join(machines) if machines else "none yet") + ".", ""]
    out += targets_section(by)
    if plots is None:
        out += ["(Plots need matplotlib: `pip install -e '.[bench]'`.)", ""]
    for name in SECTIONS:
        out += section(name, by.get(name, []), (plots or {}).get(name, []))
    out += dkim_section(by)
    out += tenants_section(by)
    return "\n".join(out).rstrip() + "\n"


def write_report(path: Path = RESULTS_MD) -> None:
    path.write_text(render(load_results()))


def main() -> None:
    argparse.ArgumentParser(prog="python -m benchmarks report",
                            description=__doc__.split("\n\n")[0]).parse_args()
    write_report()
    print(f"wrote {RESULTS_MD.relative_to(ROOT)} and {PLOTS.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
