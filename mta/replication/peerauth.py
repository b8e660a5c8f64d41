"""Authentication of replication peers: who is at the other end, proved before any frame.

A node configures one of two modes (:class:`PeerAuth`), the same on every node:

**Shared secret** (``[cluster] secret``, no certificates). A handshake of four messages, in
which the connecting side (the client) proves the secret first::

    client -> server  hello  {node, expect, nonce_c, mac, max_payload}
    server -> client  hello  {node, nonce_s, mac, max_payload}
    client -> server  finish {proof_c}
    server -> client  ok     {proof_s}    (only once proof_c checked out)

``proof_x = HMAC-SHA256(secret, "mta-repl/1 " + label_x + T)`` where ``T`` encodes every field
of both hellos (both nonces, both node ids, what the client expects, both caps) and the label
says which side proves: a proof cannot be reflected back to the side that made it, nor replayed
in another connection (fresh nonces). The server says nothing that depends on the secret
until the client has proved it: a stranger who connects gets a hello and a refusal, the same
whatever the secret, so no value to test guesses of the secret against offline. (The client
proves to whoever answers at the address it dialled as the node it expects; that end learns
a proof only by holding the address.) The client checks ``proof_s`` before it takes any frame:
the server is authenticated too. Then a per-connection key
``HKDF-SHA256(secret, salt=nonce_c||nonce_s, info=T)`` keys the MAC on every frame, with the
direction label ``c2s``/``s2c`` and a sequence number per direction (:mod:`.frames`).

**Mutual TLS** (``[cluster] tls_ca/tls_cert/tls_key``). Both ends present a certificate of the
cluster CA (only that CA is trusted, TLS >= 1.2, certificates required on both sides) and the
node id each one states in its hello must be one of its certificate's DNS subjectAltNames:
exact match, case-insensitive, no wildcards. The frames carry no MAC (TLS already
authenticates, orders and protects them), unless a secret is *also* configured: then the secret
handshake runs inside TLS and every frame is MAC'd too (defence in depth; a stolen certificate
alone is not enough).

Whatever the mode:

- The client states which node it expects (``expect``); a server proving another node id is
  refused (its advertised address may have been reused by another node), and so is a peer
  claiming our own node id (a connection reflected to ourselves).
- Both ends must run the same mode (secret or not): a mismatch is refused, never downgraded.
- A side that refuses tells the other why in a ``refused`` message, then closes; both raise
  :class:`AuthError`.
- ``insecure=True`` (no secret, no TLS) exists for tests and benchmarks only; the node's config
  refuses it for a cluster with replicas.
"""

from __future__ import annotations

import hmac
import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from mta.replication.frames import DEFAULT_MAX_PAYLOAD, AuthError, FrameMac, Header

__all__ = [
    "MIN_SECRET",
    "HandshakeLink",
    "PeerAuth",
    "Session",
    "client_handshake",
    "mutual_tls_contexts",
    "server_handshake",
]

VERSION = 1
MIN_SECRET = 16  # bytes; a short secret could be brute-forced offline from one handshake
_NONCE = 32
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,255}")
_PROOF_LABEL = b"mta-repl/1 "


@dataclass(frozen=True)
class PeerAuth:
    """How this node authenticates its replication peers (see the module docstring)."""

    node_id: str
    secret: bytes | None = None
    ssl_server: ssl.SSLContext | None = None
    ssl_client: ssl.SSLContext | None = None
    insecure: bool = False  # neither secret nor TLS: tests and benchmarks only

    def __post_init__(self) -> None:
        if not _NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"node id {self.node_id!r}: letters, digits, . _ - (1-255)")
        if self.secret is not None and len(self.secret) < MIN_SECRET:
            raise ValueError(f"the replication secret must be at least {MIN_SECRET} bytes")
        if (self.ssl_server is None) != (self.ssl_client is None):
            raise ValueError("mutual TLS needs both a server and a client context")
        if not (self.mac or self.tls or self.insecure):
            raise ValueError("replication peers need a shared secret or mutual TLS")

    @property
    def mac(self) -> bool:
        """Whether frames carry a MAC (a secret is configured)."""
        return self.secret is not None

    @property
    def tls(self) -> bool:
        """Whether connections run over mutual TLS."""
        return self.ssl_server is not None

    @classmethod
    def from_config(cls, node_id: str, *, secret: str | bytes | None = None,
                    tls_ca: str | None = None, tls_cert: str | None = None,
                    tls_key: str | None = None) -> PeerAuth:
        """From the ``[cluster]`` keys: TLS when all three files are given (raises
        ``ssl.SSLError``/``OSError`` on unreadable ones), a secret when one is given."""
        files = (tls_ca, tls_cert, tls_key)
        if any(files) and not all(files):
            raise ValueError("mutual TLS needs tls_ca, tls_cert and tls_key together")
        server = client = None
        if tls_ca and tls_cert and tls_key:
            server, client = mutual_tls_contexts(tls_ca, tls_cert, tls_key)
        key = secret.encode() if isinstance(secret, str) else secret
        return cls(node_id, secret=key or None, ssl_server=server, ssl_client=client)


def mutual_tls_contexts(tls_ca: str, tls_cert: str, tls_key: str
                        ) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts for mutual TLS: only the cluster CA is trusted, both sides
    present ``tls_cert``, TLS >= 1.2. Host names are not checked by ssl: the handshake checks
    the peer's node id against its certificate's SANs itself (exact, no wildcards)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # replaced by the node-id rule, which also covers servers
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=tls_ca)
        ctx.load_cert_chain(tls_cert, tls_key)
    return server, client


class HandshakeLink(Protocol):
    """What a handshake needs from a connection in the making."""

    def send_handshake(self, header: Header) -> None:
        """Send one handshake message (a frame with no payload and no MAC)."""

    async def recv_handshake(self) -> Header:
        """The next handshake message."""

    def peer_cert(self) -> dict[str, Any] | None:
        """The peer's verified certificate (``getpeercert()``), None without TLS."""


@dataclass(frozen=True)
class Session:
    """The outcome of a handshake: the authenticated peer and the frame MACs to use."""

    peer: str
    send_mac: FrameMac | None
    recv_mac: FrameMac | None
    peer_max_payload: int


def _refuse(link: HandshakeLink, reason: str) -> AuthError:
    """Tell the peer why, and return the error to raise here."""
    link.send_handshake({"hs": "refused", "reason": reason})
    return AuthError(reason)


def _expect(msg: Header, kind: str) -> Header:
    got = msg.get("hs")
    if got == "refused":
        raise AuthError(f"peer refused the handshake: {str(msg.get('reason'))[:200]}")
    if got != kind:
        raise AuthError(f"expected a handshake {kind}, got {str(got)[:40]!r}")
    return msg


def _check_hello(link: HandshakeLink, hello: Header, client: bool) -> str:
    """The node id of a well-formed hello; refuses a malformed one."""
    node, nonce, cap = hello.get("node"), hello.get("nonce"), hello.get("max_payload")
    expect = hello.get("expect") if client else None
    ok = (hello.get("v") == VERSION and isinstance(node, str) and _NODE_ID.fullmatch(node)
          and isinstance(nonce, bytes) and len(nonce) == _NONCE
          and isinstance(hello.get("mac"), bool)
          and isinstance(cap, int) and 0 <= cap < 2**32
          and (expect is None or isinstance(expect, str)))
    if not ok:
        raise _refuse(link, "malformed hello (another wire version?)")
    assert isinstance(node, str)
    return node


def _check_cert(link: HandshakeLink, node: str) -> None:
    """Refuses unless ``node`` is a DNS subjectAltName of the peer's verified certificate."""
    cert = link.peer_cert() or {}
    names = {value.lower() for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    if node.lower() not in names:
        raise _refuse(link, f"certificate does not name node {node}")


def _transcript(hello_c: Header, hello_s: Header) -> bytes:
    """Both hellos' fields, in a fixed order and encoding (what the proofs and key bind)."""
    fields = [VERSION]
    for hello, keys in ((hello_c, ("node", "expect", "nonce", "mac", "max_payload")),
                        (hello_s, ("node", "nonce", "mac", "max_payload"))):
        fields.extend(hello.get(k) for k in keys)
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def _nonce() -> bytes:
    """A fresh nonce for one handshake."""
    return os.urandom(_NONCE)


def _proof(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.digest(secret, _PROOF_LABEL + label + transcript, "sha256")


def _frame_key(secret: bytes, nonces: bytes, transcript: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of one 32-byte block: extract with the nonces, expand."""
    prk = hmac.digest(nonces, secret, "sha256")
    return hmac.digest(prk, b"mta-repl/1 frame key " + transcript + b"\x01", "sha256")


def _session(secret: bytes | None, hello_c: Header, hello_s: Header, peer: str,
             peer_cap: int, client: bool) -> Session:
    if secret is None:
        return Session(peer, None, None, peer_cap)
    key = _frame_key(secret, hello_c["nonce"] + hello_s["nonce"],
                     _transcript(hello_c, hello_s))
    c2s, s2c = FrameMac(key, b"c2s"), FrameMac(key, b"s2c")
    return Session(peer, *((c2s, s2c) if client else (s2c, c2s)), peer_cap)


async def client_handshake(link: HandshakeLink, auth: PeerAuth, expect_node: str | None,
                           max_payload: int = DEFAULT_MAX_PAYLOAD) -> Session:
    """Authenticate the server at the other end of ``link`` as ``expect_node`` (any other
    node when None) and prove ourselves; :class:`AuthError` if either fails."""
    hello_c: Header = {"hs": "hello", "v": VERSION, "node": auth.node_id, "expect": expect_node,
                       "nonce": _nonce(), "mac": auth.mac, "max_payload": max_payload}
    link.send_handshake(hello_c)
    hello_s = _expect(await link.recv_handshake(), "hello")
    server = _check_hello(link, hello_s, client=False)
    if expect_node is not None and server != expect_node:
        raise _refuse(link, f"expected node {expect_node}, reached {server}")
    if server == auth.node_id or hello_s["nonce"] == hello_c["nonce"]:
        raise _refuse(link, "connected to ourselves (a reflected connection)")
    if hello_s["mac"] != auth.mac:
        raise _refuse(link, "shared secret configured on one side only")
    if auth.tls:
        _check_cert(link, server)
    # We prove first (the server proves nothing to a peer that has not), then check its proof.
    transcript = _transcript(hello_c, hello_s)
    proof = None if auth.secret is None else _proof(auth.secret, b"client", transcript)
    link.send_handshake({"hs": "finish", "proof": proof})
    ok = _expect(await link.recv_handshake(), "ok")
    if auth.secret is not None:
        theirs = ok.get("proof")
        if not (isinstance(theirs, bytes)
                and hmac.compare_digest(theirs, _proof(auth.secret, b"server", transcript))):
            raise _refuse(link, "server failed to prove the shared secret (wrong secret?)")
    return _session(auth.secret, hello_c, hello_s, server, hello_s["max_payload"], client=True)


async def server_handshake(link: HandshakeLink, auth: PeerAuth,
                           max_payload: int = DEFAULT_MAX_PAYLOAD) -> Session:
    """Authenticate the client at the other end of ``link`` and prove ourselves;
    :class:`AuthError` if either fails."""
    hello_c = _expect(await link.recv_handshake(), "hello")
    client = _check_hello(link, hello_c, client=True)
    expect = hello_c.get("expect")  # _check_hello allowed it absent
    if expect is not None and expect != auth.node_id:
        raise _refuse(link, f"this is node {auth.node_id}, not {expect}")
    if client == auth.node_id:
        raise _refuse(link, "peer claims our own node id (a reflected connection)")
    if hello_c["mac"] != auth.mac:
        raise _refuse(link, "shared secret configured on one side only")
    if auth.tls:
        _check_cert(link, client)
    hello_s: Header = {"hs": "hello", "v": VERSION, "node": auth.node_id,
                       "nonce": _nonce(), "mac": auth.mac,
                       "max_payload": max_payload}
    # Nothing keyed by the secret before the client proved it (no guessing oracle).
    link.send_handshake(hello_s)
    finish = _expect(await link.recv_handshake(), "finish")
    ok: Header = {"hs": "ok"}
    if auth.secret is not None:
        transcript = _transcript(hello_c, hello_s)
        theirs = finish.get("proof")
        if not (isinstance(theirs, bytes)
                and hmac.compare_digest(theirs, _proof(auth.secret, b"client", transcript))):
            raise _refuse(link, "peer failed to prove the shared secret (wrong secret?)")
        ok["proof"] = _proof(auth.secret, b"server", transcript)
    link.send_handshake(ok)
    return _session(auth.secret, hello_c, hello_s, client, hello_c["max_payload"],
                    client=False)
