"""etcd over TLS (CA, client certificate and key) and with etcd's users: a node process
joins such an etcd and runs; one that etcd turns away (a CA that did not sign etcd's
certificate, a wrong password) says why in one line at start; with expiring auth tokens it
authenticates again and keeps working; and the [cluster] etcd keys are checked at load,
naming the key and the file."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from harness.etcd import EtcdTls
from mta.config import Config, ConfigError, Secret, config_from_dict
from tests.support import (
    EtcdServer,
    NodeProcess,
    ctl,
    node_config,
    submit,
    toml_dumps,
    wait_until_sync,
)
from tests.support.ctl import mta

SOURCE = "/etc/mta/etcd-test.toml"
PASSWORD = "etcd-root-pw-4f1e9a"  # distinctive: searched for in outputs
USER_PASSWORD = "etcd-user-pw-7c2d0b"
SHARDS = 4
TOKEN_TTL = 1.0  # seconds an etcd auth token lives, used or not (JWT)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> EtcdTls:
    return EtcdTls.make(tmp_path_factory.mktemp("etcd-tls"))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory, tls: EtcdTls) -> Iterator[EtcdServer]:
    """etcd on TLS only, asking clients for a certificate signed by its CA."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-on-tls") / "data", tls=tls).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd with auth enabled (user root) and tokens that expire TOKEN_TTL after login."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-auth") / "data", root_password=PASSWORD,
                        token_ttl=f"{TOKEN_TTL:g}s").start()
    yield server
    server.stop()


def _raw(tmp_path: Path, name: str, **cluster: Any) -> dict[str, Any]:
    return node_config(tmp_path / "spool", node={"id": "a", "log_level": "info"},
                       spool={"shards": SHARDS},
                       cluster={"name": name, "lease_ttl": 3.0, **cluster})


def _start(tmp_path: Path, name: str, **cluster: Any) -> NodeProcess:
    (tmp_path / "a").mkdir()
    return NodeProcess(tmp_path / "a", _raw(tmp_path, name, **cluster)).start()


def _runs(node: NodeProcess, etcd: EtcdServer, name: str) -> dict[str, tuple[bytes, int]]:
    """The node leads, owns every shard, and answers 250; its owner keys."""
    prefix = f"/mta/{name}/"
    owners = wait_until_sync(
        lambda: (keys := etcd.get_prefix(prefix)).get(f"{prefix}leader", (b"",))[0] == b"a"
        and len([k for k in keys if k.startswith(f"{prefix}owner/")]) == SHARDS and keys,
        10, "the node to lead and own every shard")
    submit(node, ["someone@example.org"], 1)
    return {k: v for k, v in owners.items() if k.startswith(f"{prefix}owner/")}


def _start_error(tmp_path: Path, raw: dict[str, Any]) -> str:
    """The one stderr line of a node that does not start."""
    path = tmp_path / "node.toml"
    path.write_text(toml_dumps(raw))
    res = mta("--config", str(path), cwd=tmp_path)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"mta: {path}: [cluster] etcd: "), lines[0]
    # Refused at once, not retried for a while as if etcd were down, then worded as such.
    assert "cannot reach etcd" not in lines[0], lines[0]
    return lines[0]


# --- TLS ---------------------------------------------------------------------------------------


def test_a_node_runs_on_etcd_over_tls_with_a_client_certificate(
        tmp_path: Path, tls_etcd: EtcdServer) -> None:
    name = f"tls-{uuid.uuid4().hex[:8]}"
    node = _start(tmp_path, name, **tls_etcd.cluster_keys())
    try:
        _runs(node, tls_etcd, name)
    finally:
        node.kill()


def test_host_port_endpoints_use_tls_when_a_ca_is_set(tmp_path: Path,
                                                      tls_etcd: EtcdServer) -> None:
    name = f"tls-{uuid.uuid4().hex[:8]}"
    node = _start(tmp_path, name, **{**tls_etcd.cluster_keys(), "etcd": [tls_etcd.endpoint]})
    try:
        _runs(node, tls_etcd, name)
    finally:
        node.kill()


def test_a_ca_that_did_not_sign_etcds_certificate_is_a_one_line_start_error(
        tmp_path: Path, tls_etcd: EtcdServer) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    raw = _raw(tmp_path, "wrong-ca", **{**tls_etcd.cluster_keys(), "etcd_ca": str(other)})
    line = _start_error(tmp_path, raw)
    assert "TLS handshake with etcd at " in line and "CERTIFICATE_VERIFY_FAILED" in line
    assert "etcd_ca" in line


def test_a_client_certificate_etcd_does_not_trust_is_a_one_line_start_error(
        tmp_path: Path, tls_etcd: EtcdServer) -> None:
    stranger = EtcdTls.make(tmp_path / "stranger")  # its own CA signed this client cert
    raw = _raw(tmp_path, "wrong-cert", **{**tls_etcd.cluster_keys(),
                                          "etcd_cert": str(stranger.client_cert),
                                          "etcd_key": str(stranger.client_key)})
    line = _start_error(tmp_path, raw)
    assert "TLS handshake with etcd at " in line and "BAD_CERTIFICATE" in line


# --- users ---------------------------------------------------------------------------------------


def _log_events(node: NodeProcess, event: str) -> list[dict[str, Any]]:
    out = []
    for line in node.log().splitlines():
        if line.startswith("{") and (record := json.loads(line)).get("event") == event:
            out.append(record)
    return out


def test_a_node_with_a_password_keeps_working_as_its_tokens_expire(
        tmp_path: Path, auth_etcd: EtcdServer) -> None:
    name = f"auth-{uuid.uuid4().hex[:8]}"
    auth_etcd.add_user(f"mta-{name}", USER_PASSWORD, f"/mta/{name}/")  # not root: one prefix
    password_file = tmp_path / "etcd.password"
    password_file.write_text(USER_PASSWORD + "\n")
    node = _start(tmp_path, name, etcd=[auth_etcd.url], etcd_username=f"mta-{name}",
                  etcd_password_file=str(password_file))
    try:
        owners = _runs(node, auth_etcd, name)
        # Each expiry is met by a new login, several times over: no call is lost to it.
        wait_until_sync(lambda: len(_log_events(node, "cluster.etcd_reauthenticate")) >= 2,
                        10 * TOKEN_TTL, "the node to log in again as its tokens expire")
        # The node never lost its lease (same owner keys, not fenced), and still writes
        # through its (fresh) token and acts on what it reads.
        assert _runs(node, auth_etcd, name) == owners
        assert not _log_events(node, "cluster.fenced")
        assert ctl(node, "throttle", "set", "slow.test", "10/h").returncode == 0
        assert f"/mta/{name}/config/throttle/slow.test" in auth_etcd.get_prefix(f"/mta/{name}/")
        assert USER_PASSWORD not in node.log()
    finally:
        node.kill()


def test_a_wrong_password_is_a_one_line_start_error(tmp_path: Path,
                                                    auth_etcd: EtcdServer) -> None:
    raw = _raw(tmp_path, "wrong-pw", **{**auth_etcd.cluster_keys(),
                                        "etcd_password": "not-the-password"})
    line = _start_error(tmp_path, raw)
    assert "refused user 'root'" in line and "authentication failed" in line
    assert "not-the-password" not in line


def test_no_user_against_etcd_with_auth_is_a_one_line_start_error(
        tmp_path: Path, auth_etcd: EtcdServer) -> None:
    line = _start_error(tmp_path, _raw(tmp_path, "no-user", etcd=[auth_etcd.url]))
    assert "refused the call: etcdserver: user name is empty" in line


# --- config --------------------------------------------------------------------------------------


_CA = trustme.CA()
_LEAF = _CA.issue_cert("mta-node")


def _pem(tmp_path: Path, name: str) -> str:
    """Real PEM material, as gRPC would load it: ``ca*`` the CA, ``k*`` a key, else the
    certificate that goes with that key."""
    path = tmp_path / name
    if name.startswith("ca"):
        _CA.cert_pem.write_to_path(str(path))
    elif name.startswith("k"):
        _LEAF.private_key_pem.write_to_path(str(path))
    else:
        _LEAF.cert_chain_pems[0].write_to_path(str(path))
    return str(path)


def test_tls_files_that_grpc_could_not_load_are_refused_naming_them(tmp_path: Path) -> None:
    key, cert = _pem(tmp_path, "k.pem"), _pem(tmp_path, "c.pem")
    text = _refused(tmp_path, "[cluster] etcd_ca", etcd_ca=key)  # a key, not a CA
    assert "as CA certificates" in text and key in text
    text = _refused(tmp_path, "[cluster] etcd_cert", etcd_cert=key, etcd_key=cert)  # swapped
    assert cert in text and key in text
    other = tmp_path / "other-key.pem"
    _CA.issue_cert("another").private_key_pem.write_to_path(str(other))
    assert "etcd_cert" in _refused(tmp_path, "[cluster] etcd_cert", etcd_cert=cert,
                                   etcd_key=str(other))


@pytest.mark.parametrize("endpoint", ["ftp://127.0.0.1:2379", "https://u:pw@127.0.0.1:2379",
                                      "127.0.0.1:2379/v3"])
def test_endpoints_with_another_scheme_a_user_or_a_path_are_refused(
        tmp_path: Path, endpoint: str) -> None:
    text = _refused(tmp_path, "[cluster] etcd", etcd=[endpoint])
    assert "no other scheme" in text and "u:pw" not in text  # a password is never echoed


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pw.fifo"
    os.mkfifo(fifo)
    text = _refused(tmp_path, "[cluster] etcd_password_file", etcd_username="mta",
                    etcd_password_file=str(fifo))
    assert "not a regular file" in text


def _load(tmp_path: Path, **cluster: Any) -> Config:
    raw = node_config(tmp_path / "spool", cluster={"etcd": ["127.0.0.1:2379"], **cluster})
    return config_from_dict(raw, SOURCE)


def _refused(tmp_path: Path, key: str, **cluster: Any) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, **cluster)
    text = str(info.value)
    assert info.value.key == key, text
    assert text.startswith(f"{SOURCE}: {key}: ") and "\n" not in text, text
    return text


def test_tls_and_user_keys_are_loaded(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text(f"  {PASSWORD}\n")
    c = _load(tmp_path, etcd_ca=_pem(tmp_path, "ca.pem"), etcd_cert=_pem(tmp_path, "c.pem"),
              etcd_key=_pem(tmp_path, "k.pem"), etcd_username="mta",
              etcd_password_file=str(password)).cluster
    assert c.etcd_tls and c.etcd == ("127.0.0.1:2379",)
    assert c.etcd_username == "mta" and c.etcd_password == Secret(PASSWORD.encode())
    assert PASSWORD not in repr(c)
    plain = _load(tmp_path).cluster
    assert not plain.etcd_tls and plain.etcd_password is None


def test_https_endpoints_mean_tls(tmp_path: Path) -> None:
    c = _load(tmp_path, etcd=["https://etcd-1:2379/", "etcd-2:2379"]).cluster
    assert c.etcd == ("https://etcd-1:2379", "etcd-2:2379") and c.etcd_tls


def test_mixed_http_and_https_endpoints_are_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[cluster] etcd",
                    etcd=["http://etcd-1:2379", "https://etcd-2:2379"])
    assert "mixes plain 'http://etcd-1:2379' and TLS 'https://etcd-2:2379'" in text


def test_an_http_endpoint_with_a_ca_is_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[cluster] etcd", etcd=["http://etcd-1:2379"],
                    etcd_ca=_pem(tmp_path, "ca.pem"))
    assert "plain http" in text


@pytest.mark.parametrize(("given", "missing"), [("etcd_cert", "etcd_key"),
                                                ("etcd_key", "etcd_cert")])
def test_a_certificate_without_its_key_is_refused(tmp_path: Path, given: str,
                                                  missing: str) -> None:
    text = _refused(tmp_path, f"[cluster] {missing}", **{given: _pem(tmp_path, "x.pem")})
    assert "go together" in text


@pytest.mark.parametrize("key", ["etcd_ca", "etcd_cert", "etcd_key", "etcd_password_file"])
def test_a_missing_file_is_refused_naming_key_and_file(tmp_path: Path, key: str) -> None:
    files = {"etcd_cert": _pem(tmp_path, "c.pem"), "etcd_key": _pem(tmp_path, "k.pem")}
    user = {"etcd_username": "mta"} if key == "etcd_password_file" else {}
    missing = str(tmp_path / "nowhere.pem")
    text = _refused(tmp_path, f"[cluster] {key}", **{**files, **user, key: missing})
    assert f"file {missing!r} does not exist" in text


def test_a_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ca.der"
    path.write_bytes(b"\x30\x82\x01\x0a")
    assert "not a PEM file" in _refused(tmp_path, "[cluster] etcd_ca", etcd_ca=str(path))


def test_user_and_password_go_together(tmp_path: Path) -> None:
    assert "set etcd_password" in _refused(tmp_path, "[cluster] etcd_password",
                                           etcd_username="mta")
    text = _refused(tmp_path, "[cluster] etcd_username", etcd_password=PASSWORD)
    assert PASSWORD not in text
    path = tmp_path / "pw"
    path.write_text(PASSWORD)
    text = _refused(tmp_path, "[cluster] etcd_password_file", etcd_username="mta",
                    etcd_password="x", etcd_password_file=str(path))
    assert "not both" in text and PASSWORD not in text


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("\n")
    text = _refused(tmp_path, "[cluster] etcd_password_file", etcd_username="mta",
                    etcd_password_file=str(path))
    assert "holds 0 bytes" in text and str(path) in text


def test_etcd_keys_without_etcd_are_refused(tmp_path: Path) -> None:
    raw = node_config(tmp_path / "spool", cluster={"etcd_username": "mta"})
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, SOURCE)
    assert info.value.key == "[cluster] etcd_username"
    assert "[cluster] etcd is empty" in str(info.value)


def test_a_config_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    raw = node_config(tmp_path / "spool", cluster={"etcd": ["127.0.0.1:2379"],
                                                   "etcd_cert": _pem(tmp_path, "c.pem")})
    path = tmp_path / "node.toml"
    path.write_text(toml_dumps(raw))
    res = mta("--config", str(path), "--check", cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"mta: config error: {path}: [cluster] etcd_key: etcd_cert "
                                  "and etcd_key go together (this node's client certificate "
                                  "and its key): set both, or neither")
