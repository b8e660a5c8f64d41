"""What every mtactl verb shares: finding the node, calling its API, printing the answer."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

__all__ = ["CtlError", "UsageError", "age", "call", "emit", "resolve_target", "table", "when"]

DEFAULT_URL = "http://127.0.0.1:8025"


class CtlError(Exception):
    """An operation failed (exit 1); the message says what is wrong and what to try."""


class UsageError(Exception):
    """The command line is wrong (exit 2)."""


def resolve_target(args: argparse.Namespace) -> None:
    """Fill ``args.url`` and ``args.token``: flags, then MTACTL_URL / MTACTL_TOKEN, then the
    node's own config file (--config or MTACTL_CONFIG), then the default URL."""
    url = args.url or os.environ.get("MTACTL_URL", "")
    token = args.token or os.environ.get("MTACTL_TOKEN", "")
    config = args.config or os.environ.get("MTACTL_CONFIG", "")
    if config and (not url or not token):
        from mta.config import ConfigError, load_admin

        try:
            admin = load_admin(config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        host, port = admin.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        host = f"[{host}]" if ":" in host else host
        url = url or f"http://{host}:{port}"
        token = token or admin.token
    args.url = url or DEFAULT_URL
    args.token = token
    try:
        parsed = urllib.parse.urlsplit(args.url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        raise UsageError(f"--url {args.url!r}: {exc}; for example {DEFAULT_URL}") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--url {args.url!r} is not an http:// URL; for example "
                         f"{DEFAULT_URL}")
    try:
        parsed.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        raise UsageError(f"--url {args.url!r} has a bad port") from None


def call(args: argparse.Namespace, path: str, body: dict[str, Any] | None = None,
         query: dict[str, str] | None = None, method: str | None = None,
         timeout: float = 30.0) -> Any:
    """One admin API request; raises CtlError with the server's error and hint."""
    url = args.url.rstrip("/") + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"Authorization": f"Bearer {args.token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers,
                                 method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
        except ValueError:
            raise CtlError(f"HTTP {exc.code} {exc.reason} from {args.url}") from None
        if exc.code == 401:
            said = (f"token rejected by {args.url}" if args.token
                    else f"no token given, and {args.url} wants one")
            raise CtlError(f"{said}; pass --token or set MTACTL_TOKEN to the node's "
                           "[admin] token (or use --config with the node's config file)"
                           ) from None
        hint = answer.get("hint", "")
        raise CtlError(f"{answer.get('error', exc.reason)} (HTTP {exc.code})"
                       + (f"; {hint}" if hint else "")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"node not reachable at {args.url}: {reason}; is it running? "
                       "check --url, MTACTL_URL or the [admin] listen of --config") from None
    except ValueError:
        raise CtlError(f"{args.url} did not answer JSON: is it an mta admin API?") from None


def emit(args: argparse.Namespace, data: Any, human: str) -> int:
    """Print ``data`` as JSON with --json, else the human text; exit code 0."""
    print(json.dumps(data, indent=2) if args.json else human)
    return 0


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in header]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


def age(seconds: float | None) -> str:
    """``93`` -> ``1m33s``: an age or a duration for humans."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.2f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when(epoch: float | None) -> str:
    """An epoch as "now" or "in 4m10s"."""
    if epoch is None:
        return "-"
    delta = epoch - time.time()
    return "now" if delta <= 0.5 else f"in {age(delta)}"
