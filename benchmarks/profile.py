"""py-spy on a node process while a run loads it: the top functions by self and total share
of the samples, small enough to keep in a result's JSON."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Profiler", "summarize_raw"]


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def summarize_raw(text: str, top: int = 20) -> dict[str, Any]:
    """Collapsed stacks (``frame;frame;... count``) -> sample count, top self and total."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    in_threads: Counter[str] = Counter()  # samples of a frame taken in a worker thread
    samples = threaded = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        # The event loop runs in the main thread; the spool writer and to_thread work in
        # threads started by threading (their stacks start in Thread._bootstrap).
        worker = frames[0].startswith("Thread._bootstrap") or "threading.py" in frames[0]
        threaded += n if worker else 0
        own[frames[-1]] += n
        in_threads[frames[-1]] += n if worker else 0
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return {"samples": 0, "top": []}
    names = [name for name, _ in own.most_common(top)]
    return {"samples": samples, "threads_pct": 100 * threaded / samples, "top": [
        {"name": name, "self": 100 * own[name] / samples, "total": 100 * total[name] / samples,
         "thread": "worker" if in_threads[name] * 2 > own[name] else "event loop"}
        for name in names]}


class Profiler:
    """``with Profiler(pid, out) as p: ...`` then ``p.summary``; without py-spy (or ptrace
    rights) it says why and the run goes on unprofiled."""

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.summary: dict[str, Any] | None = None

    def __enter__(self) -> Profiler:
        exe = _py_spy()
        if exe is None:
            print("profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
            return self
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(self.pid), "-r", str(self.rate), "-f", "raw",
             "-o", str(self.out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return
        if self.out.exists():
            self.summary = summarize_raw(self.out.read_text())
        else:
            print(f"profile: py-spy wrote nothing: {err.decode(errors='replace')[-300:]}",
                  file=sys.stderr)
