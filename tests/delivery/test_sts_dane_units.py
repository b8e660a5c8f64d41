"""MTA-STS policy and TXT parsing (RFC 8461 3.1, 3.2, 4.1) and DANE matching of a presented
chain against TLSA records (RFC 7672 3.1): real certificates from a test CA (trustme)."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mta.delivery.dane import DaneError, Tlsa, authenticate, usable
from mta.delivery.mtasts import StsPolicy, StsPolicyError, is_sts_txt, parse_policy, parse_txt

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.mail.example.com\r\n" \
       "max_age: 86400\r\n"


def test_a_policy_parses_with_crlf_or_lf_and_unknown_keys() -> None:
    for text in (GOOD, GOOD.replace("\r\n", "\n") + "extension: yes\n"):
        policy = parse_policy(text, "id1", 100.0)
        assert policy == StsPolicy("enforce", ("mx1.example.com", "*.mail.example.com"),
                                   86400, "id1", 100.0)
        assert policy.expires == 86500.0


@pytest.mark.parametrize(("text", "why"), [
    (GOOD.replace("STSv1", "STSv2"), "version"),
    (GOOD.replace("version: STSv1\r\n", ""), "version"),
    (GOOD.replace("enforce", "strict"), "mode"),
    (GOOD.replace("86400", "31557601"), "max_age"),
    (GOOD.replace("86400", "-1"), "max_age"),
    (GOOD.replace("86400", "12345678901"), "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 10\n", "no mx"),
    (GOOD + "mx: bad host\n", "mx pattern"),
    (GOOD + "mx: *.*.example.com\n", "mx pattern"),
    (GOOD + "no colon here\n", "without ':'"),
])
def test_a_bad_policy_is_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(StsPolicyError, match=why):
        parse_policy(text)


def test_mode_none_needs_no_mx_and_the_first_of_a_key_wins() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmode: enforce\nmax_age: 0\n")
    assert policy.mode == "none" and policy.mx == ()


def test_a_wildcard_pattern_matches_exactly_one_label() -> None:
    policy = parse_policy(GOOD)
    assert policy.matches("mx1.example.com") and policy.matches("MX1.Example.COM.")
    assert policy.matches("a.mail.example.com")
    assert not policy.matches("mail.example.com")
    assert not policy.matches("a.b.mail.example.com")
    assert not policy.matches("mx2.example.com")
    assert not policy.matches("evilmx1.example.com")


def test_txt_records() -> None:
    assert parse_txt([b"v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt([b"v=STSv1;", b" id=abc ; ext=1"]) == "abc"
    assert is_sts_txt([b"v=STSv1; id=1"]) and not is_sts_txt([b"v=spf1 -all"])
    for bad in ([b"v=STSv1;"], [b"v=STSv1; id=bad-id"], [b"v=STSv1; id=" + b"a" * 33],
                [b"id=1; v=STSv1"], [b"v=STSv1; id"], [b"v=STSv1; id=\xff"]):
        with pytest.raises(StsPolicyError):
            parse_txt(bad)


def test_a_cached_policy_round_trips_and_bad_ones_are_refused() -> None:
    policy = parse_policy(GOOD, "x", 5.0)
    assert StsPolicy.from_json(policy.to_json()) == policy
    for bad in ({}, {**policy.to_json(), "mode": "strict"}, {**policy.to_json(), "max_age": "x"},
                None):
        with pytest.raises(StsPolicyError):
            StsPolicy.from_json(bad)


# --- DANE --------------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)


def _ders(cert: trustme.LeafCert) -> list[bytes]:
    return [x509.load_pem_x509_certificate(p.bytes()).public_bytes(Encoding.DER)
            for p in cert.cert_chain_pems]


def _spki(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def pki() -> dict[str, list[bytes]]:
    root = trustme.CA()
    inter = root.create_child_ca()
    expired = inter.issue_cert("mx.dest.test", not_before=NOW - datetime.timedelta(days=9),
                               not_after=NOW - datetime.timedelta(days=1))
    return {"good": _ders(inter.issue_cert("mx.dest.test")),
            "other_name": _ders(inter.issue_cert("mx.other.test")),
            "expired": _ders(expired),
            "root": [x509.load_pem_x509_certificate(root.cert_pem.bytes()).public_bytes(
                Encoding.DER)],
            "stranger": _ders(trustme.CA().issue_cert("mx.dest.test"))}


@pytest.mark.parametrize(("selector", "mtype"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_dane_ee_matches_the_leaf_by_each_selector_and_matching_type(
        pki: dict[str, list[bytes]], selector: int, mtype: int) -> None:
    chain = pki["good"]
    data = chain[0] if selector == 0 else _spki(chain[0])
    if mtype:
        data = (hashlib.sha256 if mtype == 1 else hashlib.sha512)(data).digest()
    assert authenticate(chain, (Tlsa(3, selector, mtype, data),), "mx.dest.test") == "dane-ee"
    # Another server's certificate for the same name does not match.
    with pytest.raises(DaneError, match="no TLSA record"):
        authenticate(pki["stranger"], (Tlsa(3, selector, mtype, data),), "mx.dest.test")


def test_dane_ee_ignores_the_name_and_the_expiry(pki: dict[str, list[bytes]]) -> None:
    for chain in (pki["other_name"], pki["expired"]):
        record = Tlsa(3, 1, 1, hashlib.sha256(_spki(chain[0])).digest())
        assert authenticate(chain, (record,), "mx.dest.test") == "dane-ee"


def test_dane_ta_anchors_at_the_intermediate_and_checks_name_and_expiry(
        pki: dict[str, list[bytes]]) -> None:
    inter = pki["good"][1]
    record = Tlsa(2, 1, 1, hashlib.sha256(_spki(inter)).digest())
    assert authenticate(pki["good"], (record,), "mx.dest.test") == "dane-ta"
    with pytest.raises(DaneError, match="subjectAltName"):
        authenticate(pki["other_name"], (record,), "mx.dest.test")
    with pytest.raises(DaneError, match="DANE-TA"):
        authenticate(pki["expired"], (record,), "mx.dest.test")
    with pytest.raises(DaneError, match="no TLSA record"):
        authenticate(pki["stranger"], (record,), "mx.dest.test")


def test_dane_ta_by_a_full_certificate_in_dns_the_server_left_out(
        pki: dict[str, list[bytes]]) -> None:
    # The root is not in the chain the server sends; its certificate in DNS anchors it.
    record = Tlsa(2, 0, 0, pki["root"][0])
    assert authenticate(pki["good"], (record,), "mx.dest.test") == "dane-ta"


def test_pkix_usages_and_bad_digests_are_unusable() -> None:
    digest = bytes(32)
    records = [Tlsa(0, 0, 1, digest), Tlsa(1, 1, 1, digest), Tlsa(3, 1, 1, digest[:31]),
               Tlsa(3, 2, 1, digest), Tlsa(3, 1, 3, digest), Tlsa(3, 1, 1, digest)]
    assert usable(records) == (Tlsa(3, 1, 1, digest),)
    with pytest.raises(DaneError, match="no certificate"):
        authenticate([], (Tlsa(3, 1, 1, digest),), "mx.dest.test")
