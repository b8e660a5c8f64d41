"""Relay, end to end: submit N messages, measure until a loopback sink holds every one, and
check that every ``250`` the load generator got reached the sink (lost must be 0).

    python -m benchmarks relay [--messages 10000] [--size 5|mix] [--route smarthost|mx]
                               [--repeat 3] [--peer auto|postfix|none]
                               [--targets mta,mta-dkim,postfix] [--client smtp-source]

Our node delivers with aiosmtplib over a real spool; ``--route mx`` resolves the recipient
domain through a DNS server on loopback (Postfix always relays to the sink as relayhost).
msg/s counts from the start of submission to the sink holding every accepted message;
delivery latency (reception to remote 250) comes from our node's accounting log.

``--targets mta-dkim,postfix,mta`` (issue 17): ``mta-dkim`` signs every message (RSA-2048);
each run counts the messages the sink received with a DKIM-Signature and verifies the first
one's signature (dkimpy, the run's public key), and stops the scenario if any arrived
unsigned or the signature does not verify: a relay figure of unsigned mail is never kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from benchmarks.common import free_port
from benchmarks.dkim_cost import dkim_cost_line, signing_breakdown
from benchmarks.harness import (
    Result,
    Tick,
    finish,
    fmt,
    load_options,
    percentile,
    progress,
    settle,
    sweep,
    target_options,
)
from benchmarks.ingress import ratio_lines
from benchmarks.loadgen import Load, run_load
from benchmarks.profile import Profiler
from benchmarks.sink import Sink
from benchmarks.smtp_source import run_smtp_source
from benchmarks.targets import (
    DKIM_DOMAIN,
    DKIM_SELECTOR,
    Handle,
    dkim_public_record,
    peers,
    target,
    workdir,
)


def verify_sample(message: bytes, record: str) -> bool:
    """Whether ``message`` (as the sink received it, dot-stuffed) carries a DKIM signature
    that dkimpy verifies with the run's key; False without dkimpy."""
    try:
        import dkim
    except ImportError:
        return False
    name = f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}."

    def dns(qname: bytes | str, timeout: int = 5) -> bytes:
        q = qname.decode() if isinstance(qname, bytes) else qname
        return record.encode() if q.rstrip(".") == name.rstrip(".") else b""

    return bool(dkim.verify(message.replace(b"\r\n..", b"\r\n."), dnsfunc=dns))


def _delivery_latencies(handle: Handle) -> list[float]:
    received: dict[str, float] = {}
    out = []
    # One accounting log per node process (mta-x2 has one in each node's directory).
    lines = [line for acct in handle.work.rglob("acct.jsonl")
             for line in acct.read_text().splitlines()]
    for line in lines:
        rec = json.loads(line)
        if rec["type"] == "Reception":
            received[rec["message_id"]] = rec["time"]
        elif rec["type"] == "Delivery" and rec["message_id"] in received:
            out.append(rec["time"] - received[rec["message_id"]])
    return sorted(out)


def run_relay(name: str, load: Load, route: str = "smarthost", tick: Tick | None = None,
              wait: float = 300.0, profile: bool = False,
              client: str = "loadgen") -> dict[str, Any]:
    work = workdir("sink-")
    sink_port = free_port()
    host = "127.0.0.2" if route == "mx" and name == "mta" else "127.0.0.1"
    with ExitStack() as stack:
        sink = stack.enter_context(Sink(work, sink_port, host))
        delivery = ""
        if route == "mx" and name == "mta":
            from harness.dns import DNSServer

            dns = DNSServer({"example.org": {"MX": [(10, "mx.example.org")]},
                             "mx.example.org": {"A": [host]}})
            stack.callback(dns.close)
            delivery = f'nameservers = ["127.0.0.1:{dns.port}"]\nmx_port = {sink_port}\n'
        handle = stack.enter_context(target(name, load.concurrency, relay=(host, sink_port),
                                            delivery=delivery, log_level="warning"))
        cpu0 = handle.cpu_seconds()
        prof = stack.enter_context(Profiler(handle.pid, handle.work / "profile.txt")) \
            if profile and handle.pid else None  # stops (and reads its samples) first
        if client == "smtp-source":
            # Its messages carry no id of ours: loss and duplicates are counted, not named.
            res = _SmtpSourceRun(time.time(), load.messages)
            run_smtp_source(handle.port, load)
        else:
            res = run_load(handle.port, load, tick)
        ingress_end = time.time()
        accepted = set(res.ids)
        _wait_for_sink(sink, res.accepted, accepted, load.messages, wait, tick)
        elapsed = time.time() - res.start
        cpu = handle.cpu_seconds() - cpu0
        time.sleep(0.5)  # the accounting log flushes every 200 ms
        events: dict[str, float] = {}
        if handle.events is not None:
            # Every message's Reception and Delivery records must reach the webhook.
            want, done_at = 2 * res.accepted, time.time()
            until = done_at + 60
            while handle.events.events < want and time.time() < until:
                time.sleep(0.05)
            events = {"events_received": handle.events.events, "events_expected": want,
                      "events_lag_s": time.time() - done_at,
                      "events_bad_signatures": handle.events.bad_signatures}
        latencies = _delivery_latencies(handle)
        verified = None
        if name.startswith("mta-dkim") and (sample := sink.sample) is not None:
            verified = verify_sample(sample, dkim_public_record(handle.work))
        facts = handle.facts
    seen = sink.ids()
    shutil.rmtree(work, ignore_errors=True)
    if client == "smtp-source":
        delivered = min(sink.count, res.accepted)
        lost, duplicates = res.accepted - delivered, sink.count - delivered
    else:
        delivered = len(accepted & set(seen))
        lost = len(accepted - set(seen))
        duplicates = sum(n - 1 for n in seen.values() if n > 1)
    return {"accepted": res.accepted, "refused": res.refused, "errors": res.errors,
            "unsent": res.unsent, "delivered": delivered, "lost": lost,
            "duplicates": duplicates,
            "seconds": elapsed, "ingress_seconds": ingress_end - res.start,
            "msgs_per_s": delivered / elapsed,
            "delivery_p50_ms": percentile(latencies, 50) * 1000,
            "delivery_p99_ms": percentile(latencies, 99) * 1000,
            # Every message the sink got (duplicates too) and those with a DKIM-Signature.
            "sink_received": sink.count, "signed": sink.signed,
            **({"sample_verified": verified} if verified is not None else {}),
            # CPU of every node thread (of every Postfix process), reception and delivery.
            "node_cpu_s": cpu, "node_cpu_us_per_msg": cpu / max(1, delivered) * 1e6,
            **events,
            **facts, **({"profile": prof.summary} if prof is not None and prof.summary else {})}


def _wait_for_sink(sink: Sink, count: int, ids: set[str], messages: int, wait: float,
                   tick: Tick | None) -> None:
    """Until the sink holds ``count`` messages and every one of ``ids`` (none: count only),
    for at most ``wait`` seconds."""
    deadline = time.time() + wait
    reported = 0
    while time.time() < deadline:
        if tick is not None and sink.count > reported:
            tick(min(sink.count, messages) - reported)
            reported = min(sink.count, messages)
        # The count includes duplicates: once it is high enough, check the ids themselves.
        if sink.count >= count and (not ids or not ids - set(sink.ids())):
            break
        time.sleep(0.01 if sink.count < count else 0.1)
    if tick is not None:
        tick(max(0, messages - reported))


@dataclass
class _SmtpSourceRun:
    """What a relay run reads of its client, for smtp-source (which stops at the first
    refusal: it either sent every message or failed the run)."""

    start: float
    accepted: int
    refused: int = 0
    errors: int = 0
    unsent: int = 0
    ids: tuple[str, ...] = ()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks relay",
                                 description=__doc__.split("\n\n")[0])
    load_options(ap, messages=10000, procs=1)
    target_options(ap)
    ap.add_argument("--route", choices=("smarthost", "mx"), default="smarthost")
    ap.add_argument("--client", choices=("loadgen", "smtp-source"), default="loadgen",
                    help="smtp-source: Postfix's C client (cheaper; loss counted, not named)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy our node from the first message to the last delivery; the "
                         "latest run's top functions go in the JSON (not a figure to judge)")
    args = ap.parse_args()
    names = peers(args.peer, args.targets)
    if args.route == "mx" and set(names) - {"mta", "postfix"}:
        raise SystemExit("--route mx: only the mta and postfix targets")
    concs = sweep(args.concurrency)
    result = Result("relay", {**vars(args), "targets": names})
    if {"mta-dkim", "mta-dkim-x2"} & set(names):
        # What signing one message costs alone (this process, one thread), before the load.
        cost = result.series["dkim_sign_cost"] = signing_breakdown(size=args.size)
        print(dkim_cost_line(cost), flush=True)
    total = args.repeat * len(concs) * len(names) * args.messages * 2
    with progress(total, "relay (accepted + delivered)") as bar:
        for i in range(args.repeat):
            for c in concs:
                for name in names:
                    load = Load(args.messages, c, args.procs, args.size, not args.no_reuse)
                    bar.status(f"run {i + 1}/{args.repeat} {name} c={c}")
                    settle(args.settle)
                    run = run_relay(name, load, args.route, bar.update, profile=args.profile,
                                    client=args.client)
                    if "profile" in run:  # the latest run's
                        result.series.update(profile=run.pop("profile"), profile_target=name)
                    result.add({"target": name, "concurrency": c}, run)
                    bar.say(f"run {i + 1}: {name}: {run['delivered']}/{run['accepted']} "
                            f"delivered, {run['msgs_per_s']:.0f} msg/s end to end, lost "
                            f"{run['lost']}, duplicates {run['duplicates']}, signed "
                            f"{run['signed']}/{run['sink_received']}"
                            + (f", sample signature verifies: {run['sample_verified']}"
                               if "sample_verified" in run else ""))
                    if name == "mta-events" and (
                            run["events_received"] < run["events_expected"]
                            or run["events_bad_signatures"]):
                        raise SystemExit(
                            f"mta-events: the webhook got {run['events_received']} of "
                            f"{run['events_expected']} events in 60 s after the last "
                            "delivery: not an events figure")
                    if name.startswith("mta-dkim") and (run["signed"] < run["sink_received"]
                                               or not run["sink_received"]
                                               or not run.get("sample_verified")):
                        raise SystemExit(
                            f"{name}: {run['sink_received'] - run['signed']} of "
                            f"{run['sink_received']} messages reached the sink unsigned, or "
                            "the sample's signature did not verify: not a signing figure")
    lines = []
    for g in result.groups:
        lab = g["labels"]
        lost = sum(r["lost"] for r in g["runs"])
        lines.append(f"relay {lab['target']} c={lab['concurrency']}: "
                     f"{fmt(result.summary('msgs_per_s', **lab))} msg/s end to end; lost "
                     f"{lost}; delivery latency p50 "
                     f"{fmt(result.summary('delivery_p50_ms', **lab))} ms (n/a: not logged); "
                     f"node CPU {fmt(result.summary('node_cpu_us_per_msg', **lab))} us/msg; "
                     f"signed {sum(r['signed'] for r in g['runs'])}")
    lines += ratio_lines(result, "msgs_per_s", "relay")
    finish(result, lines, args)


if __name__ == "__main__":
    main()
