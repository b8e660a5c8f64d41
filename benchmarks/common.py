"""Shared benchmark plumbing: free ports, a node subprocess, RSS, the soak table helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from harness.net import free_port
from harness.proc import rss_kb

__all__ = ["add_rows", "cpu_seconds", "free_port", "launch_node", "node_sections", "rss_kb",
           "spawn_node", "stop_node", "wait_ready"]


def launch_node(work: Path, smtp_port: int, admin_port: int, concurrency: int,
                log_level: str, extra: str, smtp_extra: str = "", node_id: str = "bench"
                ) -> tuple[subprocess.Popen[bytes], Any]:
    """Write a node config (plus ``extra`` TOML, and ``smtp_extra`` keys in ``[smtp]``) under
    ``work``, start ``mta``, wait until its ``/readyz`` answers."""
    node, log = spawn_node(work, smtp_port, admin_port, concurrency, log_level, extra,
                           smtp_extra, node_id)
    wait_ready(node, log, work, admin_port)
    return node, log


def spawn_node(work: Path, smtp_port: int, admin_port: int, concurrency: int,
               log_level: str, extra: str, smtp_extra: str = "", node_id: str = "bench"
               ) -> tuple[subprocess.Popen[bytes], Any]:
    """``launch_node`` without the wait: several nodes of a cluster start at once (then
    ``wait_ready`` each)."""
    cfg = work / "node.toml"
    cfg.write_text(
        f'[node]\nid = "{node_id}"\nlog_format = "json"\nlog_level = "{log_level}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{smtp_port}"\nhostname = "bench.example"\n'
        f"max_connections = {concurrency * 2 + 10}\n"
        f"max_connections_per_ip = {concurrency * 2 + 10}\n" + smtp_extra +
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n' + extra
    )
    log = open(work / "node.log", "wb")  # noqa: SIM115 (closed by stop_node)
    node = subprocess.Popen([sys.executable, "-m", "mta", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=work)
    return node, log


def wait_ready(node: subprocess.Popen[bytes], log: Any, work: Path, admin_port: int,
               timeout: float = 20.0) -> None:
    """Wait until the node's ``/readyz`` answers 200; on failure stop it and say why (its
    last readiness checks and the tail of its log, which goes with its work directory)."""
    # Ready means listening: with reuse_port a peer already answers on the SMTP port, so only
    # the node's own /readyz says that this one can take connections.
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1).close()
            return
        except urllib.error.HTTPError as exc:  # 503: the checks that do not hold yet
            last = exc.read().decode(errors="replace")
        except OSError:
            pass
        if node.poll() is not None:
            raise RuntimeError(f"node exited at startup: {_tail(work)}") from None
        time.sleep(0.05)
    node.kill()
    node.wait()
    log.close()
    raise RuntimeError(f"node never became ready in {timeout:g} s ({last or 'no answer'}): "
                       f"{_tail(work)}")


def _tail(work: Path, lines: int = 5) -> str:
    try:
        text = (work / "node.log").read_text(errors="replace").splitlines()
    except OSError:
        return f"no {work / 'node.log'}"
    return f"{work / 'node.log'} ends:\n" + "\n".join(text[-lines:])


def node_sections(work: Path, delivery: str = "enabled = false\n", shards: int = 64,
                  spool: str = "") -> str:
    """The ``[spool]`` (plus ``spool`` TOML keys) and ``[delivery]`` TOML of a benchmark node
    working under ``work`` (by default it accepts durably and delivers nothing)."""
    return (f'[spool]\npath = "{work / "spool"}"\nshards = {shards}\n{spool}'
            f'[delivery]\n{delivery}accounting_log = "{work / "acct.jsonl"}"\n')


def stop_node(node: subprocess.Popen[bytes], log: Any) -> None:
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(60)
    except subprocess.TimeoutExpired:
        node.kill()  # its spool is about to be deleted: never leave it running
        node.wait()
    log.close()


def stat_fields(stat: Path) -> list[str]:
    """A ``/proc/<pid>/stat`` file's fields after the command name (state, ppid, ...; utime
    and stime at 11 and 12, the reaped children's at 13 and 14, in clock ticks)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """user + system CPU a process has used so far, its children's included: the live ones
    (our node's DKIM signing processes, Postfix's daemons) and those it has reaped."""
    total = 0
    # The live children first: one that exits between the two reads is then counted
    # twice (a few ms), never missed.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_fields(stat)
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:  # ppid
            total += int(fields[11]) + int(fields[12])
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    # utime, stime, and the reaped children's cutime, cstime
    total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def add_rows(path: Path, table: str, rows: str) -> None:
    """Add ``rows`` at the end of the results table marked ``<!-- TABLE rows -->`` in ``path``
    (appending to the file would put them under whichever table happens to come last)."""
    marker = f"<!-- {table} rows -->\n"
    text = path.read_text()
    if marker not in text:
        raise SystemExit(f"{path}: no {marker.strip()} line ending the {table} table")
    path.write_text(text.replace(marker, rows + marker, 1))


