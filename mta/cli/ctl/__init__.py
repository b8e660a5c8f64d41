"""``mtactl``: operate an mta node or cluster over the admin API.

Exit codes: 0 ok, 1 the operation failed (node unreachable, refused), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import mta
from mta.cli.ctl import (
    dkim,
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
    trace,
)
from mta.cli.ctl.client import CtlError, UsageError, resolve_target

__all__ = ["main"]

_VERBS = (status, nodes, shards, queue, message, flush, suspend, throttle, drain, rebalance,
          probe, slo, passwd, trace, dkim)


class _Parser(argparse.ArgumentParser):
    _intermixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # A verb's own parser (no sub-verbs below it) takes options anywhere among its
        # positionals (`mtactl message show --token T ID`): argparse alone consumes an
        # optional positional (nargs="?") as empty when an option comes before it.
        if self._subparsers is None and not self._intermixing:
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's own usage errors: one line and exit 2, as for our own.
        raise UsageError(f"{message} (see mtactl --help)")


def _global_options(parser: argparse.ArgumentParser, default: object,
                    json_default: object) -> None:
    """The options every verb takes, before or after the verb (``mtactl status --json``)."""
    parser.add_argument("--url", default=default, help="admin API base URL (env MTACTL_URL; "
                                                       "default from --config or "
                                                       "http://127.0.0.1:8025)")
    parser.add_argument("--token", default=default,
                        help="admin API token (env MTACTL_TOKEN)")
    parser.add_argument("--config", default=default, help="read URL and token from this node "
                                                          "config file (env MTACTL_CONFIG)")
    parser.add_argument("--json", action="store_true", default=json_default,
                        help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtactl", description="Operate an mta node or cluster.")
    parser.add_argument("--version", action="version", version=f"mtactl {mta.__version__}")
    _global_options(parser, "", False)
    # After the verb the same options must not reset what was given before it: SUPPRESS
    # leaves the attribute alone unless the option is present.
    after = argparse.ArgumentParser(add_help=False)
    _global_options(after, argparse.SUPPRESS, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for verb in _VERBS:
        verb.register(_WithGlobals(sub, after))
    return parser


class _WithGlobals:
    """The subparsers action, handing every verb's parser the global options as a parent."""

    def __init__(self, sub: Any, parent: argparse.ArgumentParser) -> None:
        self._sub, self._parent = sub, parent

    def nested(self, parser: argparse.ArgumentParser, dest: str, **kw: Any) -> _WithGlobals:
        """Sub-verbs of a verb (``mtactl queue list``), taking the global options too."""
        return _WithGlobals(parser.add_subparsers(dest=dest, metavar="ACTION", **kw),
                            self._parent)

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._sub.add_parser(
            name, parents=[self._parent, *kw.pop("parents", [])], **kw)
        return parser


def _silence_stdout() -> None:
    # Nothing more may reach stdout, or Python complains again as it flushes at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "offline", False):
            resolve_target(args)
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `mtactl queue | head`: the reader left; say nothing more
        _silence_stdout()
        return 1
    except OSError as exc:  # `mtactl status > /dev/full`: stdout cannot be written
        print(f"mtactl: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        _silence_stdout()
        return 1
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
