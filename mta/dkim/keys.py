"""DKIM signing keys: read from PEM files, checked against the algorithm they are configured
for, and the DNS TXT record that publishes each one's public half."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = ["ALGORITHMS", "DkimKeyError", "SigningKey", "key_from_pem", "load_key", "txt_strings"]

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
RSA_BITS = (1024, 4096)


class DkimKeyError(Exception):
    """A key file that cannot be used: missing, unreadable, not a private key, or not one
    for the configured algorithm. The message names the file, never the key material."""


@dataclass(frozen=True, repr=False)
class SigningKey:
    """One selector's private key, ready to sign a SHA-256 digest of the header hash."""

    selector: str
    algorithm: str
    path: str
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    def __repr__(self) -> str:  # never the key material (logs, tracebacks)
        return f"SigningKey(selector={self.selector!r}, algorithm={self.algorithm!r}, " \
               f"path={self.path!r})"

    def sign(self, data: bytes) -> bytes:
        """The signature over ``data`` (the canonical headers) for the ``b=`` tag."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463: Ed25519 over the SHA-256 hash of the canonical headers.
        return self.private.sign(hashlib.sha256(data).digest())

    def pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM: for a signing process of this node
        only (over a pipe), never for a log or an API."""
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    def dns_record(self, domain: str) -> tuple[str, str]:
        """(name, TXT value) to publish: ``selector._domainkey.domain`` and ``v=DKIM1; ...``."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            der = public.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
            kind = "rsa"
        else:
            der = public.public_bytes(serialization.Encoding.Raw,
                                      serialization.PublicFormat.Raw)
            kind = "ed25519"
        p = base64.b64encode(der).decode()
        return f"{self.selector}._domainkey.{domain}", f"v=DKIM1; k={kind}; p={p}"


def load_key(path: str, selector: str, algorithm: str) -> SigningKey:
    """Read ``path`` (a PEM private key, unencrypted) for ``algorithm``."""
    if algorithm not in ALGORITHMS:
        raise DkimKeyError(f"algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    try:
        # A FIFO or a device would block the open or the read: regular files only.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DkimKeyError(f"{path!r} is not a regular file")
        with open(path, "rb") as fh:
            data = fh.read(64 * 1024)
    except OSError as exc:
        raise DkimKeyError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return key_from_pem(data, path, selector, algorithm)


def key_from_pem(data: bytes, path: str, selector: str, algorithm: str) -> SigningKey:
    """The key in ``data`` (PEM, read from ``path``), checked against ``algorithm``."""
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise DkimKeyError(f"{path!r} is encrypted: expected an unencrypted PEM private "
                           "key (protect it with file permissions)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimKeyError(f"{path!r} is not a PEM private key (expected "
                           "-----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----; "
                           "e.g. openssl genpkey -algorithm ed25519 -out FILE)") from None
    if algorithm == "rsa-sha256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{path!r} is not an RSA key, but algorithm is rsa-sha256")
        if not RSA_BITS[0] <= private.key_size <= RSA_BITS[1]:
            raise DkimKeyError(f"{path!r} is a {private.key_size}-bit RSA key: expected "
                               f"{RSA_BITS[0]} to {RSA_BITS[1]} bits (2048 recommended)")
    elif not isinstance(private, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{path!r} is not an Ed25519 key, but algorithm is ed25519-sha256")
    return SigningKey(selector, algorithm, path, private)


def txt_strings(value: str) -> str:
    """``value`` as a zone file writes a TXT record: quoted strings of at most 255
    characters (an RSA key's record is longer than one string may be)."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
