"""``mtactl trace``: watch SMTP sessions live, like KumoMTA's ``kcli trace-smtp-server``.

Prints one line per event (connect, each command and reply line, STARTTLS, AUTH outcome,
DATA size and queue id, disconnect) of the sessions the filter matches, cluster-wide unless
``--local``, until Ctrl-C (exit 0). ``--json`` prints the API's NDJSON lines as they come.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
import urllib.parse
from typing import Any

from mta.cli.ctl.client import CtlError, UsageError
from mta.text import escape_controls

_PATH = "/api/v1/trace"
_CONNECT_TIMEOUT = 10.0
# The stream itself has no deadline: a trace of a quiet client may say nothing for hours.
_MAX_LINE = 64 * 1024


def _clean(value: Any) -> str:
    # The node escapes what sessions send; escaped again here, so nothing in the stream
    # (a peer's line included) can drive the terminal.
    return escape_controls(str(value))


def _describe(event: str, f: dict[str, Any]) -> str:
    """The readable part of one event."""
    if event == "command":
        return "> " + ("(line too long, discarded)" if f.get("too_long") else
                       _clean(f.get("line")))
    if event == "reply":
        return "< " + _clean(f.get("line"))
    if event == "connect":
        tls = " TLS" if f.get("tls") else ""
        return f"connect from {_clean(f.get('client'))}:{_clean(f.get('port'))}{tls}"
    if event == "tls":
        return f"TLS established ({_clean(f.get('version'))} {_clean(f.get('cipher'))})"
    if event == "auth":
        outcome = "succeeded" if f.get("ok") else "FAILED"
        return f"AUTH as {_clean(f.get('user'))} {outcome}"
    if event == "data":
        if not f.get("accepted"):
            size = f.get("size")
            return "DATA refused" + (f" ({_clean(size)} bytes)" if size is not None else "")
        return f"DATA {_clean(f.get('size'))} bytes, queued as {_clean(f.get('queue_id'))}"
    if event == "disconnect":
        error = f.get("error")
        return "disconnect" + (f" ({_clean(error)})" if error else "")
    return _note(event, f)


def _note(event: str, f: dict[str, Any]) -> str:
    """The readable part of an event about the stream itself (or one not known here)."""
    if event == "dropped":
        return (f"!! {_clean(f.get('count'))} event(s) dropped: this trace did not keep "
                "up (narrow the filter)")
    if event == "peer_unreachable":
        return f"!! node not traced: {_clean(f.get('error'))}"
    if event == "trace_started":
        flt = f.get("filter") or {}
        what = " ".join(f"{k}={_clean(v)}" for k, v in sorted(flt.items())) or "all sessions"
        return f"tracing {what}"
    if event == "trace_ended":
        return f"!! trace ended: {_clean(f.get('reason'))}"
    return " ".join(f"{_clean(k)}={_clean(v)}" for k, v in sorted(f.items()))


def format_event(data: dict[str, Any]) -> str:
    """One event as a line for humans: time, node, session, what happened."""
    try:
        stamp = time.strftime("%H:%M:%S", time.localtime(float(data.get("time", 0))))
        stamp += f".{int(float(data.get('time', 0)) * 1000) % 1000:03d}"
    except (TypeError, ValueError, OverflowError):
        stamp = "--:--:--.---"
    fields = data.get("fields")
    text = _describe(_clean(data.get("event", "?")), fields if isinstance(fields, dict) else {})
    return f"{stamp} {_clean(data.get('node', '-'))} {_clean(data.get('session') or '-')} {text}"


def _open(args: argparse.Namespace, query: dict[str, str]) -> tuple[Any, Any]:
    """The connection and the (200) streaming response; CtlError otherwise."""
    parsed = urllib.parse.urlsplit(args.url)
    kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    conn = kind(parsed.hostname or "", parsed.port, timeout=_CONNECT_TIMEOUT)
    path = parsed.path.rstrip("/") + _PATH + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {args.token}",
                                           "Accept": "application/x-ndjson"})
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise CtlError(f"node not reachable at {args.url}: {exc}; is it running? check --url, "
                       "MTACTL_URL or the [admin] listen of --config") from None
    if resp.status != 200:
        body = resp.read(_MAX_LINE)
        conn.close()
        raise _refusal(args, resp.status, resp.reason, body)
    if conn.sock is not None:
        conn.sock.settimeout(None)  # connected and answered: now wait as long as it takes
    return conn, resp


def _refusal(args: argparse.Namespace, status: int, reason: str, body: bytes) -> CtlError:
    if status == 401:
        said = (f"token rejected by {args.url}" if args.token
                else f"no token given, and {args.url} wants one")
        return CtlError(f"{said}; pass --token or set MTACTL_TOKEN to the node's [admin] "
                        "token (or use --config with the node's config file)")
    try:
        answer = json.loads(body)
        error, hint = answer.get("error", reason), answer.get("hint", "")
    except (ValueError, AttributeError):
        return CtlError(f"HTTP {status} {reason} from {args.url}")
    return CtlError(f"{error} (HTTP {status})" + (f"; {hint}" if hint else ""))


def _stream(args: argparse.Namespace, resp: Any) -> int:
    while True:
        try:
            raw = resp.readline(_MAX_LINE)
        except (OSError, http.client.HTTPException) as exc:
            raise CtlError(f"the trace stream from {args.url} broke off: {exc}; run mtactl "
                           "trace again") from None
        if not raw:
            raise CtlError(f"{args.url} ended the trace (node stopping?); run mtactl trace "
                           "again")
        line = raw.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except ValueError:
            print(f"(unreadable line: {_clean(line[:100])})", flush=True)
            continue
        if args.json:
            # Re-encoded, never printed raw: escapes reach the terminal as text only.
            print(json.dumps(data, separators=(",", ":")), flush=True)
            continue
        if isinstance(data, dict):
            print(format_event(data), flush=True)


def run(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("client", args.client), ("user", args.user),
                               ("session", args.session)) if v is not None}
    for key, value in query.items():
        if not value:
            raise UsageError(f"--{key} needs a value (leave the option out to match any)")
    if args.local:
        query["local"] = "1"
    conn = None
    try:
        conn, resp = _open(args, query)
        return _stream(args, resp)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a trace ends
    finally:
        if conn is not None:
            conn.close()


def register(sub: Any) -> None:
    p = sub.add_parser("trace", help="watch SMTP sessions live: commands, replies, AUTH, "
                                     "DATA (cluster-wide; Ctrl-C to stop)")
    p.add_argument("--client", metavar="ADDR|CIDR", help="only clients from this address or "
                                                          "network")
    p.add_argument("--user", help="only sessions that authenticate as this AUTH user")
    p.add_argument("--session", metavar="ID", help="only this session (ids as the trace "
                                                    "shows them)")
    p.add_argument("--local", action="store_true", help="this node only")
    p.set_defaults(func=run)
