"""DKIM for tests: keys written as PEM files, their TXT records served by the loopback DNS
server, and an independent verifier (dkimpy) that looks the records up over that server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from harness.dns import DNSServer
from mta.dkim.keys import SigningKey, load_key, txt_strings
from mta.dkim.signer import DomainKeys, Signer

__all__ = ["WEAK_RSA_512", "dkim_zone", "pooled", "signatures_verify", "write_key"]

# Too short for DKIM (cryptography will not make one): what a config must refuse.
WEAK_RSA_512 = b"""\
-----BEGIN PRIVATE KEY-----
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAx7381sALdT3HM39F
SbynLKPmOZrJYFDq1uR9mocv8J39PxBLViAPrzymr0S8FGwJCPExDuNWArV8Bq7Y
T26QwwIDAQABAkAlQYqng6qfc6Z0NIj39/g2m1uV4wksresfqf7Dk/OdLYZUh+I5
RkW4KJD4oRMr6D194bbeoj0EWDqQsCbcQYABAiEA7p3Wu3Pd+X4dfsgvLQ0s1ftR
ArDMLW3JkUUuEST3GwECIQDWSyWmpRiO2l9MvHyECK7rN9y7F95JSBQmNo5brk//
wwIhAI69VMrl0Q+CZdqFndLxYrTOlfNqF3nFhyKjo58V4cwBAiEAhFKayTAg3fUR
67xn1s/V0wEHl6/BXtbXOlFtzkbwtykCIQCPcx/Vrwj23QY9tIyIETWPL47QvYZ+
/zzI1IzbybDc+A==
-----END PRIVATE KEY-----
"""


def write_key(directory: Path, name: str, algorithm: str = "rsa-sha256",
              bits: int = 2048) -> Path:
    """A fresh private key in ``directory/name`` (PEM, PKCS#8)."""
    key = (rsa.generate_private_key(public_exponent=65537, key_size=bits)
           if algorithm == "rsa-sha256" else ed25519.Ed25519PrivateKey.generate())
    path = directory / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def dkim_zone(domain: str, *keys: SigningKey | tuple[Path, str, str]) -> dict[str, dict]:
    """Zone entries publishing ``keys`` (loaded keys, or (path, selector, algorithm))."""
    zone: dict[str, dict] = {}
    for key in keys:
        loaded = key if isinstance(key, SigningKey) else load_key(str(key[0]), key[2], key[1])
        name, value = loaded.dns_record(domain)
        zone[name] = {"TXT": [txt_strings(value)]}
    return zone


def signatures_verify(message: bytes, server: DNSServer) -> list[bool]:
    """Per DKIM-Signature in ``message`` (top first): does dkimpy verify it, with its key
    looked up over ``server``? A signature that does not verify is False (not an error)."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    checker = dkim.DKIM(message)
    count = sum(1 for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
                if line.lower().startswith(b"dkim-signature:"))
    results = []
    for idx in range(count):
        try:
            results.append(bool(checker.verify(idx=idx, dnsfunc=lookup)))
        except dkim.DKIMException:
            results.append(False)
    return results


def pooled(keys: dict[str, SigningKey], processes: int, **kw: Any) -> Signer:
    """A signer for example.org with both ``keys`` (RSA and Ed25519), signing in
    ``processes`` child processes."""
    return Signer({"example.org": DomainKeys((keys["rsa"], keys["ed"]))},
                  processes=processes, **kw)
