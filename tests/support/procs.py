"""Processes as tests see them from outside: read from /proc."""

from __future__ import annotations

__all__ = ["alive"]


def alive(pid: int) -> bool:
    """Is ``pid`` a process that has not ended (a zombie, not yet reaped, has)?"""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
