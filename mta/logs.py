"""structlog setup: JSON lines when stdout is not a terminal, coloured console otherwise;
``HotEvent``, the same line for an event logged per message without structlog's cost per
call; and ``describe(exc)``, the text every ``error=`` field of a log event carries."""

from __future__ import annotations

import asyncio
import atexit
import errno
import json.encoder
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TextIO

import structlog

from mta.jsonenc import encoder

__all__ = ["HotEvent", "LineWriter", "configure_logging", "describe", "json_string",
           "structlog_settings"]

P = ParamSpec("P")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class LineWriter:
    """structlog's logger: writes each rendered line to ``file``. Debug and info lines
    logged on the event loop's thread are gathered and written together at the end of the
    loop's turn (a line per message at info cost a write system call per message: 17% of
    durable ingress's CPU); a warning or worse, a line from another thread, or one logged with
    no loop running is written at once, after the lines gathered before it. A SIGKILL loses at
    most the info lines of the turn it interrupts; nothing waits in memory longer."""

    def __init__(self, file: TextIO) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._gathered: list[str] = []  # touched on the loop's thread only
        atexit.register(self.flush)

    def _write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)
            self._file.flush()

    def flush(self) -> None:
        """Write the gathered lines (the loop calls this once per turn that logged)."""
        if self._gathered:
            text = "\n".join(self._gathered) + "\n"
            self._gathered.clear()
            self._write(text)

    def gather(self, message: str) -> None:
        """A debug or info line: at the end of this turn of the loop, if one runs here."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.now(message)
            return
        if not self._gathered:
            loop.call_soon(self.flush)
        self._gathered.append(message)

    def now(self, message: str) -> None:
        """Any other line: at once, after what this thread's loop gathered before it."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # another thread (or no loop): the loop's gathered lines are not ours
        else:
            self.flush()
        self._write(message + "\n")

    debug = info = gather
    msg = warning = warn = error = err = critical = fatal = exception = failure = now


class _Stamper:
    """structlog's ISO-8601 UTC ``timestamp`` (``2026-12-01T11:04:08.367064Z``), the date and
    time of day formatted once per second instead of per line (a fifth of a line's cost)."""

    def __init__(self) -> None:
        # (second, its date and time): one attribute, replaced whole, so a thread never
        # reads one second's prefix under another's (lines come from several threads).
        self._this_second = (-1, "")

    def __call__(self, _logger: object, _name: str, event: dict[str, object]
                 ) -> dict[str, object]:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        now = time.time()
        second = int(now)
        cached, prefix = self._this_second
        if second != cached:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._this_second = (second, prefix)
        return f"{prefix}.{int((now - second) * 1e6):06d}Z"


class _NodeId:
    """Adds ``node_id`` (the key the events pass themselves: one node_id per line, never
    node and node_id) unless the event has its own."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id

    def __call__(self, _logger: object, _name: str, event: dict[str, object]
                 ) -> dict[str, object]:
        if self._node_id:
            event.setdefault("node_id", self._node_id)
        return event


# structlog's add_log_level: the method name, but for two aliases.
_LEVEL_OF = {"warn": "warning", "exception": "error"}


def _fallback(obj: Any) -> Any:
    """What JSON cannot encode: its ``__structlog__()`` if it has one, else its repr."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


class _JsonLine:
    """structlog's JSON chain (``node_id``, ``add_log_level``, the timestamp,
    ``format_exc_info``, ``JSONRenderer``) as one processor: the same line, one call instead
    of five per event, the JSON encoder built once."""

    def __init__(self, node_id: str) -> None:
        self._node_id = _NodeId(node_id)
        self._stamp = _Stamper()
        self._dumps = encoder(default=_fallback)

    def __call__(self, logger: object, name: str, event: dict[str, Any]) -> str:
        self._node_id(logger, name, event)
        event["level"] = _LEVEL_OF.get(name, name)
        event["timestamp"] = self._stamp.now()
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, name, event)
        return self._dumps(event)

    def tail(self, event: str, name: str) -> str:
        """What follows the fields in the line of ``event`` logged by the method ``name``,
        when its fields have none of the keys this adds: event, node id, level, and the
        timestamp up to its value (:meth:`stamp`, then ``"}`` end the line)."""
        added: dict[str, Any] = {"event": event}
        self._node_id(None, name, added)
        added["level"] = _LEVEL_OF.get(name, name)
        return f", {self._dumps(added)[1:-1]}, \"timestamp\": \""

    def stamp(self) -> str:
        return self._stamp.now()


# How the JSON line quotes a string (as its encoder: ensure_ascii).
json_string = json.encoder.encode_basestring_ascii


class _HotWriter:
    """Where one event's JSON lines go, and what ends each (see :class:`HotEvent`)."""

    def __init__(self, line: _JsonLine, out: Any, event: str) -> None:
        self.line = line
        self.out = out
        self.tail = line.tail(event, "info")

    def write(self, head: str) -> None:
        self.out.info(f"{head}{self.tail}{self.line.stamp()}\"}}")


class HotEvent(Generic[P]):
    """An info event logged for every message (``smtp.received``): ``event(*args)`` logs
    ``log.info(name, **fields(*args))``, cheaper (5.7 us a line that way, 2.1 this way).

    When ``log`` writes JSON lines (:func:`configure_logging`), ``head(*args)`` renders the
    line's beginning, ``{"key": value, "key": value`` of the same fields (strings by
    :data:`json_string`, separators as the JSON line's), and this adds what
    :class:`_JsonLine` adds (event, node id, level, timestamp) and hands the line to the
    logger's ``info`` (LineWriter.gather), as structlog would. Skipped: structlog's dispatch
    per call (the lazy proxy, the bound method, three copies of the keyword arguments, the
    chain), the dict and the encoder. Any other output (the console, a test's capture_logs)
    gets ``fields`` through structlog; below the level, nothing is rendered at all.

    The fields must not use the keys the line adds (nor ``exc_info``); a test holds ``head``
    equal to what structlog makes of ``fields``."""

    def __init__(self, log: Any, name: str, fields: Callable[P, dict[str, Any]],
                 head: Callable[P, str]) -> None:
        self._log = log  # a module's structlog logger (a lazy proxy)
        self.name = name
        self._fields = fields
        self._head = head
        self._writer: _HotWriter | None = None

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None:
        # The logger structlog built for ``log`` (cached at its first use) and its chain,
        # looked at on every call: capture_logs swaps the chain's contents in place.
        bound = self._log.bind()
        if not bound.is_enabled_for(logging.INFO):
            return
        chain = bound._processors
        if len(chain) != 1 or type(chain[0]) is not _JsonLine or bound._context:
            bound.info(self.name, **self._fields(*args, **kwargs))
            return
        writer = self._writer
        if writer is None or writer.line is not chain[0] or writer.out is not bound._logger:
            writer = self._writer = _HotWriter(chain[0], bound._logger, self.name)
        writer.write(self._head(*args, **kwargs))


def structlog_settings(fmt: str, level: str, node_id: str, out: TextIO) -> dict[str, Any]:
    """The structlog configuration of the daemon writing to ``out``: JSON lines, or the
    console's when ``fmt`` says so or is ``auto`` and ``out`` is a terminal."""
    json_out = fmt == "json" or (fmt == "auto" and not out.isatty())
    writer = LineWriter(out)
    # The node id on every line, where structlog's contextvars would put it: one process
    # serves one node, so one constant, not a walk of the context per line.
    processors: list[structlog.types.Processor] = [_JsonLine(node_id)] if json_out else [
        _NodeId(node_id),
        structlog.processors.add_log_level,
        _Stamper(),
        structlog.dev.set_exc_info,
        structlog.dev.ConsoleRenderer(colors=out.isatty()),
    ]
    return {
        "processors": processors,
        "wrapper_class": structlog.make_filtering_bound_logger(_LEVELS[level]),
        "logger_factory": lambda *_: writer,
        "cache_logger_on_first_use": True,
    }


def configure_logging(fmt: str = "auto", level: str = "info", node_id: str = "") -> None:
    """Configure structlog (and stdlib logging of libraries) for the daemon."""
    # One write per line (or per turn of the loop, for its info lines: LineWriter) even
    # into a file or pipe: a crash (or SIGKILL) must not swallow the last events before it,
    # which are the ones an incident needs.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    structlog.configure(**structlog_settings(fmt, level, node_id, sys.stdout))
    # aiosmtpd logs every command at INFO (and a deprecation warning per AUTH) through stdlib
    # logging: far too chatty for a production MTA; our own events cover what matters.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.ERROR)


# asyncio's refused connect: "[Errno 111] Connect call failed ('127.0.0.1', 25)", also quoted
# inside aiohttp's and aiosmtplib's messages. The tuple is the address; the errno is the news.
_CONNECT_CALL = re.compile(r"(?:\[Errno (\d+)\] )?Connect call failed \(([^()]*)\)")
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^:\]\[]+)")
_MAX = 1000


def describe(exc: BaseException) -> str:
    """What went wrong, in one readable line for an ``error=`` log field: never empty, never
    a tuple repr; errno names for OS errors, "timed out" for a bare TimeoutError.

    Callers re-raise CancelledError rather than log it; if one gets here it reads
    "cancelled", not as a failure with an empty message."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    rpc = _rpc_status(exc)
    if rpc:
        return rpc
    raw = str(exc)
    text = _readable(" ".join(raw.split()), _errno_of(exc))
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) and "time" not in text.lower():
        # asyncio.wait_for() and asyncio.timeout() raise TimeoutError() with no message.
        return f"timed out: {text}" if text else "timed out"
    if not text:
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        return f"{name}: {describe(cause)}" if cause is not None else name
    if (len(exc.args) > 1 and raw == str(exc.args)) or (
            len(exc.args) == 1 and raw == repr(exc.args[0]) != str(exc.args[0])):
        # Exception("a", 1) prints as a tuple, KeyError("k") as a quoted repr.
        text = ", ".join(" ".join(str(a).split()) for a in exc.args)
        return f"{name}: {text}"[:_MAX]
    return text[:_MAX]


def _errno_of(exc: BaseException) -> int | None:
    """The errno of ``exc`` or of the OSError it wraps (aiosmtplib, aiohttp chain theirs)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


def _errno_text(number: int) -> str:
    name = errno.errorcode.get(number)
    return f"{os.strerror(number)} ({name})" if name else f"errno {number}"


def _readable(text: str, number: int | None) -> str:
    def connect(match: re.Match[str]) -> str:
        parts = [p.strip().strip("'\"") for p in match.group(2).split(",")]
        host, port = parts[0], parts[1] if len(parts) > 1 else "?"
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        code = int(match.group(1)) if match.group(1) else number
        what = _errno_text(code) if code else "connect failed"
        rest = text.replace(match.group(0), "")
        # aiohttp and aiosmtplib name the address themselves: say it once.
        if where in rest or f"{host} on port {port}" in rest:
            return what
        return f"{what} connecting to {where}"

    text = _CONNECT_CALL.sub(connect, text)
    # "[Errno 28] No space left on device" -> "No space left on device (ENOSPC)"
    return _ERRNO.sub(lambda m: f"{m.group(2).strip()} "
                                f"({errno.errorcode.get(int(m.group(1)), m.group(1))})", text)


def _rpc_status(exc: BaseException) -> str:
    """A gRPC error (etcd's client lets them through) as "STATUS: details"; its str() is a
    multi-line dump with a debug string."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if not (callable(code) and callable(details)):
        return ""
    try:
        status, detail = code(), details()
    except Exception:  # not a gRPC error after all, just something with those names
        return ""
    return f"{getattr(status, 'name', status)}: {' '.join(str(detail or 'no details').split())}"
