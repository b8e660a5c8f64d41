"""Tenants (issue 18): one tenant's backlog must not hold up another tenant's mail.

    python -m benchmarks tenants [--bulk 20000] [--urgent 100] [--rate 500/s]
                                 [--modes tenants,one-tenant] [--repeat 3] [--quick]

One standalone node relays everything to a loopback sink standing for one receiving site,
which the node paces itself: ``[delivery.sites."127.0.0.1:PORT"] rate = "500/s"``, 20
connections. Tenant A (``X-MTA-Tenant: bulk``) submits ``--bulk`` messages over 50 sessions
as fast as the node takes them, so a backlog of about bulk / rate seconds builds up; once A has
its last ``250``, tenant B (``X-MTA-Tenant: alerts``) submits ``--urgent`` messages over 4
sessions. The sink records when each message (its ``X-Bench-Id``) arrived.

Per run, for B: *span*, from B's first submission (the start of its sessions) to its last
message at the sink; p50 / p99 / max of each B message's latency from its ``250`` to its
arrival; and A's messages still undelivered when B began and when B's last message arrived.
Mode ``one-tenant`` is the baseline without fairness, had without changing the node: B's mail
carries A's tenant name, so it waits oldest-first behind A's backlog. Every run then waits
until the sink holds every accepted message (*lost* must be 0). Goal (issue 18): B's mail is
delivered within a few seconds (read: span <= 5 s), not after A's.
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from benchmarks.common import free_port, launch_node, node_sections, stop_node
from benchmarks.harness import (
    Result,
    Tick,
    add_quick,
    common_options,
    finish,
    fmt,
    percentile,
    progress,
    quick_options,
    settle,
)
from benchmarks.loadgen import Load, LoadResult, run_load
from benchmarks.sink import Sink
from benchmarks.targets import workdir
from mta.config import parse_rate

A_TENANT = "bulk"
B_TENANT = "alerts"
MODES = {"tenants": B_TENANT, "one-tenant": A_TENANT}  # mode: the tenant B's mail carries
GOAL_SPAN_S = 5.0  # "within a few seconds"
BIN_S = 0.25  # timeline resolution, seconds


def _sections(work: Any, sink_port: int, rate: str, connections: int) -> str:
    """Relay everything to the sink; the sink's site paced at ``rate``."""
    delivery = (f'smarthost = "127.0.0.1:{sink_port}"\nmax_connections = {connections}\n'
                "max_messages_per_connection = 1000\n")
    return (node_sections(work, delivery)
            + f'[delivery.sites."127.0.0.1:{sink_port}"]\nrate = "{rate}"\n')


def _timeline(times: list[float], t0: float, end: float) -> list[int]:
    """Messages arrived per ``BIN_S`` from ``t0`` up to ``end``."""
    bins = [0] * (int((end - t0) / BIN_S) + 1)
    for t in times:
        if t0 <= t <= end:
            bins[int((t - t0) / BIN_S)] += 1
    return bins


def run_tenants(mode: str, bulk: int, urgent: int, rate: str, connections: int, size: str,
                tick: Tick | None = None) -> dict[str, Any]:
    work = workdir("tenants-")
    sink_port, smtp_port, admin_port = free_port(), free_port(), free_port()
    b_name = MODES[mode]
    try:
        with Sink(work, sink_port, times=True) as sink:
            node, log = launch_node(work, smtp_port, admin_port, 50, "warning",
                                    _sections(work, sink_port, rate, connections))
            try:
                a = run_load(smtp_port, Load(bulk, 50, 2, size,
                                             headers=f"X-MTA-Tenant: {A_TENANT}\r\n"), tick)
                b = run_load(smtp_port, Load(urgent, 4, 1, size,
                                             headers=f"X-MTA-Tenant: {b_name}\r\n"), tick)
                _wait(sink, a, b, rate, tick)
            finally:
                stop_node(node, log)
        return _figures(mode, b_name, a, b, sink, rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _wait(sink: Sink, a: LoadResult, b: LoadResult, rate: str, tick: Tick | None) -> None:
    """Until the sink holds every accepted message, or twice the time the site's pace needs
    plus a minute."""
    want = a.accepted + b.accepted
    deadline = time.time() + 60 + 2 * want / parse_rate(rate)
    reported = 0
    while time.time() < deadline:
        got = min(sink.count, want)
        if tick is not None and got > reported:
            tick(got - reported)
            reported = got
        if sink.count >= want and not (set(a.ids) | set(b.ids)) - set(sink.ids()):
            break
        time.sleep(0.1)
    if tick is not None:
        tick(a.accepted + b.accepted - reported)


def _figures(mode: str, b_name: str, a: LoadResult, b: LoadResult, sink: Sink,
             rate: str) -> dict[str, Any]:
    arrived = sink.arrivals()
    seen = sink.ids()
    a_at = sorted(arrived[i] for i in a.ids if i in arrived)
    b_at = sorted(arrived[i] for i in b.ids if i in arrived)
    b_lat = sorted(arrived[i] - t for i, t in zip(b.ids, b.acked_at, strict=True)
                   if i in arrived)
    b_last = b_at[-1] if len(b_at) == b.accepted and b_at else float("nan")
    accepted = set(a.ids) | set(b.ids)
    end = max(a_at[-1:] + b_at[-1:], default=a.start)
    return {
        "mode": mode, "b_tenant": b_name, "rate": rate,
        "a_accepted": a.accepted, "b_accepted": b.accepted,
        "refused": a.refused + b.refused, "errors": a.errors + b.errors,
        "unsent": a.unsent + b.unsent,
        "a_submit_s": a.end - a.start, "b_submit_s": b.end - b.start,
        # What B found queued, and what of it was still queued once B was all delivered.
        "a_queued_at_b_start": a.accepted - sum(1 for t in a_at if t <= b.start),
        "a_left_at_b_done": (a.accepted - sum(1 for t in a_at if t <= b_last)
                             if b_at and len(b_at) == b.accepted else float("nan")),
        "b_span_s": b_last - b.start,
        "b_first_s": b_at[0] - b.start if b_at else float("nan"),
        "b_p50_s": percentile(b_lat, 50), "b_p99_s": percentile(b_lat, 99),
        "b_max_s": b_lat[-1] if b_lat else float("nan"),
        # From A's first submission: when the sink had all of A's mail, and the pace the
        # site kept while the backlog lasted.
        "a_drained_s": a_at[-1] - a.start if len(a_at) == a.accepted and a_at
        else float("nan"),
        "site_msgs_per_s": ((len(a_at) + len(b_at)) / (end - min(a_at[:1] + b_at[:1]))
                            if len(a_at) + len(b_at) > 1 else float("nan")),
        "delivered": len(accepted & set(seen)), "lost": len(accepted - set(seen)),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "b_latencies_s": [round(x, 4) for x in b_lat],
        # Arrivals per BIN_S seconds from A's first submission (the timeline plot).
        "timeline": {"bin_s": BIN_S, "b_start_s": b.start - a.start,
                     "a": _timeline(a_at, a.start, end), "b": _timeline(b_at, a.start, end)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks tenants",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--bulk", type=int, default=20_000, help="tenant A's messages")
    ap.add_argument("--urgent", type=int, default=100,
                    help="tenant B's messages, sent once A has all its 250s")
    ap.add_argument("--rate", default="500/s", help="the receiving site's pace ([delivery."
                    "sites] rate): bulk / rate is how long A's backlog lasts")
    ap.add_argument("--connections", type=int, default=20,
                    help="the node's connections to the site")
    ap.add_argument("--size", default="5", help="KB per message (as the load generator takes)")
    ap.add_argument("--modes", default="tenants,one-tenant",
                    help="tenants: B sends as its own tenant; one-tenant: B's mail carries "
                         "A's name (the FIFO baseline)")
    common_options(ap, repeat=3)
    add_quick(ap, "2,000 bulk at 200/s, 20 urgent, 1 run of each mode")
    args = ap.parse_args()
    quick_options(ap, args, "tenants", bulk=2000, urgent=20, rate="200/s", repeat=1,
                  settle=0.5)
    try:
        parse_rate(args.rate)
    except ValueError as exc:
        raise SystemExit(f"--rate: {exc}") from None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {', '.join(bad)} (choose from {', '.join(MODES)})")
    result = Result("tenants", {**vars(args), "modes": modes, "a_tenant": A_TENANT,
                                "goal_span_s": GOAL_SPAN_S})
    per_run = 2 * (args.bulk + args.urgent)  # accepted + delivered
    with progress(args.repeat * len(modes) * per_run, "tenants (accepted + delivered)") as bar:
        for i in range(args.repeat):
            for mode in modes:
                bar.status(f"run {i + 1}/{args.repeat} {mode}")
                settle(args.settle)
                run = run_tenants(mode, args.bulk, args.urgent, args.rate, args.connections,
                                  args.size, bar.update)
                result.add({"mode": mode}, run)
                bar.say(f"run {i + 1}: {mode}: B ({run['b_tenant']}) {run['b_accepted']} "
                        f"at the sink {run['b_span_s']:.2f} s after its first submission "
                        f"(p50 {run['b_p50_s']:.2f} s, p99 {run['b_p99_s']:.2f} s), "
                        f"{run['a_queued_at_b_start']:.0f} of A's queued when B began, "
                        f"{run['a_left_at_b_done']:.0f} still queued at B's last; A drained "
                        f"after {run['a_drained_s']:.1f} s at {run['site_msgs_per_s']:.0f} "
                        f"msg/s; lost {run['lost']}, duplicates {run['duplicates']}")
                if run["lost"] or run["refused"] or run["errors"]:
                    raise SystemExit(f"{mode}: lost {run['lost']}, refused {run['refused']}, "
                                     f"errors {run['errors']}: not a fairness figure")
    lines = []
    for g in result.groups:
        lab = g["labels"]
        lines.append(
            f"tenants {lab['mode']}: B's {args.urgent} at the sink "
            f"{fmt(result.summary('b_span_s', **lab), 2)} s after its first submission, "
            f"p50 {fmt(result.summary('b_p50_s', **lab), 2)} s, p99 "
            f"{fmt(result.summary('b_p99_s', **lab), 2)} s; A's still queued at B's last: "
            f"{fmt(result.summary('a_left_at_b_done', **lab))} of "
            f"{fmt(result.summary('a_queued_at_b_start', **lab))} queued when B began")
    span = result.summary("b_span_s", mode="tenants")
    if span.get("n"):
        lines.append(f"goal (B within a few seconds, <= {GOAL_SPAN_S:g} s): "
                     + ("met" if span["max"] <= GOAL_SPAN_S else "MISSED")
                     + f" (worst run {span['max']:.2f} s)")
    finish(result, lines, args)


if __name__ == "__main__":
    main()
