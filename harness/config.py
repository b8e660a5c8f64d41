"""Node configs for tests and benchmarks: a dict of sections, written out as TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mta.config import Config, config_from_dict


def node_config(spool: Path, /, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a test node on free loopback ports; ``sections`` override keys."""
    raw: dict[str, Any] = {
        "node": {"id": "test-node", "log_format": "json", "log_level": "warning"},
        "smtp": {"listen": "127.0.0.1:0", "hostname": "mx.test.example"},
        "spool": {"path": str(spool), "shards": 4},
        "admin": {"listen": "127.0.0.1:0", "token": "t0ken"},
        # Ingress and spool tests keep what they submit; delivery tests turn this on.
        "delivery": {"enabled": False, "accounting_log": str(spool.parent / "accounting.jsonl"),
                     "mta_sts_cache": str(spool.parent / f"{spool.name}.mta-sts.json")},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    if raw.get("cluster", {}).get("etcd"):
        # A cluster replicates unless told otherwise; the harness's clusters share one spool
        # directory unless the caller asks for replicas.
        raw["spool"].setdefault("replicas", 1)
    return raw


def make_config(spool: Path, /, **sections: dict[str, Any]) -> Config:
    """``node_config`` parsed, for a node run in process."""
    return config_from_dict(node_config(spool, **sections), "<test>")


def toml_dumps(raw: dict[str, Any]) -> str:
    """Just enough TOML for test configs (tables of scalars and lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def key(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'

    out: list[str] = []

    def table(path: str, tbl: dict[str, Any]) -> None:
        out.append(f"[{path}]")
        out.extend(f"{key(k)} = {value(v)}" for k, v in tbl.items() if not isinstance(v, dict))
        out.append("")
        for k, v in tbl.items():
            if isinstance(v, dict):
                table(f"{path}.{key(k)}", v)

    for section, tbl in raw.items():
        table(section, tbl)
    return "\n".join(out)
