"""RFC conformance of the SMTP ingress, over a real socket to an in-process node: AUTH only
outside a mail transaction (RFC 4954 4), the unqualified postmaster (RFC 5321 4.5.1), an
enhanced status code on every 4xx/5xx reply (RFC 2034, 3463) and the PLAIN authorization
identity (RFC 4616 2)."""

from __future__ import annotations

import base64
import re
from typing import Any

from mta.node import Node
from tests.support import Raw, message, port, queued_id, stored

# A 4xx/5xx reply line with an enhanced status code of its class (RFC 3463 2).
_ENHANCED = re.compile(r"^([45])\d\d[ -]\1\.\d{1,3}\.\d{1,3}( |$)")


def _plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


async def _session(node: Node, greeting: str = "EHLO client.example") -> Raw:
    c = await Raw.connect(port(node))
    assert (await c.reply()).startswith("220 ")
    assert (await c.cmd(greeting)).startswith("250")
    return c


async def _send(c: Raw, rcpt: str) -> str:
    """One message to ``rcpt`` (its RCPT is asserted accepted); the queue id."""
    assert (await c.cmd("MAIL FROM:<sender@example.com>")).startswith("250 ")
    reply = await c.cmd(f"RCPT TO:{rcpt}")
    assert reply.startswith("250 2.1.5"), (rcpt, reply)
    assert (await c.cmd("DATA")).startswith("354 ")
    return queued_id(await c.cmd(message(1, 300).rstrip(b"\r\n") + b"\r\n."))


async def test_auth_is_refused_during_a_mail_transaction(start_node: Any,
                                                          users_file: str) -> None:
    # Outside relay_networks: only a login lets this client relay.
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    c = await _session(node)
    for sender in ("<a@example.com>", "<>"):
        assert (await c.cmd(f"MAIL FROM:{sender}")).startswith("250 ")
        assert await c.cmd(f"AUTH PLAIN {_plain('', 'alice', 's3cret')}") == (
            "503 5.5.1 AUTH not permitted during a mail transaction")
        # No challenge either: the next line is a command, answered as one.
        assert (await c.cmd("AUTH LOGIN")).startswith("503 5.5.1")
        # The refused AUTH did not log the session in.
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")
        assert (await c.cmd("RSET")).startswith("250 ")
    # Outside a transaction (after RSET) it is allowed, and then the client may relay.
    assert (await c.cmd(f"AUTH PLAIN {_plain('', 'alice', 's3cret')}")).startswith("235 2.7.0")
    mid = await _send(c, "<b@example.org>")
    await c.close()
    assert (await stored(node))[mid].envelope.auth_user == "alice"
    assert node.metrics.auth_failures._value.get() == 0


async def test_unqualified_postmaster_is_accepted_from_anyone(start_node: Any) -> None:
    # Loopback is outside relay_networks: any other recipient is refused (554 5.7.1).
    node = await start_node(smtp={"relay_networks": ["10.99.0.0/16"]})
    c = await _session(node)
    ids = [await _send(c, rcpt) for rcpt in ("<postmaster>", "<PostMaster>", "<POSTMASTER>")]
    # Only the unqualified form skips the relay check.
    assert (await c.cmd("MAIL FROM:<sender@example.com>")).startswith("250 ")
    for rcpt in ("<postmaster@example.org>", "<postmaster@mx.test.example>", "<abuse>"):
        reply = await c.cmd(f"RCPT TO:{rcpt}")
        assert reply.startswith("554 5.7.1"), (rcpt, reply)
    await c.close()
    msgs = await stored(node)
    for mid in ids:  # the node's own postmaster: postmaster@<[smtp] hostname>
        assert msgs[mid].envelope.recipients == ["postmaster@mx.test.example"]


async def test_postmaster_without_a_mail_domain_hostname_is_a_temporary_failure(
        start_node: Any) -> None:
    node = await start_node(smtp={"hostname": "mx"})
    c = await _session(node)
    assert (await c.cmd("MAIL FROM:<sender@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<postmaster>")).startswith("451 4.3.5")
    await c.close()


async def test_every_refusal_carries_an_enhanced_status_code(start_node: Any,
                                                             users_file: str) -> None:
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    expected = [  # (command, its reply's start)
        ("AUTH", "501 5.5.4"), ("AUTH PLAIN a b", "501 5.5.4"), ("AUTH FOO", "504 5.5.4"),
        ("HELO", "501 5.5.4"), ("EHLO", "501 5.5.4"), ("QUIT now", "501 5.5.4"),
        ("RSET now", "501 5.5.4"), ("VRFY", "501 5.5.4"), ("VRFY <<>", "502 5.1.3"),
        ("HELP NOSUCH", "501 5.5.4"), ("STARTTLS", "454 4.7.0"), ("STARTTLS now", "501 5.5.4"),
        ("EXPN list", "502 5.5.1"), ("DATA", "503 5.5.1"), ("RCPT TO:<b@example.org>", "503"),
        ("FOO", "500 5.5.1"), ("EHLO client.example", "250"),
        (f"AUTH PLAIN {_plain('', 'alice', 's3cret')}", "235 2.7.0"),
        ("AUTH", "503 5.5.1 Already authenticated"),
        (f"AUTH PLAIN {_plain('', 'alice', 's3cret')}", "503 5.5.1 Already authenticated"),
    ]
    c = await _session(node)
    transcript = [(cmd, await c.cmd(cmd)) for cmd, _ in expected]
    await c.close()
    # AUTH after HELO is an unknown command (RFC 4954 3: an ESMTP extension).
    c = await _session(node, "HELO client.example")
    transcript.append(("AUTH PLAIN", await c.cmd("AUTH PLAIN")))
    expected.append(("AUTH PLAIN", "500 5.5.1"))
    await c.close()
    for (cmd, reply), (_, start) in zip(transcript, expected, strict=True):
        assert reply.startswith(start), (cmd, reply)
        for line in reply.splitlines():
            assert line[0] not in "45" or _ENHANCED.match(line), (cmd, line)


async def test_plain_authorization_identity_other_than_the_user_is_refused(
        start_node: Any, users_file: str) -> None:
    node = await start_node(smtp={"users_file": users_file, "relay_networks": []})
    c = await _session(node)
    # alice's right password, asking to act as bob: refused (RFC 4616 2), in both forms.
    bob = _plain("bob", "alice", "s3cret")
    assert (await c.cmd(f"AUTH PLAIN {bob}")).startswith("535 5.7.8")
    assert (await c.cmd("AUTH PLAIN")).startswith("334 ")
    assert (await c.cmd(bob)).startswith("535 5.7.8")
    # ... and not logged in as anyone.
    assert (await c.cmd("MAIL FROM:<a@example.com>")).startswith("250 ")
    assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")
    assert (await c.cmd("RSET")).startswith("250 ")
    # An authzid equal to the user is that user.
    assert (await c.cmd(f"AUTH PLAIN {_plain('alice', 'alice', 's3cret')}")).startswith(
        "235 2.7.0")
    mid = await _send(c, "<b@example.org>")
    await c.close()
    assert (await stored(node))[mid].envelope.auth_user == "alice"
