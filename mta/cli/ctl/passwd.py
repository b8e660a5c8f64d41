"""``mtactl passwd USER``: print a users-file line (scrypt hash) for SMTP AUTH."""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

from mta.cli.ctl.client import CtlError


def run(args: argparse.Namespace) -> int:
    from mta.ingress.auth import hash_password

    password = os.environ.get("MTA_PASSWORD") or getpass.getpass(f"password for {args.user}: ")
    if not password:
        raise CtlError("empty password refused")
    print(f"{args.user}:{hash_password(password)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("passwd", help="print a users-file line for USER (reads the password)")
    p.add_argument("user")
    p.set_defaults(func=run, offline=True)
