"""structlog setup: JSON lines when stdout is not a terminal, coloured console otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(fmt: str = "auto", level: str = "info", node_id: str = "") -> None:
    """Configure structlog (and stdlib logging of libraries) for the daemon."""
    json_out = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    # One write per line even into a file or pipe: a crash (or SIGKILL) must not swallow
    # the last events before it, which are the ones an incident needs.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_out
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if json_out else structlog.dev.set_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    if node_id:
        # The same key the events pass themselves: one node_id per line, never node and node_id.
        structlog.contextvars.bind_contextvars(node_id=node_id)
    # aiosmtpd logs every command at INFO (and a deprecation warning per AUTH) through stdlib
    # logging: far too chatty for a production MTA; our own events cover what matters.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.ERROR)
