"""This node's status and the cluster: members, drain, shards, rebalance."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

import mta
from mta.admin.errors import ApiError, json_response
from mta.admin.routes.base import Resource, is_local
from mta.coordinator import Member, ShardInfo
from mta.replication.owner import shard_state

_MAX_REBALANCE_WAIT = 3600  # seconds; a finite bound for the owners to follow

__all__ = ["Cluster", "shard_table"]


def _state(m: Member) -> str:
    """``up``, ``draining``, or ``lease expiring`` for a member that has stopped refreshing
    its lease (killed, paused, cut off): it is listed, and owns its shards, until the lease
    runs out."""
    if m.lease_expiring is not None:
        return "lease expiring"
    return "draining" if m.draining else "up"


def shard_table(table: list[ShardInfo], expiring: set[str], total: int,
                replicated: tuple[int, int] | None = None,
                owned: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The ``/api/v1/shards`` answer. ``replicated`` is ``(replicas, min_insync)`` when the
    cluster replicates its spool: each row then also has ``followers`` (the placement),
    ``in_sync`` (the in-sync set, None before the first record), ``state`` (``in_sync``,
    ``under_replicated``, ``read_only``) and ``replication``: the owner's view of each
    follower (state, connected, acked position, lag in bytes), from ``owned`` (the answers
    of the nodes asked, shard -> their status) where the owner answered under the shard's
    token; None otherwise."""
    rows: list[dict[str, Any]] = [
        {"shard": s.shard, "assigned": s.assigned, "owner": s.owner, "token": s.token,
         "owner_lease_expiring": s.owner in expiring}
        for s in table]
    out: dict[str, Any] = {"shards": rows, "total": total,
                           "unowned": sum(1 for s in table if s.owner is None)}
    if replicated is None:
        return out
    replicas, min_insync = replicated
    # Two nodes may both report a shard during a handover: the table's token decides.
    detail: dict[int, list[Mapping[str, Any]]] = {}
    for answer in owned:
        for key, status in answer.items():
            detail.setdefault(int(key), []).append(status)
    for row, s in zip(rows, table, strict=True):
        row["followers"] = list(s.followers)
        row["in_sync"] = list(s.in_sync) if s.in_sync is not None else None
        row["state"] = (shard_state(len(s.in_sync), replicas, min_insync)
                        if s.in_sync is not None else None)
        status = next((st for st in detail.get(s.shard, ()) if st.get("token") == s.token),
                      None)
        if status is None or s.owner is None:
            row["replication"] = None
        else:
            row["replication"] = {
                peer: {"state": f.get("state"), "connected": f.get("connected"),
                       "acked": f.get("acked"), "lag_bytes": f.get("lag_bytes"),
                       "lag_records": f.get("lag_records"), "lag_age": f.get("lag_age")}
                for peer, f in dict(status.get("followers") or {}).items()}
    out["replicas"], out["min_insync"] = replicas, min_insync
    return out


class Cluster(Resource):
    """``/api/v1/status``, ``/nodes``, ``/nodes/{node}/(un)drain``, ``/shards``, ``/rebalance``."""

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/status", self.status)
        router.add_get("/api/v1/nodes", self.nodes)
        router.add_post("/api/v1/nodes/{node}/drain", self.drain)
        router.add_post("/api/v1/nodes/{node}/undrain", self.undrain)
        router.add_get("/api/v1/shards", self.shards)
        router.add_post("/api/v1/rebalance", self.rebalance)

    async def status(self, request: web.Request) -> web.Response:
        """This node: identity, shards, spool and session counts, lease and readiness."""
        node = self.api.node
        return json_response({
            "node": node.node_id,
            "version": mta.__version__,
            "uptime": round(time.time() - self.api.started, 1),
            "mode": "standalone" if node.cfg.standalone else "cluster",
            "shards_owned": len(node.spool.owned),
            "shards_total": node.spool.total_shards,
            "live_messages": node.spool.live_count(),
            "segments": node.spool.segment_count(),
            "smtp_sessions": node.smtp_sessions(),
            "fenced": node.fenced,
            "leader": node.coordinator.is_leader,
            "ready": node.ready(),
        })

    async def nodes(self, request: web.Request) -> web.Response:
        """The live members as the cluster store has them."""
        now = time.time()
        members = await self.api.members(leases=True)
        return json_response({"nodes": [
            {"node": m.node, "leader": m.leader, "draining": m.draining, "shards": m.shards,
             "smtp": m.smtp, "admin": m.admin, "version": m.version,
             "uptime": round(now - m.started, 1) if m.started else None,
             "state": _state(m), "lease_left": m.lease_expiring}
            for m in members]})

    async def shards(self, request: web.Request) -> web.Response:
        """The shard table: assignment, owner and fencing token of each shard; with a
        replicated spool also followers, in-sync set and, from each owner (asked with
        local=1), its followers' acked positions and lag."""
        node = self.api.node

        async def local() -> dict[str, Any]:
            return {"node": node.node_id,
                    "owned": {str(n): st for n, st in node.replication_status().items()}}

        if node.replicated and is_local(request):
            # How peers are asked: this node's part only, the shards it owns (no store read).
            return json_response(await local())
        table = await node.coordinator.shards()
        expiring = {m.node for m in await self.api.members(leases=True)
                    if m.lease_expiring is not None}
        if not node.replicated:
            return json_response(shard_table(table, expiring, node.spool.total_shards))
        answers = await self.api.fan_out(request, "/api/v1/shards", local)
        cfg = node.cfg.spool
        out = shard_table(table, expiring, node.spool.total_shards,
                          (cfg.replicas, cfg.min_insync),
                          [a.get("owned") or {} for a in answers.all])
        out["unreachable"] = answers.unreachable
        return json_response(out)

    async def _set_draining(self, request: web.Request, draining: bool) -> web.Response:
        node = request.match_info["node"]
        await self.api.node.coordinator.set_draining(node, draining)
        return json_response({"node": node, "draining": draining})

    async def drain(self, request: web.Request) -> web.Response:
        """Mark a node draining: its shards move to the others."""
        return await self._set_draining(request, True)

    async def undrain(self, request: web.Request) -> web.Response:
        """Take a node's draining mark away."""
        return await self._set_draining(request, False)

    async def rebalance(self, request: web.Request) -> web.Response:
        """Ask the leader to even out the shards; waits up to ``timeout`` seconds."""
        body = await self.api.optional_json_body(request)
        timeout = body.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) \
                or not 0 < timeout <= _MAX_REBALANCE_WAIT:
            raise ApiError.bad_request("timeout must be a positive number of seconds, at "
                                       f"most {_MAX_REBALANCE_WAIT}")
        return json_response(await self.api.node.coordinator.rebalance(float(timeout)))
