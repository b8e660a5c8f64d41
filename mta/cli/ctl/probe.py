"""``mtactl probe``: send a synthetic message through the node and time it end to end."""

from __future__ import annotations

import argparse
from typing import Any

from mta.cli.ctl.client import CtlError, age, call, emit


def run(args: argparse.Namespace) -> int:
    data = call(args, "/api/v1/probe", {}, timeout=300)
    if data["ok"]:
        text = (f"probe delivered to {data['recipient']} in {age(data['total_seconds'])} "
                f"(submission {age(data['submit_seconds'])}); {data['reply']}")
    else:
        text = f"probe FAILED at {data['stage']}: {data['reply']}"
    emit(args, data, text)
    if not data["ok"]:
        raise CtlError(f"probe failed ({data['stage']}); see `mtactl message show "
                       f"{data['message_id']}`" if data["message_id"] else "probe failed")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("probe", help="send a probe message to [probe] recipient and time it")
    p.set_defaults(func=run)
