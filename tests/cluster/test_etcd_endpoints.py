"""etcd endpoints written as etcdctl users write them (``http://host:port/``,
``https://host:port``) work; what the node cannot use is refused with the key named, before
anything starts. TLS and etcd users: test_etcd_security.py."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from mta.config import ConfigError, config_from_dict
from tests.support import EtcdServer, NodeProcess, node_config


def _cluster(etcd: list[Any]) -> dict[str, Any]:
    return {"etcd": etcd, "name": "c"}


@pytest.mark.parametrize(("given", "stored"), [
    ("127.0.0.1:2379", "127.0.0.1:2379"),
    ("http://127.0.0.1:2379", "127.0.0.1:2379"),
    ("HTTP://etcd-1.internal:2379/", "etcd-1.internal:2379"),
    ("http://[::1]:2379", "[::1]:2379"),
    ("https://127.0.0.1:2379/", "https://127.0.0.1:2379"),
    ("HTTPS://[::1]:2379", "https://[::1]:2379"),
])
def test_endpoint_forms_are_accepted(tmp_path: Path, given: str, stored: str) -> None:
    cfg = config_from_dict(node_config(tmp_path, cluster=_cluster([given])))
    assert cfg.cluster.etcd == (stored,)


@pytest.mark.parametrize(("given", "says"), [
    ("https://127.0.0.1", "host:port"),
    ("http://127.0.0.1", "host:port"),
    ("127.0.0.1:0", "port 1-65535"),
    (2379, "host:port"),
])
def test_unusable_endpoints_name_the_key(tmp_path: Path, given: Any, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(node_config(tmp_path, cluster=_cluster([given])))
    assert "[cluster] etcd" in str(err.value) and says in str(err.value)


def test_a_node_joins_etcd_through_an_http_url(tmp_path: Path, etcd: EtcdServer) -> None:
    name = f"url-{uuid.uuid4().hex[:8]}"
    url = f"http://{etcd.endpoint}/"
    raw = node_config(tmp_path / "spool", node={"id": "a"},
                      cluster={"etcd": [url], "name": name, "lease_ttl": 3.0})
    (tmp_path / "a").mkdir()
    node = NodeProcess(tmp_path / "a", raw).start()
    try:
        assert f"/mta/{name}/nodes/a" in etcd.get_prefix(f"/mta/{name}/nodes/")
    finally:
        node.kill()
