"""Fixtures of the delivery tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    """A test certificate authority and its certificate's path (a ``tls_ca_file``)."""
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, str(path)
