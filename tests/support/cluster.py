"""Node processes sharing one spool directory, coordinated through a real etcd."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from harness.config import node_config
from harness.etcd import EtcdServer
from harness.node import NodeProcess
from harness.poll import wait_until_sync

TTL = 3.0  # fence margin 2 s: enough headroom for a loaded 2-core CI machine
SHARDS = 64


class Cluster:
    """Node processes sharing one spool directory, coordinated through ``etcd``."""

    def __init__(self, tmp_path: Path, etcd: EtcdServer, **delivery: Any) -> None:
        self.tmp_path = tmp_path
        self.etcd = etcd
        self.name = f"t{uuid.uuid4().hex[:8]}"
        self.prefix = f"/mta/{self.name}/"
        self.spool = tmp_path / "shared-spool"
        self.delivery = delivery
        self.nodes: dict[str, NodeProcess] = {}

    def start_node(self, node_id: str, smtp_port: int | None = None,
                   endpoints: list[str] | None = None, **smtp: Any) -> NodeProcess:
        work = self.tmp_path / node_id
        work.mkdir(exist_ok=True)
        raw = node_config(self.spool, node={"id": node_id, "log_level": "info"},
                          spool={"shards": SHARDS},
                          smtp=smtp,
                          cluster={"etcd": endpoints or [self.etcd.endpoint],
                                   "name": self.name,
                                   "lease_ttl": TTL},
                          delivery={"accounting_log": str(work / "acct.jsonl"),
                                    **self.delivery})
        node = NodeProcess(work, raw, smtp_port=smtp_port).start(timeout=30)
        self.nodes[node_id] = node
        return node

    def state(self) -> dict[str, Any]:
        keys = self.etcd.get_prefix(self.prefix)
        out: dict[str, Any] = {"leader": None, "nodes": set(), "assign": {}, "owner": {}}
        for key, (value, _rev) in keys.items():
            rest = key[len(self.prefix):]
            kind, _, arg = rest.partition("/")
            if rest == "leader":
                out["leader"] = value.decode()
            elif kind == "nodes":
                out["nodes"].add(arg)
            elif kind == "assign":
                out["assign"][int(arg)] = value.decode()
            elif kind == "owner":
                out["owner"][int(arg)] = value.decode()
        return out

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        try:
            return wait_until_sync(lambda: st if pred(st := self.state()) else None,
                                   timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.state()}") from None

    def settled(self, members: set[str]) -> Any:
        def pred(st: dict[str, Any]) -> bool:
            return (st["leader"] in members and len(st["owner"]) == SHARDS
                    and set(st["owner"].values()) == members
                    and all(st["assign"].get(s) == n for s, n in st["owner"].items()))
        return pred

    def stop(self) -> None:
        for node in self.nodes.values():
            node.kill()
