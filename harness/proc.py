"""Reading a process's memory from /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def status_kb(pid: int, field: str = "VmRSS") -> int:
    """A kB figure of /proc/PID/status: ``VmRSS`` (resident now), ``VmHWM`` (its peak)..."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss_kb(pid: int) -> int:
    """The resident set size of process ``pid``, in kB."""
    return status_kb(pid, "VmRSS")
