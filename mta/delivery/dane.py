"""DANE for SMTP (RFC 7672): which TLSA records of an MX host are usable, and whether the
certificate chain a server presented matches them.

Only DANE-TA(2) and DANE-EE(3) count for SMTP (RFC 7672 3.1.3: PKIX-TA and PKIX-EE are
unusable), with selectors 0 (the certificate) and 1 (its public key) and matching types 0
(exact), 1 (SHA-256) and 2 (SHA-512). DANE-EE authenticates the leaf key alone: no name
check, no expiry (3.1.1). DANE-TA makes the matching certificate of the chain the trust
anchor, and the leaf must chain to it and name the MX host (3.1.2, 3.2.2).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import verification

__all__ = ["DaneError", "Tlsa", "authenticate", "usable"]

DANE_TA, DANE_EE = 2, 3
# A chain longer than this is refused before anything is parsed, and at most this many
# distinct anchors are tried: a hostile server's 150 self-issued CAs under one key would
# otherwise be 150 path builds (seconds of CPU) per connection.
MAX_CHAIN = 10
MAX_ANCHORS = 4
_DIGESTS = {1: hashlib.sha256, 2: hashlib.sha512}
# The leaf's extensions are not held to the Web PKI's profile (a mail server's certificate
# under a private DANE-TA anchor need not be a browser's); its subjectAltName must be there,
# as the name is checked against it.
_EE_POLICY = verification.ExtensionPolicy.permit_all().require_present(
    x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)


class DaneError(Exception):
    """The server's certificates do not match its TLSA records (the reason in one line)."""


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype}"


def usable(records: Iterable[Tlsa]) -> tuple[Tlsa, ...]:
    """The records a client can authenticate with (RFC 7672 3.1.3)."""
    return tuple(r for r in records if r.usage in (DANE_TA, DANE_EE)
                 and r.selector in (0, 1) and r.mtype in (0, 1, 2)
                 and (r.mtype == 0 or len(r.data) == _DIGESTS[r.mtype]().digest_size))


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(record: Tlsa, cert: x509.Certificate, der: bytes) -> bool:
    data = _selected(cert, der, record.selector)
    if record.mtype != 0:
        data = _DIGESTS[record.mtype](data).digest()
    return data == record.data


def authenticate(chain: list[bytes], records: tuple[Tlsa, ...], host: str) -> str:
    """Check the presented ``chain`` (DER, leaf first) against usable ``records`` of MX host
    ``host``; returns how it was authenticated (``dane-ee`` or ``dane-ta``), raises DaneError
    if no record authenticates it (a certificate this library cannot read, an unsupported
    key included: the server's chain is the attacker's to choose)."""
    if not chain:
        raise DaneError("the server presented no certificate")
    if len(chain) > MAX_CHAIN:
        raise DaneError(f"certificate chain of {len(chain)} certificates (at most "
                        f"{MAX_CHAIN} are checked)")
    try:
        return _authenticate(chain, records, host)
    except DaneError:
        raise
    except Exception as exc:
        raise DaneError(f"certificate not usable: {type(exc).__name__}: {exc}"[:200]) from None


def _authenticate(chain: list[bytes], records: tuple[Tlsa, ...], host: str) -> str:
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        raise DaneError(f"unreadable certificate: {exc}") from None
    leaf = certs[0]
    if any(r.usage == DANE_EE and _matches(r, leaf, chain[0]) for r in records):
        return "dane-ee"
    ta_records = [r for r in records if r.usage == DANE_TA]
    # A full certificate in DNS (selector 0, exact match) anchors even if the server left it
    # out of the chain; it comes first, as DNS (not the server) vouches for it.
    anchors: list[tuple[int, x509.Certificate]] = []
    for r in ta_records:
        if r.selector == 0 and r.mtype == 0:
            try:
                anchors.append((len(certs), x509.load_der_x509_certificate(r.data)))
            except ValueError:
                continue
    anchors += [(i, certs[i]) for i in range(1, len(certs))
                if any(_matches(r, certs[i], chain[i]) for r in ta_records)]
    if not anchors:
        names = ", ".join(sorted({str(r) for r in records}))
        raise DaneError(f"no TLSA record ({names}) matches the certificate chain")
    why = ""
    for i, anchor in anchors[:MAX_ANCHORS]:
        try:
            verifier = (verification.PolicyBuilder()
                        .store(verification.Store([anchor]))
                        .time(datetime.datetime.now(datetime.UTC))
                        .extension_policies(
                            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=_EE_POLICY)
                        .build_server_verifier(verification.DNSName(host)))
            verifier.verify(leaf, certs[1:i])
        except (verification.VerificationError, ValueError) as exc:
            why = str(exc).split(" (encountered", 1)[0]
            continue
        return "dane-ta"
    raise DaneError(f"the chain does not verify to its DANE-TA anchor for {host}: "
                    f"{why or 'the anchor is the leaf'}")
