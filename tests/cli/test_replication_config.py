"""The replicated spool's config keys (issue 16), validated before the node replicates.

``[spool] replicas / min_insync / replica_timeout`` and ``[cluster] replication_listen /
replication_advertise / zone / secret / secret_file / tls_ca / tls_cert / tls_key``: each
key's valid forms, each refusal naming the key and the file, the rules between keys, a secret
that appears in no output (``mta --check``, errors, logs, the admin API), and the default
of two copies in a cluster."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mta.config import Config, ConfigError, Secret, config_from_dict
from tests.support import NodeProcess, node_config, toml_dumps, wait_until_sync
from tests.support.ctl import mta, one_line_error

SOURCE = "/etc/mta/replication-test.toml"
SECRET = "repl-secret-7f3a9c1e5b2d4086"  # distinctive: searched for in every output
OTHER_SECRET = "another-secret-0c9e8d7f6a5b4c3d"
ETCD = ["127.0.0.1:2379"]  # parsed only: no test here reaches etcd


def _replicated(**cluster: Any) -> dict[str, Any]:
    """A [cluster] table that replicas > 1 accepts, with ``cluster`` overriding keys."""
    return {"etcd": ETCD, "replication_listen": "127.0.0.1:0", "secret": SECRET, **cluster}


def _load(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    return config_from_dict(node_config(tmp_path / "spool", **sections), SOURCE)


def _refused(tmp_path: Path, key: str, **sections: dict[str, Any]) -> str:
    """The ConfigError's text, which must name ``key`` and the file."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, **sections)
    assert info.value.key == key, str(info.value)
    text = str(info.value)
    assert text.startswith(f"{SOURCE}: {key}: "), text
    assert "\n" not in text
    return text


def _tls_files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = tmp_path / f"{key}.pem"
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
        out[key] = str(path)
    return out


# --- defaults --------------------------------------------------------------------------------


def test_defaults_keep_todays_single_copy_behaviour(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert (cfg.spool.replicas, cfg.spool.min_insync, cfg.spool.replica_timeout) == (1, 1, 2.0)
    c = cfg.cluster
    assert (c.replication_listen, c.replication_advertise, c.zone) == (None, None, "")
    assert (c.secret, c.secret_file, c.tls_ca, c.tls_cert, c.tls_key) == (None, "", "", "", "")


def test_a_cluster_keeps_two_copies_unless_told_otherwise(tmp_path: Path) -> None:
    spool = {"path": str(tmp_path / "spool")}
    cluster = config_from_dict({"spool": spool, "cluster": _replicated()}, SOURCE)
    assert (cluster.spool.replicas, cluster.spool.min_insync) == (2, 2)
    one = config_from_dict({"spool": {**spool, "min_insync": 1}, "cluster": _replicated()},
                           SOURCE)
    assert (one.spool.replicas, one.spool.min_insync) == (2, 1)
    alone = config_from_dict({"spool": spool}, SOURCE)
    assert (alone.spool.replicas, alone.spool.min_insync) == (1, 1)
    shared = config_from_dict({"spool": {**spool, "replicas": 1}, "cluster": {"etcd": ETCD}},
                              SOURCE)
    assert (shared.spool.replicas, shared.cluster.replication_listen) == (1, None)
    # A cluster config from before replication (no peer channel): told both ways out.
    with pytest.raises(ConfigError) as info:
        config_from_dict({"spool": spool, "cluster": {"etcd": ETCD}}, SOURCE)
    assert info.value.key == "[cluster] replication_listen"
    assert "the default in a cluster" in str(info.value) and "replicas = 1" in str(info.value)


# --- [spool] replicas, min_insync, replica_timeout --------------------------------------------


@pytest.mark.parametrize("replicas", [2, 3, 5])
def test_min_insync_defaults_to_replicas(tmp_path: Path, replicas: int) -> None:
    cfg = _load(tmp_path, spool={"replicas": replicas}, cluster=_replicated())
    assert (cfg.spool.replicas, cfg.spool.min_insync) == (replicas, replicas)


@pytest.mark.parametrize("min_insync", [1, 2, 3])
def test_min_insync_up_to_replicas_is_accepted(tmp_path: Path, min_insync: int) -> None:
    cfg = _load(tmp_path, spool={"replicas": 3, "min_insync": min_insync},
                cluster=_replicated())
    assert cfg.spool.min_insync == min_insync


@pytest.mark.parametrize(("value", "seconds"), [("500ms", 0.5), (1, 1.0), ("2s", 2.0),
                                                (4.5, 4.5)])
def test_replica_timeout_forms(tmp_path: Path, value: Any, seconds: float) -> None:
    cfg = _load(tmp_path, spool={"replicas": 2, "replica_timeout": value},
                cluster=_replicated())  # lease_ttl 5s
    assert cfg.spool.replica_timeout == seconds


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("replicas", 0, "positive integer"),
    ("replicas", -1, "positive integer"),
    ("replicas", "2", "positive integer"),
    ("replicas", True, "positive integer"),
    ("replicas", 1.5, "positive integer"),
    ("min_insync", 0, "positive integer"),
    ("min_insync", "1", "positive integer"),
    ("replica_timeout", 0, "positive duration"),
    ("replica_timeout", "0s", "positive duration"),
    ("replica_timeout", -1, "positive duration"),
    ("replica_timeout", "soon", "duration"),
    ("replica_timeout", math.nan, "finite duration"),
])
def test_bad_spool_values_are_refused(tmp_path: Path, key: str, value: Any,
                                      expected: str) -> None:
    text = _refused(tmp_path, f"[spool] {key}", spool={key: value})
    assert expected in text


# --- [cluster] replication_listen, replication_advertise, zone -------------------------------


@pytest.mark.parametrize(("value", "parsed"), [
    ("127.0.0.1:7000", ("127.0.0.1", 7000)),
    ("[::1]:7000", ("::1", 7000)),
    ("10.1.2.3:0", ("10.1.2.3", 0)),  # a free port, for tests
    ("", None),
])
def test_replication_listen_forms(tmp_path: Path, value: str, parsed: Any) -> None:
    assert _load(tmp_path, cluster={"replication_listen": value}
                 ).cluster.replication_listen == parsed


@pytest.mark.parametrize("value", ["7000", "host:70000", 7000, "host:", ":7000"])
def test_bad_replication_listen_is_refused(tmp_path: Path, value: Any) -> None:
    assert "host:port" in _refused(tmp_path, "[cluster] replication_listen",
                                   cluster={"replication_listen": value})


@pytest.mark.parametrize(("value", "parsed"), [
    ("10.0.0.1:7000", ("10.0.0.1", 7000)),
    ("[2001:db8::1]:7000", ("2001:db8::1", 7000)),
    ("node1.example:7000", ("node1.example", 7000)),
])
def test_replication_advertise_forms(tmp_path: Path, value: str, parsed: Any) -> None:
    cfg = _load(tmp_path, cluster={"replication_listen": "0.0.0.0:7000",
                                   "replication_advertise": value})
    assert cfg.cluster.replication_advertise == parsed


@pytest.mark.parametrize("value", ["0.0.0.0:7000", "[::]:7000", "10.0.0.1:0", "nohost", 7000])
def test_an_address_peers_cannot_dial_is_refused_as_advertise(tmp_path: Path,
                                                              value: Any) -> None:
    _refused(tmp_path, "[cluster] replication_advertise",
             cluster={"replication_listen": "0.0.0.0:7000", "replication_advertise": value})


@pytest.mark.parametrize("value", ["eu-west-1a", "rack.2_b", "Z", "a" * 63, ""])
def test_zone_forms(tmp_path: Path, value: str) -> None:
    assert _load(tmp_path, cluster={"zone": value}).cluster.zone == value


@pytest.mark.parametrize("value", ["eu west", "a" * 64, "zone/1", "zoné", 5, " ", "-a"])
def test_bad_zone_is_refused(tmp_path: Path, value: Any) -> None:
    assert "label" in _refused(tmp_path, "[cluster] zone", cluster={"zone": value})


# --- [cluster] secret, secret_file, tls_* ----------------------------------------------------


@pytest.mark.parametrize("value", ["x" * 16, "é" * 8, SECRET])  # bytes, not characters
def test_secret_of_16_bytes_or_more_is_accepted(tmp_path: Path, value: str) -> None:
    secret = _load(tmp_path, cluster={"secret": value}).cluster.secret
    assert secret is not None and secret.reveal() == value.encode()


@pytest.mark.parametrize("value", ["short-secret", "é" * 7, "x" * 15])
def test_a_short_secret_is_refused_without_showing_it(tmp_path: Path, value: str) -> None:
    text = _refused(tmp_path, "[cluster] secret", cluster={"secret": value})
    assert "at least 16 bytes" in text
    assert value not in text


def test_a_secret_that_is_not_a_string_is_refused_without_showing_it(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[cluster] secret", cluster={"secret": 12345678901234567890})
    assert "expected a string" in text and "12345678901234567890" not in text


def test_secret_file_is_read_into_secret_without_surrounding_whitespace(
        tmp_path: Path) -> None:
    path = tmp_path / "repl.secret"
    path.write_text(SECRET + "\n")
    cluster = _load(tmp_path, cluster={"secret_file": str(path)}).cluster
    assert cluster.secret == Secret(SECRET.encode())
    assert cluster.secret_file == str(path)


def test_secret_file_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "repl.secret").write_text(SECRET)
    cluster = _load(tmp_path, cluster={"secret_file": "~/repl.secret"}).cluster
    assert cluster.secret_file == str(tmp_path / "repl.secret")


@pytest.mark.parametrize(("content", "expected"), [
    ("short-secret\n", "holds 12 bytes, expected at least 16"),
    (" \n", "holds 0 bytes"),
    ("x" * (64 * 1024 + 1), "larger than 64K"),
])
def test_a_bad_secret_file_is_refused_without_showing_it(tmp_path: Path, content: str,
                                                         expected: str) -> None:
    path = tmp_path / "repl.secret"
    path.write_text(content)
    text = _refused(tmp_path, "[cluster] secret_file", cluster={"secret_file": str(path)})
    assert expected in text and str(path) in text
    if content.strip():
        assert content.strip()[:12] not in text


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "is a directory"),
])
def test_an_unreadable_secret_file_is_refused(tmp_path: Path, make: Any,
                                              expected: str) -> None:
    text = _refused(tmp_path, "[cluster] secret_file",
                    cluster={"secret_file": str(make(tmp_path))})
    assert expected in text


def test_secret_and_secret_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "repl.secret"
    path.write_text(OTHER_SECRET)
    text = _refused(tmp_path, "[cluster] secret_file",
                    cluster={"secret": SECRET, "secret_file": str(path)})
    assert "not both" in text
    assert SECRET not in text and OTHER_SECRET not in text


def test_three_readable_tls_files_are_accepted(tmp_path: Path) -> None:
    files = _tls_files(tmp_path)
    cluster = _load(tmp_path, cluster=files).cluster
    assert (cluster.tls_ca, cluster.tls_cert, cluster.tls_key) == tuple(files.values())


@pytest.mark.parametrize("missing", ["tls_ca", "tls_cert", "tls_key"])
def test_tls_files_are_all_three_or_none(tmp_path: Path, missing: str) -> None:
    files = _tls_files(tmp_path)
    del files[missing]
    text = _refused(tmp_path, f"[cluster] {missing}", cluster=files)
    assert "all three" in text


@pytest.mark.parametrize("key", ["tls_ca", "tls_cert", "tls_key"])
@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p / "missing.pem", "does not exist"),
    (lambda p: p, "is a directory"),
])
def test_an_unreadable_tls_file_is_refused(tmp_path: Path, key: str, make: Any,
                                           expected: str) -> None:
    files = _tls_files(tmp_path)
    files[key] = str(make(tmp_path))
    assert expected in _refused(tmp_path, f"[cluster] {key}", cluster=files)


# --- rules between keys ----------------------------------------------------------------------


def test_replicas_without_etcd_is_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[spool] replicas", spool={"replicas": 2},
                    cluster=_replicated(etcd=[]))
    assert "standalone node has nobody to replicate to" in text
    assert "[cluster] etcd" in text and "replicas = 1" in text


def test_replicas_without_replication_listen_is_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[cluster] replication_listen", spool={"replicas": 2},
                    cluster=_replicated(replication_listen=""))
    assert "replicas = 2" in text and "replication_listen = " in text


def test_replicas_on_a_wildcard_listener_need_an_advertised_address(tmp_path: Path) -> None:
    for listen in ("0.0.0.0:7000", "[::]:7000"):
        text = _refused(tmp_path, "[cluster] replication_advertise", spool={"replicas": 2},
                        cluster=_replicated(replication_listen=listen))
        assert "no peer can dial" in text
        cfg = _load(tmp_path, spool={"replicas": 2},
                    cluster=_replicated(replication_listen=listen,
                                        replication_advertise="10.0.0.1:7000"))
        assert cfg.cluster.replication_advertise == ("10.0.0.1", 7000)
    # One copy: nobody dials it, so nothing is required.
    assert _load(tmp_path, cluster={"replication_listen": "0.0.0.0:7000"}).cluster


def test_an_advertised_address_without_a_listener_is_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[cluster] replication_advertise",
                    cluster={"replication_advertise": "10.0.0.1:7000"})
    assert "replication_listen" in text


def test_replicas_without_secret_or_tls_are_refused(tmp_path: Path) -> None:
    text = _refused(tmp_path, "[cluster] secret", spool={"replicas": 2},
                    cluster=_replicated(secret=""))
    assert "anyone who reaches the replication port could inject mail" in text
    assert "secret_file" in text and "tls_cert" in text


def test_replicas_with_tls_only_or_secret_file_only_are_accepted(tmp_path: Path) -> None:
    cfg = _load(tmp_path, spool={"replicas": 2}, cluster=_replicated(secret="",
                                                                     **_tls_files(tmp_path)))
    assert cfg.cluster.secret is None and cfg.cluster.tls_cert
    path = tmp_path / "repl.secret"
    path.write_text(SECRET)
    cfg = _load(tmp_path, spool={"replicas": 2},
                cluster=_replicated(secret="", secret_file=str(path)))
    assert cfg.cluster.secret == Secret(SECRET.encode())


@pytest.mark.parametrize(("spool", "shown"), [
    ({"replicas": 2, "min_insync": 3}, "at most replicas (2), got 3"),
    ({"min_insync": 2}, "at most replicas (1), got 2"),
])
def test_min_insync_above_replicas_is_refused(tmp_path: Path, spool: dict[str, Any],
                                              shown: str) -> None:
    assert shown in _refused(tmp_path, "[spool] min_insync", spool=spool,
                             cluster=_replicated())


@pytest.mark.parametrize(("timeout", "ttl"), [("2s", "2s"), ("5s", "3s"), (None, "2s")])
def test_replica_timeout_must_be_below_lease_ttl(tmp_path: Path, timeout: str | None,
                                                 ttl: str) -> None:
    spool: dict[str, Any] = {"replicas": 2}
    if timeout is not None:
        spool["replica_timeout"] = timeout  # None: the default, 2s
    text = _refused(tmp_path, "[spool] replica_timeout", spool=spool,
                    cluster=_replicated(lease_ttl=ttl))
    assert "less than [cluster] lease_ttl" in text and "raise lease_ttl" in text


def test_replica_timeout_with_one_copy(tmp_path: Path) -> None:
    # A short lease that predates the key keeps working while replica_timeout is unused ...
    cfg = _load(tmp_path, cluster={"etcd": ETCD, "lease_ttl": "2s"})
    assert (cfg.spool.replica_timeout, cfg.cluster.lease_ttl) == (2.0, 2.0)
    # ... but a value the operator wrote is checked all the same.
    _refused(tmp_path, "[spool] replica_timeout", spool={"replica_timeout": "5s"},
             cluster={"etcd": ETCD, "lease_ttl": "5s"})


# --- the secret is never shown ---------------------------------------------------------------


def test_a_config_printed_any_way_does_not_show_the_secret(tmp_path: Path) -> None:
    cfg = _load(tmp_path, spool={"replicas": 2}, cluster=_replicated())
    assert cfg.cluster.secret is not None and cfg.cluster.secret.reveal() == SECRET.encode()
    as_dict = dataclasses.asdict(cfg)
    for shown in (repr(cfg), str(cfg), f"{cfg.cluster}", str(cfg.cluster.secret),
                  repr(as_dict), json.dumps(as_dict, default=str)):
        assert SECRET not in shown
        assert "Secret('<hidden>')" in shown


def test_secrets_compare_by_value() -> None:
    # A SIGHUP reload compares sections to report what needs a restart.
    assert Secret(SECRET.encode()) == Secret(SECRET.encode())
    assert Secret(SECRET.encode()) != Secret(OTHER_SECRET.encode())
    assert hash(Secret(SECRET.encode())) == hash(Secret(SECRET.encode()))


def test_the_minimum_secret_is_the_one_the_peer_handshake_enforces() -> None:
    from mta.config import _MIN_SECRET
    from mta.replication.peerauth import MIN_SECRET

    assert _MIN_SECRET == MIN_SECRET


# --- mta --check and the running node --------------------------------------------------------




def _write(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(toml_dumps(node_config(tmp_path / "spool", **sections)))
    return path


def test_mta_check_accepts_the_keys_with_one_copy_and_does_not_print_the_secret(
        tmp_path: Path) -> None:
    path = _write(tmp_path, cluster=_replicated(zone="eu-west-1a"))
    res = mta("--check", "--config", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "configuration OK" in res.stdout
    assert SECRET not in res.stdout + res.stderr


def test_a_replicated_config_is_accepted_without_printing_the_secret(tmp_path: Path) -> None:
    path = _write(tmp_path, spool={"replicas": 2}, cluster=_replicated())
    res = mta("--check", "--config", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_mta_check_refuses_a_short_secret_without_printing_it(tmp_path: Path) -> None:
    path = _write(tmp_path, cluster={"secret": "tiny-secret"})
    line = one_line_error(mta("--check", "--config", str(path), cwd=tmp_path))
    assert f"{path}: [cluster] secret: expected at least 16 bytes" in line
    assert "tiny-secret" not in line


def test_mta_check_refuses_a_cross_key_rule_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path, spool={"replicas": 2}, cluster=_replicated(secret=""))
    line = one_line_error(mta("--check", "--config", str(path), cwd=tmp_path))
    assert f"{path}: [cluster] secret: " in line and "inject mail" in line


def _admin_get_paths() -> list[str]:
    """Every GET route of the admin API without a path parameter, from its own router (so a
    route added later is fetched too)."""
    from mta.admin.routes import register_all

    router = web.UrlDispatcher()
    register_all(router, object())  # type: ignore[arg-type] (handlers are only bound)
    return sorted({r.resource.canonical for r in router.routes()
                   if r.method == "GET" and r.resource is not None
                   and "{" not in r.resource.canonical})


def _get(url: str) -> str:
    """The answer's body; of a stream (the live trace), what arrives within 2 seconds."""
    req = urllib.request.Request(url, headers={"Authorization": "Bearer t0ken"})
    chunks: list[bytes] = []
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            while chunk := resp.read1(65536):
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:  # a 4xx answer is read all the same
        chunks.append(exc.read())
    except TimeoutError:
        assert chunks, f"{url}: nothing within 2 seconds"
    return b"".join(chunks).decode(errors="replace")


def test_the_running_node_logs_and_serves_no_secret(tmp_path: Path) -> None:
    raw = node_config(tmp_path / "spool", node={"log_level": "debug"},
                      cluster={"secret": SECRET, "zone": "z1"})
    node = NodeProcess(tmp_path, raw).start()
    try:
        paths = _admin_get_paths()
        assert "/api/v1/status" in paths
        for path in paths:
            assert SECRET not in _get(f"http://127.0.0.1:{node.admin_port}{path}"), path
        # A reload with another secret (logged: what needs a restart) and one with a short
        # secret (logged: why the reload failed).
        text = node.config_path.read_text()
        node.config_path.write_text(text.replace(SECRET, OTHER_SECRET))
        node.signal(signal.SIGHUP)
        wait_until_sync(lambda: "node.reloaded" in node.log(), 20, "node.reloaded")
        node.config_path.write_text(text.replace(SECRET, "tiny-secret"))
        node.signal(signal.SIGHUP)
        wait_until_sync(lambda: "node.reload_failed" in node.log(), 20, "node.reload_failed")
        node.signal(signal.SIGTERM)
        assert node.wait() == 0
    finally:
        node.kill()
    log = node.log()
    assert '"needs_restart": ["cluster"]' in log, log  # the changed secret, by section name
    assert "[cluster] secret: expected at least 16 bytes" in log, log
    for secret in (SECRET, OTHER_SECRET, "tiny-secret"):
        assert secret not in log


def test_mtactl_reaches_a_node_whose_config_predates_the_replicated_default(
        tmp_path: Path) -> None:
    """A shared-spool cluster's file from before replication: this version's node refuses it
    (one line saying what to set), but mtactl needs only [admin] from it and still works."""
    path = tmp_path / "old.toml"
    path.write_text(toml_dumps({"spool": {"path": str(tmp_path / "spool")},
                                "admin": {"listen": "127.0.0.1:9", "token": "t"},
                                "cluster": {"etcd": ETCD}}))
    assert "replicas = 1" in one_line_error(mta("--config", str(path), "--check",
                                                cwd=tmp_path))
    res = subprocess.run([sys.executable, "-m", "mta.cli.ctl", "--config", str(path),
                          "status"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    assert "127.0.0.1:9" in res.stderr and "config" not in res.stderr.split(":", 1)[0]
