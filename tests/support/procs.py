"""Processes as tests see them from outside: read from /proc."""

from __future__ import annotations

import os

__all__ = ["alive", "signing_children"]


def alive(pid: int) -> bool:
    """Is ``pid`` a process that has not ended (a zombie, not yet reaped, has)?"""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def signing_children() -> list[int]:
    """This process's live children running ``mta.dkim.child``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"mta.dkim.child" in cmdline:
            found.append(int(entry))
    return found
