"""``mta --config PATH``: run one node until SIGTERM.

SIGTERM/SIGINT: graceful stop (421 to new sessions, finish DATA, flush, exit 0). A second
one exits at once; that loses nothing, because no 250 is ever sent before the fsync.
SIGHUP reloads users and TLS certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from importlib.metadata import entry_points

import structlog

import mta
from mta.config import Config, ConfigError, load_config
from mta.logs import configure_logging
from mta.spool import ShardLockedError
from mta.spool.layout import SpoolLayoutError

__all__ = ["main"]

log = structlog.get_logger("mta.daemon")


def _fail(message: str, code: int) -> int:
    print(f"mta: {message}", file=sys.stderr)
    return code


async def _serve(cfg: Config) -> int:
    from mta.node import Node, StartupError

    coordinator = None
    if not cfg.standalone:
        # The etcd coordinator is a plugin (entry point group "mta.coordinators"), so the
        # node core never imports the cluster package.
        found = entry_points(group="mta.coordinators", name="etcd")
        if not found:
            return _fail(f"config error: {cfg.source}: [cluster] etcd: the etcd coordinator "
                         "is not installed (pip install -e . from the mta source tree)", 2)
        coordinator = next(iter(found)).load()(cfg)
    node = Node(cfg, coordinator)
    try:
        await node.start()
    except StartupError as exc:
        return _fail(str(exc), exc.exit_code)
    except ShardLockedError as exc:
        return _fail(str(exc), 1)
    except SpoolLayoutError as exc:
        # The spool (or the cluster in etcd) was made with another shard count: starting
        # would hide mail. Part of the node may be up already (admin API, a writer thread).
        await node.stop()
        return _fail(f"config error: {cfg.source}: [spool] shards: {exc}", 2)
    # What start-up built (modules, the recovered spool index: a million entries with a full
    # queue) lives as long as the node; no full collection needs to walk it again.
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_term() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("daemon.signal", action="graceful stop")
            stop.set()
        else:
            # Second signal: leave now. Everything that got a 250 is already fsynced.
            log.warning("daemon.signal", action="immediate exit")
            sys.stdout.flush()
            os._exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    loop.add_signal_handler(signal.SIGHUP, node.reload)
    await stop.wait()
    await node.stop()
    return 0


# The cyclic collector's young generation, collected every this many new container objects
# (CPython: 700). A message makes a few hundred short-lived ones; at 700 the collector ran
# several times per message and took 3-4% of the event loop. Memory held by cyclic garbage
# stays bounded (a few MB at most); acyclic objects are freed at once as always.
_GC_YOUNG = 20_000


def _tune_gc() -> None:
    """Collect young objects less often; older generations as CPython does."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, older, oldest)


def _run(cfg: Config) -> int:
    _tune_gc()
    use_uvloop = cfg.node.loop in ("auto", "uvloop")
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            if cfg.node.loop == "uvloop":
                return _fail(f"config error: {cfg.source}: [node] loop: uvloop is not "
                             "installed (pip install uvloop) ", 2)
        else:
            return uvloop.run(_serve(cfg))
    return asyncio.run(_serve(cfg))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, exit 2, like every other usage and config error.
        self.exit(2, f"mta: {message} (see mta --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="mta", description="Run an mta node.")
    parser.add_argument("--config", "-c", required=True, metavar="PATH",
                        help="node configuration file (TOML)")
    parser.add_argument("--version", action="version", version=f"mta {mta.__version__}")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    if args.check:
        print(f"mta: {args.config}: configuration OK")
        return 0
    configure_logging(cfg.node.log_format, cfg.node.log_level, cfg.node.id)
    try:
        return _run(cfg)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
