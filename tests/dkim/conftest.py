"""Keys the DKIM tests sign with: one RSA-2048 and one Ed25519, made once per module."""

from __future__ import annotations

import pytest

from mta.dkim.keys import SigningKey, load_key
from tests.support.dkim import write_key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    d = tmp_path_factory.mktemp("keys")
    return {"rsa": load_key(str(write_key(d, "rsa.pem")), "r2026", "rsa-sha256"),
            "ed": load_key(str(write_key(d, "ed.pem", "ed25519-sha256")), "e2026",
                           "ed25519-sha256")}
