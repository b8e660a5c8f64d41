"""What the admin API reports about one node's queue and messages, and how the reports of
several nodes merge into one cluster-wide answer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mta.delivery.runtime import RuntimeIndex
from mta.envelope import Envelope, domain_key, received_at_of, shard_of
from mta.queue.state import DeliveryState, RecipientStatus
from mta.spool import MessageNotFound, StoredMessage

if TYPE_CHECKING:
    from mta.admin.facade import NodeFacade
    from mta.spool.index import MessageRef

__all__ = ["QUEUE_STATES", "QueueFilter", "list_view", "matching_ids", "matching_messages",
           "merge_lists", "merge_queues", "message_view", "queue_view"]

_HEADERS_SHOWN = 8192
QUEUE_STATES = ("pending", "held", "deferred")


def queue_view(node: NodeFacade) -> dict[str, Any]:
    """Live messages of this node by recipient domain, and its delivery sites."""
    now = time.time()
    engine = node.engine
    # Which runtime key holds a domain: its own, a *.suffix one, or its site's.
    held_by = (engine.held_by if engine is not None
               else RuntimeIndex(node.coordinator.runtime()).domain_hold)
    domains: dict[str, dict[str, Any]] = {}
    labels: dict[tuple[str, str], dict[str, Any]] = {}
    total = 0
    oldest_all = now
    refs = engine.live_refs() if engine is not None else [
        ref for shard in node.spool.owned for ref in node.spool.live_messages(shard)]
    for ref in refs:
        total += 1
        received = received_at_of(ref.id)
        oldest_all = min(oldest_all, received)
        due = engine.next_attempt(ref.id) if engine is not None else None
        sending = due is None and engine is not None and engine.in_flight(ref.id)
        if ref.labels is not None:
            entry = labels.get(ref.labels)
            if entry is None:
                entry = labels[ref.labels] = {"tenant": ref.tenant, "campaign": ref.campaign,
                                              "messages": 0, "in_flight": 0,
                                              "oldest_age": now - received}
            entry["messages"] += 1
            entry["in_flight"] += sending
            entry["oldest_age"] = max(entry["oldest_age"], now - received)
        for domain in ref.pending_domains():
            entry = domains.get(domain)
            if entry is None:
                entry = domains[domain] = {"domain": domain, "messages": 0, "oldest": received,
                                           "next_attempt": None, "in_flight": 0}
            entry["messages"] += 1
            entry["oldest"] = min(entry["oldest"], received)
            if sending:
                entry["in_flight"] += 1
            elif due is not None:
                nxt = max(due, now)
                if entry["next_attempt"] is None or nxt < entry["next_attempt"]:
                    entry["next_attempt"] = nxt
    for domain, entry in domains.items():
        entry["oldest_age"] = round(now - entry.pop("oldest"), 1)
        entry["held_by"] = held_by(domain)
        entry["suspended"] = entry["held_by"] is not None
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
                "held_by": site.held_by,
                "source": site.source,
                "blocked_for": round(max(0.0, site.blocked_until - time.monotonic()), 1),
            })
    return {
        "nodes": [node.node_id],
        "unreachable": [],
        "total": total,
        "oldest_age": round(now - oldest_all, 1) if total else 0.0,
        "domains": sorted(domains.values(), key=lambda d: (-d["messages"], d["domain"])),
        "sites": sites,
        # By (tenant, campaign), for mail that has either.
        "tenants": _by_messages([{**e, "oldest_age": round(e["oldest_age"], 1)}
                                 for e in labels.values()]),
    }


def _by_messages(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: (-e["messages"], e["tenant"], e["campaign"]))


def merge_queues(views: list[dict[str, Any]]) -> dict[str, Any]:
    """One queue summary from several nodes' summaries (counts add, ages take the worst)."""
    out: dict[str, Any] = {"nodes": [], "unreachable": [], "total": 0, "oldest_age": 0.0,
                           "domains": [], "sites": [], "tenants": []}
    domains: dict[str, dict[str, Any]] = {}
    labels: dict[tuple[str, str], dict[str, Any]] = {}
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
            # A node that has not routed the domain yet cannot see a site suspension.
            cur["held_by"] = cur.get("held_by") or d.get("held_by")
            cur["suspended"] = cur["suspended"] or d["suspended"]
        for t in view.get("tenants", ()):  # absent from a node older than tenants
            cur = labels.get((t["tenant"], t["campaign"]))
            if cur is None:
                labels[(t["tenant"], t["campaign"])] = dict(t)
                continue
            cur["messages"] += t["messages"]
            cur["in_flight"] += t["in_flight"]
            cur["oldest_age"] = max(cur["oldest_age"], t["oldest_age"])
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
            cur["blocked_for"] = max(cur.get("blocked_for", 0.0), s.get("blocked_for", 0.0))
            cur["held_by"] = cur.get("held_by") or s.get("held_by")
            if s["breaker"] != "closed":
                cur["breaker_nodes"][view["nodes"][0]] = s["breaker"]
                cur["breaker"] = s["breaker"] if cur["breaker"] == "closed" else cur["breaker"]
    out["domains"] = sorted(domains.values(), key=lambda d: (-d["messages"], d["domain"]))
    out["sites"] = [sites[k] for k in sorted(sites)]
    out["tenants"] = _by_messages(list(labels.values()))
    return out


def _recipient_views(env: Envelope, state: DeliveryState) -> list[dict[str, Any]]:
    """Each recipient's status and the last reply known for it: its final one, else its
    last transient one, with the host, time and count of its transient failures (a state
    written before those were kept per recipient has only the message's last reply, shown
    for every pending recipient once an attempt was made)."""
    views = []
    for i, rcpt in enumerate(env.recipients):
        r = state.results.get(i)
        if r is None:
            t = state.transients.get(i)
            reply = t.reply if t is not None else state.last_reply if state.attempts else ""
            views.append({"address": rcpt, "status": "held" if state.held else "pending",
                          "reply": reply or None, "class": None,
                          "remote": t.remote or None if t is not None else None,
                          "deferrals": t.count if t is not None else None,
                          "last_deferral": t.at if t is not None else None})
        else:
            views.append({"address": rcpt,
                          "status": "delivered" if r.status is RecipientStatus.DELIVERED
                          else "bounced",
                          "reply": r.reply, "class": r.bounce_class or None,
                          "remote": r.remote or None, "deferrals": None,
                          "last_deferral": None})
    return views


def _content(body: bytes, part: str, max_bytes: int) -> dict[str, Any]:
    """``headers``, ``body`` (after the blank line) or ``all`` of the message, at most
    ``max_bytes`` of it, decoded for display."""
    end = body.find(b"\r\n\r\n")
    if part == "headers":
        data = body if end < 0 else body[:end + 2]
    elif part == "body":
        data = b"" if end < 0 else body[end + 4:]
    else:
        data = body
    return {"part": part, "bytes": len(data), "truncated": len(data) > max_bytes,
            "text": data[:max_bytes].decode("utf-8", "replace")}


def message_view(node: NodeFacade, stored: StoredMessage, part: str | None = None,
                 max_bytes: int = 65536) -> dict[str, Any]:
    """Envelope, per-recipient state and headers of one live message, and ``part`` of its
    content (headers, body or all; at most ``max_bytes``) when asked for."""
    env = stored.envelope
    state = DeliveryState.from_wire(stored.state)
    engine = node.engine
    end = stored.body.find(b"\r\n\r\n")
    headers = stored.body[:end + 2 if end >= 0 else _HEADERS_SHOWN][:_HEADERS_SHOWN]
    view = {
        "id": stored.id,
        "node": node.node_id,
        "shard": shard_of(stored.id),
        "received_at": env.received_at or received_at_of(stored.id),
        "age": round(time.time() - (env.received_at or received_at_of(stored.id)), 1),
        "size": len(stored.body),
        "sender": env.sender,
        "recipients": _recipient_views(env, state),
        "held": state.held,
        "attempts": state.attempts,
        "next_attempt": engine.next_attempt(stored.id) if engine is not None else None,
        "in_flight": engine.in_flight(stored.id) if engine is not None else False,
        "last_reply": state.last_reply or None,
        "client_ip": env.client_ip,
        "tenant": env.tenant,
        "campaign": env.campaign,
        "helo": env.helo,
        "auth_user": env.auth_user or None,
        "headers": headers.decode("utf-8", "replace"),
    }
    if part is not None:
        view["content"] = _content(stored.body, part, max_bytes)
    return view


# --- the message list (mtactl queue list) and the filters of the actions by filter ----------


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """Which live messages a list or an action by filter takes; every criterion given must
    hold. Ages are seconds; ``next_before`` an epoch (held messages have no next attempt)."""

    sender: str | None = None  # "" = the null sender
    recipient: str | None = None  # a pending recipient, exactly (case-insensitive)
    domain: str | None = None  # a pending recipient's domain
    older_than: float | None = None
    newer_than: float | None = None
    state: str | None = None  # one of QUEUE_STATES
    next_before: float | None = None
    tenant: str | None = None  # exactly ("" = mail with no tenant)
    campaign: str | None = None

    def empty(self) -> bool:
        """No criterion at all: every message matches."""
        return all(getattr(self, name) is None for name in self.__slots__)

    def wants_envelope(self) -> bool:
        """Does matching need the envelope (read from the spool), not just the index?"""
        return self.sender is not None or self.recipient is not None

    def matches_ref(self, node: NodeFacade, ref: MessageRef, now: float) -> bool:
        """The criteria the index answers: tenant, campaign, domain, age, state, next
        attempt."""
        if (self.tenant is not None and ref.tenant != self.tenant) or (
                self.campaign is not None and ref.campaign != self.campaign):
            return False
        age = now - received_at_of(ref.id)
        if self.domain is not None and domain_key(self.domain) not in ref.pending_domains():
            return False
        if (self.older_than is not None and age < self.older_than) or (
                self.newer_than is not None and age > self.newer_than):
            return False
        if self.state is not None and _queue_state(ref) != self.state:
            return False
        if self.next_before is not None:
            due = _next_attempt(node, ref)
            return due is not None and due <= self.next_before
        return True

    def matches_envelope(self, env: Envelope, pending: list[int]) -> bool:
        """The criteria the envelope answers: sender and pending recipient."""
        if self.sender is not None and env.sender.lower() != self.sender.lower():
            return False
        if self.recipient is not None:
            want = self.recipient.lower()
            return any(env.recipients[i].lower() == want for i in pending)
        return True


def _queue_state(ref: MessageRef) -> str:
    """``held`` (by an operator), ``deferred`` (an attempt failed for now), else ``pending``."""
    state = DeliveryState.from_wire(ref.state)
    if state.held:
        return "held"
    return "deferred" if state.attempts else "pending"


def _next_attempt(node: NodeFacade, ref: MessageRef) -> float | None:
    """When it is tried next: now while in flight, None while held or not scheduled here."""
    engine = node.engine
    if engine is None or engine.is_held(ref.id):
        return None
    if engine.in_flight(ref.id):
        return time.time()
    return engine.next_attempt(ref.id)


def _owned_refs(node: NodeFacade) -> list[MessageRef]:
    refs = node.engine.live_refs() if node.engine is not None else [
        ref for shard in node.spool.owned for ref in node.spool.live_messages(shard)]
    return sorted(refs, key=lambda r: r.id)


async def matching_messages(node: NodeFacade, filt: QueueFilter, cursor: str = "",
                            limit: int | None = None
                            ) -> tuple[list[tuple[MessageRef, StoredMessage]], bool]:
    """This node's live messages matching ``filt``, in id (arrival) order after ``cursor``:
    at most ``limit`` of them, and whether more may follow. Only candidates the index
    admits are read from the spool."""
    now = time.time()
    found: list[tuple[MessageRef, StoredMessage]] = []
    for ref in _owned_refs(node):
        if ref.id <= cursor or not filt.matches_ref(node, ref, now):
            continue
        if limit is not None and len(found) >= limit:
            return found, True
        try:
            stored = await node.spool.load(ref.id)
        except MessageNotFound:
            continue  # finished since the index was read
        pending = DeliveryState.from_wire(stored.state).pending(len(stored.envelope.recipients))
        if filt.matches_envelope(stored.envelope, pending):
            found.append((ref, stored))
    return found, False


async def matching_ids(node: NodeFacade, filt: QueueFilter) -> list[str]:
    """Ids of this node's live messages matching ``filt``; the spool is read only when the
    filter needs envelopes."""
    if filt.wants_envelope():
        return [ref.id for ref, _stored in (await matching_messages(node, filt))[0]]
    now = time.time()
    return [ref.id for ref in _owned_refs(node) if filt.matches_ref(node, ref, now)]


def _list_item(node: NodeFacade, ref: MessageRef, stored: StoredMessage, now: float
               ) -> dict[str, Any]:
    env = stored.envelope
    state = DeliveryState.from_wire(stored.state)
    received = env.received_at or received_at_of(stored.id)
    return {
        "id": stored.id, "node": node.node_id, "shard": shard_of(stored.id),
        "sender": env.sender,
        "recipients": [env.recipients[i] for i in state.pending(len(env.recipients))],
        "received_at": received, "age": round(now - received, 1), "size": len(stored.body),
        "state": _queue_state(ref),
        "in_flight": node.engine is not None and node.engine.in_flight(stored.id),
        "attempts": state.attempts, "next_attempt": _next_attempt(node, ref),
        "last_reply": state.last_reply or None,
        "tenant": env.tenant, "campaign": env.campaign,
    }


async def list_view(node: NodeFacade, filt: QueueFilter, cursor: str, limit: int
                    ) -> dict[str, Any]:
    """One page of this node's matching messages (``more``: another page may follow)."""
    now = time.time()
    found, more = await matching_messages(node, filt, cursor, limit)
    return {"nodes": [node.node_id], "more": more,
            "messages": [_list_item(node, ref, stored, now) for ref, stored in found]}


def merge_lists(views: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """One page from several nodes' pages: each holds its first ``limit`` ids after the
    cursor, so the first ``limit`` of their union are the cluster's."""
    items = sorted((m for v in views for m in v["messages"]), key=lambda m: m["id"])
    more = len(items) > limit or any(v["more"] for v in views)
    page = items[:limit]
    more = more and bool(page)
    return {"nodes": [n for v in views for n in v["nodes"]], "messages": page, "more": more,
            "next_cursor": page[-1]["id"] if more else None}
