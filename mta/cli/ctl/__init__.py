"""``mtactl``: operate an mta node or cluster over the admin API.

Exit codes: 0 ok, 1 the operation failed (node unreachable, refused), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from mta.cli.ctl import (
    drain,
    flush,
    message,
    nodes,
    passwd,
    probe,
    queue,
    rebalance,
    shards,
    slo,
    status,
    suspend,
    throttle,
)
from mta.cli.ctl.client import CtlError, UsageError, resolve_target

__all__ = ["main"]

_VERBS = (status, nodes, shards, queue, message, flush, suspend, throttle, drain, rebalance,
          probe, slo, passwd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors: one line and exit 2, as for our own.
        raise UsageError(f"{message} (see mtactl --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtactl", description="Operate an mta node or cluster.")
    parser.add_argument("--url", default="", help="admin API base URL (env MTACTL_URL; "
                                                  "default from --config or "
                                                  "http://127.0.0.1:8025)")
    parser.add_argument("--token", default="", help="admin API token (env MTACTL_TOKEN)")
    parser.add_argument("--config", default="", help="read URL and token from this node "
                                                     "config file (env MTACTL_CONFIG)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for verb in _VERBS:
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "offline", False):
            resolve_target(args)
        return int(args.func(args))
    except UsageError as exc:
        print(f"mtactl: {exc}", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"mtactl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
