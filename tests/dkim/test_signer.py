"""DKIM signing (mta.dkim) against an independent verifier: dkimpy, with the public keys
published as TXT records on a DNS server on loopback. Both algorithms, dual signing, the
bodies the issue names, tampering after signing, and the policy's refusals."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dns import DNSServer
from mta.dkim import signer as signer_module
from mta.dkim.canon import HeaderField
from mta.dkim.keys import DkimKeyError, SigningKey, load_key
from mta.dkim.signer import DomainKeys, Signer, Unsignable
from tests.support.dkim import WEAK_RSA_512, dkim_zone, signatures_verify, write_key

HEADERS = (b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\n"
           b"Subject: Hello\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <m1@example.org>\r\n")

BODIES = {
    "plain": b"Hello Bob,\r\nsee you.\r\n",
    "8-bit": "Grüße aus Köln, déjà vu\r\n".encode(),
    # A line beginning with a dot: unstuffed in the spool, stuffed again on the wire.
    "dot lines": b".leading dot\r\n..two dots\r\n.\r\nlast\r\n",
    "long lines": b"x" * 990 + b"\r\n" + b"y " * 400 + b"\r\n",
    "no final CRLF": b"no newline at the end",
    "trailing blank lines and spaces": b"text  \t with   runs \r\n\r\n\r\n \r\n",
    "empty": b"",
}


@pytest.fixture(scope="module")
def dns(keys: dict[str, SigningKey]) -> Iterator[DNSServer]:
    server = DNSServer({**dkim_zone("example.org", *keys.values()),
                        **dkim_zone("news.example.net", *keys.values())})
    yield server
    server.close()


def signer(keys: dict[str, SigningKey], *names: str, **kw: object) -> Signer:
    return Signer({"example.org": DomainKeys(tuple(keys[n] for n in names)),
                   "*.example.net": DomainKeys((keys["rsa"],))}, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("body", sorted(BODIES))
@pytest.mark.parametrize("algs", [("rsa",), ("ed",), ("rsa", "ed")])
def test_signatures_verify_for_every_body(keys: dict[str, SigningKey], dns: DNSServer,
                                          body: str, algs: tuple[str, ...]) -> None:
    message = HEADERS + b"\r\n" + BODIES[body]
    signed = signer(keys, *algs).sign(message)
    assert signed.endswith(message), "the message itself is not changed"
    assert signatures_verify(signed, dns) == [True] * len(algs)
    # Altered after signing: the verifier refuses (so the check above can fail).
    altered = signed + b"one more line\r\n" if body != "no final CRLF" else signed + b"!"
    assert signatures_verify(altered, dns) == [False] * len(algs)


def test_smtputf8_headers_verify(keys: dict[str, SigningKey], dns: DNSServer) -> None:
    message = ("From: Jörg <jörg@example.org>\r\nTo: josé@example.com\r\n"
               "Subject: Grüße\r\n\r\nHallo\r\n").encode()
    assert signatures_verify(signer(keys, "rsa", "ed").sign(message), dns) == [True, True]


@pytest.mark.parametrize("tamper", [
    lambda m: m.replace(b"Subject: Hello", b"Subject: Hellp"),
    lambda m: m.replace(b"Hello Bob", b"Hello Eve"),
    # Over-signing: a second From (or Subject) added in transit breaks the signature.
    lambda m: m.replace(b"Message-ID:", b"From: eve@example.org\r\nMessage-ID:"),
    lambda m: m.replace(b"Message-ID:", b"Subject: Buy now\r\nMessage-ID:"),
])
def test_tampered_headers_and_bodies_fail(keys: dict[str, SigningKey], dns: DNSServer,
                                          tamper: object) -> None:
    signed = signer(keys, "rsa").sign(HEADERS + b"\r\nHello Bob\r\n")
    assert signatures_verify(signed, dns) == [True]
    assert signatures_verify(tamper(signed), dns) == [False]  # type: ignore[operator]


def test_folded_and_spaced_headers_survive_relaxed_canonicalisation(
        keys: dict[str, SigningKey], dns: DNSServer) -> None:
    message = (b"From:   Alice\r\n\t<alice@example.org>  \r\nSubject: a   long\r\n"
               b"   folded\tsubject\r\n\r\nbody\r\n")
    signed = signer(keys, "ed").sign(message)
    assert signatures_verify(signed, dns) == [True]
    # A relay that re-folds or re-spaces a header does not break a relaxed signature.
    refolded = signed.replace(b"a   long\r\n   folded", b"a long folded")
    assert signatures_verify(refolded, dns) == [True]


def test_the_signing_domain_comes_from_the_from_header(keys: dict[str, SigningKey],
                                                       dns: DNSServer) -> None:
    s = signer(keys, "rsa")
    sub = s.sign(b"From: x@news.example.net\r\n\r\nhi\r\n")
    assert b"d=news.example.net;" in sub and signatures_verify(sub, dns) == [True]
    for unsigned in (b"From: x@other.example\r\n\r\nhi\r\n",  # no key for it
                     b"To: x@example.org\r\n\r\nno from\r\n",
                     b"From: a@example.org\r\nFrom: b@example.org\r\n\r\ntwo froms\r\n",
                     b"From: a@example.org, b@other.example\r\n\r\nmixed\r\n"):
        assert s.sign(unsigned) == unsigned


def test_required_signing_refuses_what_it_cannot_sign(keys: dict[str, SigningKey]) -> None:
    s = signer(keys, "rsa", required=True)
    with pytest.raises(Unsignable, match=r"other\.example") as exc:
        s.sign(b"From: x@other.example\r\n\r\nhi\r\n")
    assert exc.value.permanent
    with pytest.raises(Unsignable, match="From:"):
        s.sign(b"Subject: no from\r\n\r\nhi\r\n")
    assert s.sign(HEADERS + b"\r\nok\r\n").startswith(b"DKIM-Signature:")


def test_expiry_and_oversigned_headers_are_in_the_signature(
        keys: dict[str, SigningKey], dns: DNSServer) -> None:
    s = signer(keys, "rsa", expire=7 * 86400, clock=lambda: 1_800_000_000)
    signed = s.sign(HEADERS + b"\r\nbody\r\n")
    header = signed.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ")
    assert b"t=1800000000;" in header and b"x=1800604800;" in header
    h = header.split(b"h=")[1].split(b";")[0].replace(b" ", b"")
    # Present once, listed twice: From, To, Subject, Date, Message-ID.
    for name in (b"from", b"to", b"subject", b"date", b"message-id"):
        assert h.split(b":").count(name) == 2, h
    assert all(len(line) <= 78 for line in signed.split(b"\r\n\r\n")[0].split(b"\r\n")[:8])


@pytest.mark.parametrize(("make", "algorithm", "error"), [
    (lambda d: d / "missing.pem", "rsa-sha256", "cannot read"),
    (lambda d: write_key(d, "ed.pem", "ed25519-sha256"), "rsa-sha256", "not an RSA key"),
    (lambda d: write_key(d, "rsa.pem"), "ed25519-sha256", "not an Ed25519 key"),
    (lambda d: (d / "weak.pem").write_bytes(WEAK_RSA_512) and d / "weak.pem", "rsa-sha256",
     "512-bit"),
    (lambda d: (d / "junk.pem").write_bytes(b"not a key") and d / "junk.pem", "rsa-sha256",
     "not a PEM private key"),
])
def test_unusable_keys_are_refused_naming_the_file(tmp_path: Path, make: object,
                                                    algorithm: str, error: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(DkimKeyError, match=error) as exc:
        load_key(str(path), "s", algorithm)
    assert str(path) in str(exc.value)
    assert "PRIVATE KEY-----\n" not in str(exc.value)


def test_the_key_never_shows_in_its_repr(keys: dict[str, SigningKey]) -> None:
    assert "r2026" in repr(keys["rsa"]) and "private" not in repr(keys["rsa"]).lower()


def test_bare_line_ends_are_made_crlf_before_signing(keys: dict[str, SigningKey],
                                                     dns: DNSServer) -> None:
    # Delivery sends CRLF whatever arrived: the bytes signed are the bytes sent.
    for message in (HEADERS + b"\r\nline1\nline2\n", HEADERS + b"\r\nl1\rl2\r\n",
                    b"From: a@example.org\nSubject: s\nX-A: b\n\nbody\n"):
        signed = signer(keys, "rsa").sign(message)
        assert b"\n" not in signed.replace(b"\r\n", b"")
        assert b"\r" not in signed.replace(b"\r\n", b"")
        assert signatures_verify(signed, dns) == [True]


@pytest.mark.parametrize("from_value", [
    b"a@example.org " + b"(" * 2000 + b")" * 2000,  # the stdlib parser recurses
    b":" * 2700,
    b"a@[x; s=evil; b=].example.net",  # no domain name, on a wildcard
    b"a@x\x00.example.net",
    b"\"a\"@[1.2.3.4].example.net",
    b"a@example.org, " * 400,  # longer than a sender's From:
])
def test_a_from_that_names_no_domain_is_not_signed_and_raises_nothing(
        keys: dict[str, SigningKey], from_value: bytes) -> None:
    message = b"From: " + from_value + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert not signer(keys, "rsa").sign(message).startswith(b"DKIM-Signature")
    with pytest.raises(Unsignable):
        signer(keys, "rsa", required=True).sign(message)


def test_an_idn_from_domain_finds_its_key_under_its_a_label(keys: dict[str, SigningKey],
                                                          dns: DNSServer) -> None:
    s = Signer({"xn--bcher-kva.example": DomainKeys((keys["rsa"],))}, required=True)
    signed = s.sign("From: a@bücher.example\r\n\r\nhi\r\n".encode())
    assert b"d=xn--bcher-kva.example;" in signed


def test_a_star_entry_signs_every_domain(keys: dict[str, SigningKey]) -> None:
    s = Signer({"*": DomainKeys((keys["rsa"],), "example.org")}, required=True)
    assert b"d=example.org;" in s.sign(b"From: a@anything.test\r\n\r\nhi\r\n")


def test_the_signature_lists_a_bounded_number_of_instances(keys: dict[str, SigningKey],
                                                           dns: DNSServer) -> None:
    message = HEADERS + b"To: x@y.test\r\n" * 5000 + b"\r\nbody\r\n"
    signed = signer(keys, "rsa").sign(message)
    header = signed[:signed.index(b"\r\nFrom:")]
    assert len(header) < 2000, len(header)
    assert signatures_verify(signed, dns) == [True]


def test_a_huge_header_section_is_not_signed(keys: dict[str, SigningKey]) -> None:
    message = HEADERS + b"X-Pad: " + b"y" * 300_000 + b"\r\n\r\nbody\r\n"
    assert not signer(keys, "rsa").sign(message).startswith(b"DKIM-Signature")
    with pytest.raises(Unsignable, match="header section"):
        signer(keys, "rsa", required=True).sign(message)


def test_a_key_path_that_is_not_a_regular_file_is_refused_without_blocking(
        tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    with pytest.raises(DkimKeyError, match="not a regular file"):
        load_key(str(fifo), "s", "rsa-sha256")


async def test_concurrent_submissions_each_get_their_own_signature_or_refusal(
        keys: dict[str, SigningKey], dns: DNSServer) -> None:
    # Many sessions end DATA in one turn of the loop: signed in batches, each message must
    # get back its own signature, or its own refusal, whatever else is in its batch.
    s = signer(keys, "rsa", required=True)
    bodies = [HEADERS.replace(b"Hello", b"Hello %d" % n) + b"\r\nbody %d\r\n" % n
              if n % 3 else b"From: x@other.example\r\n\r\nnot ours %d\r\n" % n
              for n in range(30)]
    results = await asyncio.gather(*(s.sign_async(b) for b in bodies), return_exceptions=True)
    for n, (body, result) in enumerate(zip(bodies, results, strict=True)):
        if n % 3:
            assert isinstance(result, bytes) and result.endswith(body), n
            assert signatures_verify(result, dns) == [True], n
        else:
            assert isinstance(result, Unsignable) and b"%d" % n in body, n
    # A submission cancelled while its batch is signed does not disturb the others.
    first = asyncio.ensure_future(s.sign_async(bodies[1]))
    second = asyncio.ensure_future(s.sign_async(bodies[2]))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).endswith(bodies[2])


def test_the_quick_from_reading_agrees_with_the_address_parser() -> None:
    # From: values read by the quick pattern must give what the stdlib parser gives; the
    # corpus mixes the common forms with near misses that must go to the parser.
    rng = random.Random(20261201)
    atoms = ["alice", "a.b", "x+tag", "o'neil", "a_b-c", "", " ", ".", "@", "<", ">", '"',
             "(c)", ",", ";", ":", "\\", "ü", "Alice Smith", "a@b", "[1.2.3.4]", "example.org",
             "EXAMPLE.ORG.", "xn--bcher-kva.example", "-bad-.example", "a..b", "1.2.3.4"]
    values = ["alice@example.org", "Alice <alice@example.org>", "<alice@example.org>",
              "Alice Smith <a.b+c@Sub.Example.ORG.>", "a@b@c.org", "Alice <a@b.org",
              "a@b.org>", "a@-x.org", "a@x..org", "\"Q\" <a@b.org>", "a@b.org, c@d.org",
              "Büro <a@b.org>", "a@bücher.example"]
    for _ in range(20000):
        parts = [rng.choice(atoms) for _ in range(rng.randint(1, 6))]
        joiner = rng.choice(["", " ", "@", "<", ">"])
        values.append(joiner.join(parts))
        values.append(f"{rng.choice(atoms)} <{rng.choice(atoms)}@{rng.choice(atoms)}>")
        values.append(f"{rng.choice(atoms)}@{rng.choice(atoms)}")
    quick = 0
    for value in values:
        if signer_module._SIMPLE_FROM.fullmatch(value) is None:
            continue
        quick += 1
        field = HeaderField(b"From: " + value.encode())
        assert signer_module._from_domain([field]) == signer_module._parsed_from_domain(
            value), value
    assert quick > 3000, "the corpus must exercise the quick reading"
