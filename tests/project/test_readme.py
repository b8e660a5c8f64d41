"""The README's key list is the config schema: every key of every section, each with the
default the code uses, so the two cannot drift apart."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

import pytest

from mta.config import _SECTIONS
from tests.support import ROOT

README = ROOT / "README.md"

# Defaults the README shows as what they become on a machine rather than as a value.
_PLACEHOLDERS = {("node", "id"): "<hostname>", ("smtp", "hostname"): "<fqdn>"}
# Defaults computed from other keys: the README shows the value of the default config.
_COMPUTED = {("smtp", "reserved_connections"), ("spool", "min_insync")}
# Example tables under a section (policies per destination), not keys with defaults.
_EXAMPLES = {("delivery", "domains"), ("delivery", "sites"), ("dkim", "domains"),
             ("tenants", "names"),  # [tenants."name"] tables, shown as comments
             ("egress", "sources"), ("egress", "pools")}  # also shown as comments


def _readme_config() -> dict[str, Any]:
    text = README.read_text()
    start = text.index("Every key, with its default:")
    block = re.search(r"```toml\n(.*?)```", text[start:], re.S)
    assert block is not None, "the README's key list is a ```toml block"
    return tomllib.loads(block.group(1))


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


@pytest.mark.parametrize("section", sorted(_SECTIONS))
def test_every_key_is_listed_with_the_default_the_code_uses(section: str) -> None:
    listed = _readme_config().get(section)
    assert isinstance(listed, dict), f"[{section}] missing from the README's key list"
    fields = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}
    keys = {k for k in listed if (section, k) not in _EXAMPLES}
    schema = {k for k in fields if (section, k) not in _EXAMPLES}
    assert sorted(schema - keys) == [], f"[{section}] keys the README does not list"
    assert sorted(keys - schema) == [], f"[{section}] keys the README lists that do not exist"
    for key in sorted(keys):
        f, shown = fields[key], listed[key]
        if (section, key) in _PLACEHOLDERS:
            assert shown == _PLACEHOLDERS[section, key]
            continue
        if (section, key) in _COMPUTED:
            continue
        assert f.metadata["parse"](shown) == _default(f), (
            f"[{section}] {key}: README shows {shown!r}, the code's default is {_default(f)!r}")


def test_the_example_policies_parse() -> None:
    from mta.config import config_from_dict

    listed = _readme_config()
    cfg = config_from_dict({"delivery": {k: listed["delivery"][k]
                                         for k in ("domains", "sites")}}, str(README))
    assert cfg.delivery.domains and cfg.delivery.sites
