"""``mtactl passwd USER``: print a users-file line (scrypt hash) for SMTP AUTH."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from mta.cli.ctl.client import CtlError, UsageError

_NOT_UTF8 = "the password is not valid UTF-8 text; type it in a UTF-8 terminal or locale"


def _user_problem(user: str) -> str | None:
    """Why the users file could not hold ``user`` (its lines are ``user:hash``, ``#`` starts
    a comment), or None."""
    if not user:
        return "the user name is empty"
    if ":" in user:
        return "a user name cannot contain ':' (it separates the name from the hash)"
    if any(c.isspace() or not c.isprintable() for c in user):
        return "a user name cannot contain spaces or control characters"
    if user.startswith("#"):
        return "a user name cannot start with '#' (the users file reads it as a comment)"
    return None


def _read_password(user: str) -> str:
    """From the terminal without echo, or the first line of stdin when it is not a terminal
    (``echo "$PW" | mtactl passwd alice``)."""
    if not sys.stdin.isatty():
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise CtlError(_NOT_UTF8) from None
        if not line:
            raise CtlError("no password read (end of input); pipe one line or set "
                           "MTA_PASSWORD")
        return line.rstrip("\r\n")
    try:
        return getpass.getpass(f"password for {user}: ")
    except EOFError:
        raise CtlError("no password read (end of input); type it at the prompt or set "
                       "MTA_PASSWORD") from None


def run(args: argparse.Namespace) -> int:
    from mta.ingress.auth import hash_password

    if (problem := _user_problem(args.user)) is not None:
        raise UsageError(f"passwd {args.user!r}: {problem}")
    password = os.environ.get("MTA_PASSWORD") or _read_password(args.user)
    if not password:
        raise CtlError("empty password refused")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates
        raise CtlError(_NOT_UTF8) from None
    print(f"{args.user}:{hash_password(password)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("passwd", help="print a users-file line for USER (reads the password)")
    p.add_argument("user")
    p.set_defaults(func=run, offline=True)
