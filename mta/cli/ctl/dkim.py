"""``mtactl dkim``: the DNS TXT records to publish for the node's DKIM keys (read from its
config file), or for one key file; offline, no node needed."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from mta.cli.ctl.client import CtlError, UsageError, emit

_LABELS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def _one_key(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    if not args.selector or not args.domain:
        raise UsageError("dkim KEYFILE needs --selector and --domain (the d= the key signs "
                         "for)")
    for option, value in (("--selector", args.selector), ("--domain", args.domain)):
        if not _LABELS.fullmatch(value):
            shown = value[:60].encode("ascii", "backslashreplace").decode()
            raise UsageError(f"{option}: expected DNS labels (letters, digits, '-', '.'), "
                             f"got {shown!r}")
    return [(args.domain, args.selector, args.key, args.algorithm)]


def _configured(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    from mta.config import ConfigError, load_config

    config = args.config or os.environ.get("MTACTL_CONFIG", "")
    if not config:
        raise UsageError("dkim: give --config FILE (the node's config, its [dkim] keys) or "
                         "KEYFILE --selector S --domain D")
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    wanted = []
    for name, entry in sorted(cfg.dkim.domains.items()):
        domain = entry.signing_domain or name
        for key in (entry, entry.dual):
            if key is not None:
                wanted.append((domain, key.selector, key.key, key.algorithm))
    if not wanted:
        raise CtlError(f"{config}: no [dkim.domains] configured")
    return wanted


def _records(args: argparse.Namespace) -> list[dict[str, str]]:
    from mta.dkim.keys import DkimKeyError, load_key

    out = []
    for domain, selector, path, algorithm in (_one_key(args) if args.key
                                              else _configured(args)):
        try:
            name, value = load_key(path, selector, algorithm).dns_record(domain)
        except DkimKeyError as exc:
            raise CtlError(str(exc)) from None
        out.append({"name": name, "type": "TXT", "value": value, "algorithm": algorithm,
                    "key": path})
    return out


def run(args: argparse.Namespace) -> int:
    from mta.dkim.keys import txt_strings

    records = _records(args)
    lines = []
    for r in records:
        lines.append(f"{r['name']}. IN TXT {txt_strings(r['value'])}")
        if r["name"].split("._domainkey.", 1)[1].startswith("*"):
            lines.append(f"; {r['name']}: a pattern: publish it under each From: domain it "
                         "matches, or set signing_domain")
    return emit(args, records, "\n".join(lines))


def register(sub: Any) -> None:
    p = sub.add_parser("dkim", help="print the DNS TXT records that publish the DKIM keys")
    p.add_argument("key", nargs="?", default="", help="a PEM private key file (default: "
                   "every key in --config's [dkim])")
    p.add_argument("--selector", default="")
    p.add_argument("--domain", default="")
    p.add_argument("--algorithm", default="rsa-sha256",
                   choices=("rsa-sha256", "ed25519-sha256"))
    p.set_defaults(func=run, offline=True)
