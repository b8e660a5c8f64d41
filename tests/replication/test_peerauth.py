"""Authentication of replication peers on real loopback sockets: the shared-secret handshake
(the client proves first: a stranger hears nothing keyed by the secret; wrong secret,
reflection, unexpected node, mode mismatch, silent peers) and mutual TLS
(good certificates, another CA, a certificate naming another node)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from structlog.testing import capture_logs

from mta.replication import peerauth
from mta.replication.channel import Connection, Listener, connect, serve
from mta.replication.frames import (
    DEFAULT_MAX_PAYLOAD,
    AuthError,
    ConnectionClosed,
    Decoder,
    Encoder,
    ReplicationError,
)
from mta.replication.peerauth import PeerAuth
from tests.support import wait_until

SECRET = b"correct horse battery staple"
OTHER = b"incorrect horse battery staple"


class Peer:
    """A listener whose handler records authenticated peers and the frames they send."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.frames: list[tuple[dict[str, Any], bytes]] = []
        self.listener: Listener | None = None

    async def handler(self, conn: Connection) -> None:
        await self.accepted.put(conn)
        while True:
            header, payload = await conn.recv()
            self.frames.append((header, payload))
            conn.send({"echo": header}, payload)

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port


@contextlib.asynccontextmanager
async def listening(auth: PeerAuth, **kw: Any) -> AsyncIterator[Peer]:
    peer = Peer()
    peer.listener = await serve("127.0.0.1", 0, auth, peer.handler, **kw)
    try:
        yield peer
    finally:
        await peer.listener.close()


async def refusals(logs: list[dict[str, Any]], n: int = 1) -> list[dict[str, Any]]:
    """The listener's refusal lines, once ``n`` of them are logged (it logs after the
    client may already have given up)."""
    found = await wait_until(
        lambda: len(r := [e for e in logs if e["event"] == "replication.peer_refused"]) >= n
        and r, timeout=3, what="replication.peer_refused")
    for line in found:
        assert line["address"].startswith("127.0.0.1:")
        assert "exc_info" not in line and "exception" not in line  # one line, no traceback
    return found


async def round_trip(conn: Connection) -> None:
    conn.send({"ping": 1}, b"data")
    assert await conn.recv() == ({"echo": {"ping": 1}}, b"data")


# -- shared secret ----------------------------------------------------------------------

async def test_good_secret_authenticates_both_ends() -> None:
    async with listening(PeerAuth("b", secret=SECRET)) as b, asyncio.timeout(3):
        conn = await connect("127.0.0.1", b.port, PeerAuth("a", secret=SECRET), "b", 3)
        assert conn.peer == "b" and conn.mac and not conn.tls
        server = await b.accepted.get()
        assert server.peer == "a"
        await round_trip(conn)
        await conn.close()


async def test_wrong_secret_fails_on_both_sides_and_delivers_nothing() -> None:
    """The client proves first: the server refuses its proof and says why."""
    with capture_logs() as logs:
        async with listening(PeerAuth("b", secret=SECRET)) as b, asyncio.timeout(3):
            with pytest.raises(AuthError, match=r"refused.*peer failed to prove the shared "
                                                r"secret \(wrong secret\?\)"):
                await connect("127.0.0.1", b.port, PeerAuth("a", secret=OTHER), "b", 3)
            [line] = await refusals(logs)
            assert "peer failed to prove the shared secret (wrong secret?)" in line["reason"]
            assert b.accepted.empty() and not b.frames


async def test_unexpected_node_is_refused() -> None:
    """The advertised address now belongs to node c: a client expecting b refuses it."""
    with capture_logs() as logs:
        async with listening(PeerAuth("c", secret=SECRET)) as c, asyncio.timeout(3):
            with pytest.raises(AuthError, match=r"expected node b, reached c|not b"):
                await connect("127.0.0.1", c.port, PeerAuth("a", secret=SECRET), "b", 3)
            [line] = await refusals(logs)
            assert "not b" in line["reason"]
            assert c.accepted.empty()


def impostor(node: str, mac: bool, proof: str = "made up") -> Any:
    """A hostile server: claims ``node``, says ok to whatever the client proves, and 'proves'
    a secret it does not know: ``made up`` bytes, or the client's own proof sent back
    (``reflected``). Only the client's own checks can catch it."""

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await _read(reader)
        assert hello["hs"] == "hello"
        _write(writer, {"hs": "hello", "v": 1, "node": node, "nonce": b"n" * 32, "mac": mac,
                        "max_payload": 1024})
        with contextlib.suppress(AssertionError, ConnectionError):
            finish = await _read(reader)
            theirs = finish.get("proof") if proof == "reflected" else b"p" * 32
            _write(writer, {"hs": "ok", "proof": theirs if mac else None})
            await reader.read()
        writer.close()

    return serve_one


@pytest.mark.parametrize(("node", "mac", "proof", "expect", "error"), [
    ("c", False, "made up", "b", "expected node b, reached c"),  # the address is now c's
    ("a", False, "made up", None, "ourselves"),                  # a server claiming to be us
    ("b", True, "made up", "b", "server failed to prove the shared secret"),
    # The client's proof sent back as the server's: the direction label makes them differ.
    ("b", True, "reflected", "b", "server failed to prove the shared secret"),
])
async def test_the_client_checks_the_server_itself(node: str, mac: bool, proof: str,
                                                   expect: str | None, error: str) -> None:
    hostile = await asyncio.start_server(impostor(node, mac, proof), "127.0.0.1", 0)
    port = hostile.sockets[0].getsockname()[1]
    client = PeerAuth("a", secret=SECRET) if mac else PeerAuth("a", insecure=True)
    try:
        async with asyncio.timeout(3):
            with pytest.raises(AuthError, match=error):
                await connect("127.0.0.1", port, client, expect, 3)
    finally:
        hostile.close()


async def test_the_client_proves_only_to_the_node_it_expects() -> None:
    """The client proves first, but never to a server that states another node id: the
    impostor at a reused address learns no proof of the secret."""
    heard: list[dict[str, Any]] = []

    async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await _read(reader))
        _write(writer, {"hs": "hello", "v": 1, "node": "c", "nonce": b"n" * 32, "mac": True,
                        "max_payload": 1024})
        heard.extend(_frames(await reader.read()))  # all it gets, until the client hangs up
        writer.close()

    hostile = await asyncio.start_server(serve_one, "127.0.0.1", 0)
    port = hostile.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(3):
            with pytest.raises(AuthError, match="expected node b, reached c"):
                await connect("127.0.0.1", port, PeerAuth("a", secret=SECRET), "b", 3)
            await wait_until(lambda: len(heard) == 2, timeout=3, what="the client's refusal")
    finally:
        hostile.close()
    assert [f["hs"] for f in heard] == ["hello", "refused"]
    assert "proof" not in heard[0] and "proof" not in heard[1]


@pytest.mark.parametrize("expect", ["b", None])
async def test_a_connection_reflected_to_ourselves_fails(expect: str | None) -> None:
    """Node a dials b's advertised address, but it now leads back to a's own listener."""
    a_auth = PeerAuth("a", secret=SECRET)
    with capture_logs() as logs:
        async with listening(a_auth) as a, asyncio.timeout(3):
            with pytest.raises(AuthError, match=r"not b|ourselves|our own"):
                await connect("127.0.0.1", a.port, a_auth, expect, 3)
            await refusals(logs)
            assert a.accepted.empty()


async def test_an_echoed_handshake_fails() -> None:
    """A 'peer' that sends back every byte it receives: the client meets its own hello."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for expect in ("b", None):
            async with asyncio.timeout(3):
                with pytest.raises(AuthError):
                    await connect("127.0.0.1", port, PeerAuth("a", secret=SECRET), expect, 3)
    finally:
        server.close()


@pytest.mark.parametrize("stranger", ["bogus proof", "no proof", "silent after hello"])
async def test_a_stranger_hears_nothing_that_depends_on_the_secret(
        monkeypatch: pytest.MonkeyPatch, stranger: str) -> None:
    """Someone without the secret connects and fails to prove it (or says nothing more):
    every byte the server sends it is the same whatever the server's secret, so a stranger
    gets nothing to test guesses of the secret against offline. (The server's nonce is
    pinned, the only other thing that differs between two runs.)"""
    monkeypatch.setattr(peerauth, "_nonce", lambda: b"s" * 32)
    heard: dict[bytes, bytes] = {}
    for secret in (SECRET, OTHER):
        with capture_logs() as logs:
            async with listening(PeerAuth("b", secret=secret), handshake_timeout=0.5) as b, \
                    asyncio.timeout(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
                _write(writer, {"hs": "hello", "v": 1, "node": "mallory", "expect": "b",
                                "nonce": b"m" * 32, "mac": True, "max_payload": 1024})
                if stranger != "silent after hello":
                    proof = b"p" * 32 if stranger == "bogus proof" else None
                    _write(writer, {"hs": "finish", "proof": proof})
                heard[secret] = await reader.read()  # everything, until the server hangs up
                writer.close()
                [line] = await refusals(logs)
                assert ("timed out" if stranger == "silent after hello" else "prove") \
                    in line["reason"]
                assert b.accepted.empty()
    assert heard[SECRET] == heard[OTHER]
    frames = _frames(heard[SECRET])
    assert frames[0] == {"hs": "hello", "v": 1, "node": "b", "nonce": b"s" * 32, "mac": True,
                         "max_payload": DEFAULT_MAX_PAYLOAD}
    assert [f["hs"] for f in frames[1:]] == ([] if stranger == "silent after hello"
                                             else ["refused"])


def _frames(data: bytes) -> list[dict[str, Any]]:
    """The handshake messages in ``data``, a whole stream."""
    buf, dec, out = bytearray(data), Decoder(max_payload=0), []
    while (frame := dec.next(buf)) is not None:
        out.append(frame[0])
    assert not buf, "a partial frame at the end"
    return out


def _write(writer: asyncio.StreamWriter, header: dict[str, Any]) -> None:
    for piece in Encoder().encode(header):
        writer.write(piece)


async def _read(reader: asyncio.StreamReader) -> dict[str, Any]:
    buf = bytearray()
    dec = Decoder(max_payload=0)
    while (frame := dec.next(buf)) is None:
        data = await reader.read(4096)
        assert data, "closed before a whole frame"
        buf += data
    return frame[0]


@pytest.mark.parametrize(("server", "client"), [
    (PeerAuth("b", secret=SECRET), PeerAuth("a", insecure=True)),
    (PeerAuth("b", insecure=True), PeerAuth("a", secret=SECRET)),
])
async def test_a_mode_mismatch_is_refused_never_downgraded(server: PeerAuth,
                                                           client: PeerAuth) -> None:
    with capture_logs() as logs:
        async with listening(server) as b, asyncio.timeout(3):
            with pytest.raises(AuthError, match="one side only"):
                await connect("127.0.0.1", b.port, client, "b", 3)
            await refusals(logs)
            assert b.accepted.empty()


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout() -> None:
    with capture_logs() as logs:
        async with listening(PeerAuth("b", secret=SECRET), handshake_timeout=0.2) as b, \
                asyncio.timeout(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
            assert await reader.read() == b""  # dropped, by the listener's own deadline
            writer.close()
            [line] = await refusals(logs)
            assert "timed out" in line["reason"]


async def test_connect_gives_up_on_a_silent_server() -> None:
    held: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(3):
            with pytest.raises(ConnectionClosed, match=r"within 0\.2s"):
                await connect("127.0.0.1", port, PeerAuth("a", secret=SECRET), "b", 0.2)
    finally:
        for w in held:
            w.close()
        server.close()


def test_peer_auth_refuses_weak_or_missing_configuration(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        PeerAuth("a", secret=b"short")
    with pytest.raises(ValueError, match="secret or mutual TLS"):
        PeerAuth("a")
    with pytest.raises(ValueError, match="node id"):
        PeerAuth("a b", secret=SECRET)
    with pytest.raises(ValueError, match="together"):
        PeerAuth.from_config("a", tls_ca=str(tmp_path / "ca.pem"))
    auth = PeerAuth.from_config("a", secret=SECRET.decode())
    assert auth.secret == SECRET and not auth.tls


# -- mutual TLS --------------------------------------------------------------------------

def tls_auth(tmp_path: Path, ca: trustme.CA, node: str, *names: str,
             trust: trustme.CA | None = None, secret: bytes | None = None) -> PeerAuth:
    """Node ``node`` with a certificate of ``ca`` naming ``names`` (default: the node id),
    trusting ``trust`` (default: ``ca``)."""
    d = tmp_path / f"{node}-{'-'.join(names) or 'own'}-{id(ca)}"
    d.mkdir()
    cert = ca.issue_cert(*(names or (node,)))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    (trust or ca).cert_pem.write_to_path(str(d / "ca.pem"))
    return PeerAuth.from_config(node, secret=secret, tls_ca=str(d / "ca.pem"),
                                tls_cert=str(d / "cert.pem"), tls_key=str(d / "key.pem"))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def rogue_ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("secret", [None, SECRET])
async def test_mutual_tls_with_good_certificates(tmp_path: Path, ca: trustme.CA,
                                                 secret: bytes | None) -> None:
    server = tls_auth(tmp_path, ca, "b", secret=secret)
    async with listening(server) as b, asyncio.timeout(3):
        conn = await connect("127.0.0.1", b.port, tls_auth(tmp_path, ca, "a", secret=secret),
                             "b", 3)
        assert conn.peer == "b" and conn.tls
        assert conn.mac == (secret is not None)  # both, when a secret is configured too
        assert (await b.accepted.get()).peer == "a"
        await round_trip(conn)
        big = bytes(range(256)) * 4096
        conn.send({"big": 1}, big)
        assert await conn.recv() == ({"echo": {"big": 1}}, big)
        await conn.close()


@pytest.mark.parametrize("rogue", ["client", "server"])
async def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, ca: trustme.CA,
                                                        rogue_ca: trustme.CA,
                                                        rogue: str) -> None:
    server = (tls_auth(tmp_path, rogue_ca, "b", trust=ca) if rogue == "server"
              else tls_auth(tmp_path, ca, "b"))
    client = (tls_auth(tmp_path, rogue_ca, "a", trust=ca) if rogue == "client"
              else tls_auth(tmp_path, ca, "a"))
    with capture_logs() as logs:
        async with listening(server) as b, asyncio.timeout(3):
            with pytest.raises(ReplicationError) as err:
                await connect("127.0.0.1", b.port, client, "b", 3)
            if rogue == "server":  # the client checks the server's certificate itself
                assert isinstance(err.value, AuthError)
                assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
            else:  # TLS 1.3: the client only sees the server hang up after its handshake
                assert isinstance(err.value, AuthError | ConnectionClosed)
                assert "certificate" in str(err.value)
            [line] = await refusals(logs)
            assert "TLS" in line["reason"]
            assert b.accepted.empty()


async def test_a_client_certificate_naming_another_node_is_refused(
        tmp_path: Path, ca: trustme.CA) -> None:
    """Node a holds a certificate for c (a stolen or misissued one): a cannot be c's
    certificate and claim to be a."""
    with capture_logs() as logs:
        async with listening(tls_auth(tmp_path, ca, "b")) as b, asyncio.timeout(3):
            with pytest.raises(AuthError, match="certificate does not name node a"):
                await connect("127.0.0.1", b.port, tls_auth(tmp_path, ca, "a", "c"), "b", 3)
            [line] = await refusals(logs)
            assert "does not name node a" in line["reason"]
            assert b.accepted.empty()


async def test_a_server_certificate_naming_another_node_is_refused(
        tmp_path: Path, ca: trustme.CA) -> None:
    with capture_logs() as logs:
        async with listening(tls_auth(tmp_path, ca, "b", "c", "*.b")) as b, \
                asyncio.timeout(3):
            with pytest.raises(AuthError, match="certificate does not name node b"):
                await connect("127.0.0.1", b.port, tls_auth(tmp_path, ca, "a"), "b", 3)
            await refusals(logs)
            assert b.accepted.empty()


async def test_tls_client_against_a_plain_listener_and_back(tmp_path: Path,
                                                           ca: trustme.CA) -> None:
    with capture_logs() as logs:
        async with listening(PeerAuth("b", secret=SECRET)) as b, asyncio.timeout(3):
            with pytest.raises(ReplicationError):
                await connect("127.0.0.1", b.port, tls_auth(tmp_path, ca, "a", secret=SECRET),
                              "b", 3)
            await refusals(logs)
        async with listening(tls_auth(tmp_path, ca, "b", secret=SECRET)) as b, \
                asyncio.timeout(3):
            with pytest.raises(ReplicationError):
                await connect("127.0.0.1", b.port, PeerAuth("a", secret=SECRET), "b", 3)
            await refusals(logs, 2)
        assert b.accepted.empty()


async def test_a_hello_without_expect_is_answered_and_never_leaks_the_socket() -> None:
    """A stranger's hello that leaves out ``expect`` (allowed: any node) must not crash the
    handshake and leave the connection open past the timeout."""
    async with listening(PeerAuth("b", secret=SECRET), handshake_timeout=0.5) as b, \
            asyncio.timeout(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
        _write(writer, {"hs": "hello", "v": 1, "node": "mallory", "nonce": b"m" * 32,
                        "mac": True, "max_payload": 1024})
        server_hello = await _read(reader)
        assert server_hello["hs"] == "hello"
        # It cannot finish without the secret: the server closes within its timeout.
        assert await reader.read() == b""
        writer.close()
        assert b.accepted.empty()
