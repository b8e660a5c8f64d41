"""``mtactl dkim`` prints what to publish, and the DNS records it prints are the ones a
verifier needs; a missing or unusable key stops the node at start with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import node_config, toml_dumps
from mta.config import ConfigError, config_from_dict
from mta.dkim.keys import load_key
from mta.dkim.signer import DomainKeys, Signer
from tests.support import DNSServer, ctl
from tests.support.ctl import mta, one_line_error
from tests.support.dkim import signatures_verify, write_key


def config(tmp: Path, **domains: dict[str, object]) -> Path:
    path = tmp / "node.toml"
    raw = node_config(tmp / "spool", dkim={"domains": domains})
    path.write_text(toml_dumps(raw))
    return path


def test_the_printed_records_let_a_verifier_check_our_signatures(tmp_path: Path) -> None:
    rsa, ed = write_key(tmp_path, "r.pem"), write_key(tmp_path, "e.pem", "ed25519-sha256")
    cfg = config(tmp_path, **{"example.org": {
        "selector": "r1", "key": str(rsa),
        "dual": {"selector": "e1", "key": str(ed), "algorithm": "ed25519-sha256"}}})
    res = ctl("http://127.0.0.1:9", "--json", "dkim", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    records = json.loads(res.stdout)
    assert [r["name"] for r in records] == ["r1._domainkey.example.org",
                                            "e1._domainkey.example.org"]
    assert not any("PRIVATE" in json.dumps(r) for r in records)
    text = ctl("http://127.0.0.1:9", "dkim", "--config", str(cfg)).stdout
    assert text.startswith('r1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    assert '" "' in text.splitlines()[0], "a 2048-bit key's record is split in 255-char strings"
    # Publish exactly what it printed; what we sign then verifies.
    dns = DNSServer({r["name"]: {"TXT": [f'"{r["value"][:255]}" "{r["value"][255:]}"'
                                        if len(r["value"]) > 255 else f'"{r["value"]}"']}
                     for r in records})
    try:
        signer = Signer({"example.org": DomainKeys((
            load_key(str(rsa), "r1", "rsa-sha256"),
            load_key(str(ed), "e1", "ed25519-sha256")))})
        signed = signer.sign(b"From: a@example.org\r\nSubject: x\r\n\r\nhello\r\n")
        assert signatures_verify(signed, dns) == [True, True]
    finally:
        dns.close()
    one = ctl("http://127.0.0.1:9", "dkim", str(ed), "--selector", "e1", "--domain",
              "example.org", "--algorithm", "ed25519-sha256")
    assert one.returncode == 0 and one.stdout.startswith("e1._domainkey.example.org. IN TXT")


def test_bad_dkim_input_gets_one_line(tmp_path: Path) -> None:
    res = ctl("http://127.0.0.1:9", "dkim")
    assert res.returncode == 2 and "--config" in res.stderr
    res = ctl("http://127.0.0.1:9", "dkim", str(tmp_path / "none.pem"), "--selector", "s",
              "--domain", "example.org")
    assert res.returncode == 1 and "cannot read" in res.stderr and "none.pem" in res.stderr
    res = ctl("http://127.0.0.1:9", "dkim", "x.pem")
    assert res.returncode == 2 and "--selector" in res.stderr


def test_a_missing_or_wrong_key_stops_the_node_naming_the_file(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone.pem")
    missing = config(tmp_path, **{"example.org": {"selector": "s", "key": gone}})
    line = one_line_error(mta("--config", str(missing), "--check", cwd=tmp_path))
    assert '[dkim.domains."example.org"] key' in line and "gone.pem" in line
    ed = write_key(tmp_path, "e.pem", "ed25519-sha256")
    wrong = config(tmp_path, **{"*.example.org": {"selector": "s", "key": str(ed)}})
    line = one_line_error(mta("--config", str(wrong), "--check", cwd=tmp_path))
    assert "not an RSA key" in line and "e.pem" in line
    nosel = config(tmp_path, **{"example.org": {"key": str(ed), "algorithm": "ed25519-sha256"}})
    line = one_line_error(mta("--config", str(nosel), "--check", cwd=tmp_path))
    assert '[dkim.domains."example.org"] selector' in line


def test_settings_that_would_break_every_signature_are_config_errors(tmp_path: Path) -> None:
    key = str(write_key(tmp_path, "r.pem"))
    cases = [
        ({"headers": ["from", "x;s=evil"]}, "[dkim] headers"),
        ({"headers": ["subject"]}, "[dkim] headers"),  # From: is always signed
        ({"domains": {"example.org": {"selector": "s" * 300, "key": key}}},
         '[dkim] domains'),
        ({"domains": {"example.org": {"selector": "s1", "key": key,
                                      "dual": {"selector": "s1", "key": key}}}},
         '[dkim.domains."example.org".dual] selector'),
    ]
    for dkim, key_name in cases:
        with pytest.raises(ConfigError) as info:
            config_from_dict({"dkim": dkim}, "/etc/mta/node.toml")
        assert key_name in str(info.value) and "\n" not in str(info.value), info.value
