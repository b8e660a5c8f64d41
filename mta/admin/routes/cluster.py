"""This node's status and the cluster: members, drain, shards, rebalance."""

from __future__ import annotations

import time

from aiohttp import web

import mta
from mta.admin.errors import ApiError, json_response
from mta.admin.routes.base import Resource
from mta.coordinator import Member

_MAX_REBALANCE_WAIT = 3600  # seconds; a finite bound for the owners to follow

__all__ = ["Cluster"]


def _state(m: Member) -> str:
    """``up``, ``draining``, or ``lease expiring`` for a member that has stopped refreshing
    its lease (killed, paused, cut off): it is listed, and owns its shards, until the lease
    runs out."""
    if m.lease_expiring is not None:
        return "lease expiring"
    return "draining" if m.draining else "up"


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
        """The shard table: assignment, owner and fencing token of each shard."""
        table = await self.api.node.coordinator.shards()
        expiring = {m.node for m in await self.api.members(leases=True)
                    if m.lease_expiring is not None}
        return json_response({"shards": [
            {"shard": s.shard, "assigned": s.assigned, "owner": s.owner, "token": s.token,
             "owner_lease_expiring": s.owner in expiring}
            for s in table], "total": self.api.node.spool.total_shards,
            "unowned": sum(1 for s in table if s.owner is None)})

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
