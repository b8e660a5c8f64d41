"""Fixtures: every async test runs on both the asyncio and the uvloop event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from mta.ingress.auth import hash_password
from mta.node import Node
from tests.support import EtcdServer, Sink, World, greylisting_script, make_config


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd server per test module."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    """A loopback SMTP sink per test module that greylists held.test and later.test."""
    s = Sink("127.0.0.1", 0, greylisting_script())
    s.start()
    yield s
    s.stop()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process nodes: ``node = await start_node(smtp={...})``; stopped at teardown."""
    nodes: list[Node] = []

    async def start(**sections: dict[str, Any]) -> Node:
        cfg = make_config(tmp_path / f"spool{len(nodes)}", **sections)
        node = Node(cfg)
        await node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        await node.stop()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    cert = tls_ca.issue_cert("mx.test.example", "127.0.0.1", "localhost")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("users") / "users"
    # Cheap scrypt parameters keep the suite fast; the format and code path are the real ones.
    path.write_text(f"# test users\nalice:{hash_password('s3cret', ln=10)}\n")
    return str(path)


@pytest.fixture
async def world(start_node: Any, tmp_path: Path) -> AsyncIterator[World]:
    w = World(start_node, tmp_path)
    yield w
    if w.node is not None:
        await w.node.stop()
    w.close()
