"""What the admin API reports about one node's queue and messages, and how the reports of
several nodes merge into one cluster-wide answer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from mta.envelope import received_at_of, shard_of
from mta.spool import StoredMessage

if TYPE_CHECKING:
    from mta.node import Node

__all__ = ["merge_queues", "message_view", "queue_view"]

_HEADERS_SHOWN = 8192


def queue_view(node: Node) -> dict[str, Any]:
    """Live messages of this node by recipient domain, and its delivery sites."""
    now = time.time()
    engine = node.engine
    suspended = node.coordinator.runtime().suspended
    domains: dict[str, dict[str, Any]] = {}
    total = 0
    oldest_all = now
    refs = engine.live_refs() if engine is not None else [
        ref for shard in node.spool.owned for ref in node.spool.live_messages(shard)]
    for ref in refs:
        total += 1
        received = received_at_of(ref.id)
        oldest_all = min(oldest_all, received)
        due = engine.next_attempt(ref.id) if engine is not None else None
        for domain in ref.pending_domains():
            entry = domains.get(domain)
            if entry is None:
                entry = domains[domain] = {"domain": domain, "messages": 0, "oldest": received,
                                           "next_attempt": None, "in_flight": 0}
            entry["messages"] += 1
            entry["oldest"] = min(entry["oldest"], received)
            if due is None and engine is not None and engine.in_flight(ref.id):
                entry["in_flight"] += 1
            elif due is not None:
                nxt = max(due, now)
                if entry["next_attempt"] is None or nxt < entry["next_attempt"]:
                    entry["next_attempt"] = nxt
    for domain, entry in domains.items():
        entry["oldest_age"] = round(now - entry.pop("oldest"), 1)
        entry["suspended"] = domain in suspended
        entry["throttle"] = engine.domain_rate(domain) if engine is not None else None
        entry["site"] = engine.site_of(domain) if engine is not None else None
    sites = []
    if engine is not None:
        for key, site in sorted(engine.sites.items()):
            sites.append({
                "site": key,
                "ready": len(site.ready),
                "connections": site.connections,
                "max_connections": site.limits.max_connections,
                "breaker": site.breaker.state,
                "retry_in": round(site.breaker.retry_in(), 1),
                "rate": site.rate_override if site.rate_override is not None
                else site.limits.rate,
                "backoff": round(site.backoff.factor, 3),
            })
    return {
        "nodes": [node.node_id],
        "unreachable": [],
        "total": total,
        "oldest_age": round(now - oldest_all, 1) if total else 0.0,
        "domains": sorted(domains.values(), key=lambda d: (-d["messages"], d["domain"])),
        "sites": sites,
    }


def merge_queues(views: list[dict[str, Any]]) -> dict[str, Any]:
    """One queue summary from several nodes' summaries (counts add, ages take the worst)."""
    out: dict[str, Any] = {"nodes": [], "unreachable": [], "total": 0, "oldest_age": 0.0,
                           "domains": [], "sites": []}
    domains: dict[str, dict[str, Any]] = {}
    sites: dict[str, dict[str, Any]] = {}
    for view in views:
        out["nodes"] += view["nodes"]
        out["unreachable"] += view["unreachable"]
        out["total"] += view["total"]
        out["oldest_age"] = max(out["oldest_age"], view["oldest_age"])
        for d in view["domains"]:
            cur = domains.get(d["domain"])
            if cur is None:
                domains[d["domain"]] = dict(d)
                continue
            cur["messages"] += d["messages"]
            cur["in_flight"] += d["in_flight"]
            cur["oldest_age"] = max(cur["oldest_age"], d["oldest_age"])
            nexts = [n for n in (cur["next_attempt"], d["next_attempt"]) if n is not None]
            cur["next_attempt"] = min(nexts) if nexts else None
            cur["site"] = cur["site"] or d["site"]
        for s in view["sites"]:
            cur = sites.get(s["site"])
            if cur is None:
                sites[s["site"]] = {**s, "breaker_nodes": {} if s["breaker"] == "closed"
                                    else {view["nodes"][0]: s["breaker"]}}
                continue
            cur["ready"] += s["ready"]
            cur["connections"] += s["connections"]
            cur["max_connections"] += s["max_connections"]
            cur["retry_in"] = max(cur["retry_in"], s["retry_in"])
            if s["breaker"] != "closed":
                cur["breaker_nodes"][view["nodes"][0]] = s["breaker"]
                cur["breaker"] = s["breaker"] if cur["breaker"] == "closed" else cur["breaker"]
    out["domains"] = sorted(domains.values(), key=lambda d: (-d["messages"], d["domain"]))
    out["sites"] = [sites[k] for k in sorted(sites)]
    return out


def message_view(node: Node, stored: StoredMessage) -> dict[str, Any]:
    """Envelope, per-recipient state and headers of one live message."""
    env = stored.envelope
    state = stored.state or {}
    results = state.get("r", {})
    recipients = []
    for i, rcpt in enumerate(env.recipients):
        r = results.get(str(i))
        if r is None:
            recipients.append({"address": rcpt, "status": "pending"})
        else:
            recipients.append({"address": rcpt,
                               "status": "delivered" if r[0] == "d" else "bounced",
                               "reply": r[1], "class": r[2] or None, "remote": r[3] or None})
    engine = node.engine
    end = stored.body.find(b"\r\n\r\n")
    headers = stored.body[:end + 2 if end >= 0 else _HEADERS_SHOWN][:_HEADERS_SHOWN]
    return {
        "id": stored.id,
        "node": node.node_id,
        "shard": shard_of(stored.id),
        "received_at": env.received_at or received_at_of(stored.id),
        "age": round(time.time() - (env.received_at or received_at_of(stored.id)), 1),
        "size": len(stored.body),
        "sender": env.sender,
        "recipients": recipients,
        "attempts": int(state.get("att", 0)),
        "next_attempt": engine.next_attempt(stored.id) if engine is not None else None,
        "in_flight": engine.in_flight(stored.id) if engine is not None else False,
        "last_reply": state.get("last", "") or None,
        "client_ip": env.client_ip,
        "helo": env.helo,
        "auth_user": env.auth_user or None,
        "headers": headers.decode("utf-8", "replace"),
    }
