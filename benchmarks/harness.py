"""What every scenario shares: machine and commit facts, repeats with a progress bar, min /
median / max summaries, and the JSON result file under ``benchmarks/results/``."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"

Run = dict[str, Any]


def measured_root() -> Path:
    """The tree whose ``mta`` the node processes import: the first PYTHONPATH entry when set
    (an old commit checked out in a worktree), else this one."""
    first = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    return Path(first) if first and (Path(first) / "mta").is_dir() else ROOT


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True,
                          text=True).stdout.strip()


def commit_info() -> dict[str, Any]:
    """The commit measured, and whether the tree had uncommitted changes to mta/ or cluster/
    (a dirty figure cannot be reproduced from its commit)."""
    root = measured_root()
    dirty = bool(git("status", "--porcelain", "--", "mta", "cluster", cwd=root))
    rev = git("rev-parse", "--short", "HEAD", cwd=root)
    if not rev and (root / ".commit").is_file():
        # A snapshot (git archive HEAD | tar -x) is no repository: the commit it was made
        # from, written beside it (git rev-parse --short HEAD > SNAPSHOT/.commit).
        rev = (root / ".commit").read_text().strip()
    return {"commit": rev, "dirty": dirty}


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare figures from two machines."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                   .splitlines() if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem = 0
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "loop": loop, "host": platform.node()}


def summarize(values: list[float]) -> dict[str, float]:
    """min / median / max of one metric over the runs."""
    vals = [v for v in values if not math.isnan(v)]  # NaN: a run could not measure it
    if not vals:
        return {"min": float("nan"), "median": float("nan"), "max": float("nan"), "n": 0}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals),
            "n": len(vals)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (``q`` in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def quantiles(sorted_values: list[float], points: int = 200) -> list[list[float]]:
    """A CDF small enough to keep in JSON: ``points`` (value, fraction) pairs, denser in the
    tail, where latency plots are read."""
    if not sorted_values:
        return []
    n = len(sorted_values)
    fracs = sorted({1 - 10 ** (-4 * i / points) for i in range(points)} | {1.0})
    return [[sorted_values[min(n - 1, int(f * n))], f] for f in fracs]


class Result:
    """One invocation of a scenario: its parameters, its runs grouped by labels (``target``,
    ``concurrency``...), extra series for plots, and where it was measured."""

    def __init__(self, scenario: str, params: dict[str, Any]) -> None:
        self.scenario = scenario
        self.params = params
        self.groups: list[dict[str, Any]] = []
        self.series: dict[str, Any] = {}
        self.notes: list[str] = []
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        # The tree as it is when the runs start: a commit made during a long run must not
        # relabel its figures.
        self.commit = commit_info()
        # 1/5/15-minute load averages at the start and at the end (another job on the
        # machine shows here).
        self.loadavg = {"start": list(os.getloadavg())}

    def add(self, labels: dict[str, Any], run: Run) -> None:
        for group in self.groups:
            if group["labels"] == labels:
                group["runs"].append(run)
                return
        self.groups.append({"labels": labels, "runs": [run]})

    def runs(self, **labels: Any) -> list[Run]:
        return [r for g in self.groups if all(g["labels"].get(k) == v for k, v in labels.items())
                for r in g["runs"]]

    def summary(self, metric: str, **labels: Any) -> dict[str, float]:
        return summarize([float(r[metric]) for r in self.runs(**labels) if metric in r])

    def to_json(self) -> dict[str, Any]:
        groups = []
        for g in self.groups:
            metrics = sorted({k for r in g["runs"] for k, v in r.items()
                              if isinstance(v, int | float) and not isinstance(v, bool)})
            groups.append({**g, "summary": {m: summarize([float(r[m]) for r in g["runs"]
                                                          if m in r]) for m in metrics}})
        return {"scenario": self.scenario, "started": self.started, **self.commit,
                "machine": machine_info(), "argv": sys.argv[1:], "params": self.params,
                "groups": groups, "series": self.series, "notes": self.notes,
                "loadavg": {**self.loadavg, "end": list(os.getloadavg())}}

    def save(self) -> Path:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        data = strict(self.to_json())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{self.scenario}-{stamp}-{data['commit']}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
        return path


def strict(value: Any) -> Any:
    """NaN (a figure a run could not measure) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict(v) for v in value]
    return value


def load_results() -> list[dict[str, Any]]:
    """Every saved result, oldest first."""
    out = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        data["file"] = path.name
        out.append(data)
    return sorted(out, key=lambda d: d["started"])


SETTLE_SECONDS = 1.0


def settle(seconds: float = SETTLE_SECONDS) -> None:
    """Start every run on a quiet disk: flush what earlier runs left dirty (their deleted
    spools' writeback would otherwise land on the next run's fsyncs, and on Postfix's one per
    message far more than on our group commit) and let the machine calm down."""
    os.sync()
    time.sleep(seconds)


class Progress:
    """One bar for a whole scenario; runs report units of work (messages, boots, trials)."""

    def __init__(self, total: int, desc: str, unit: str = "msg") -> None:
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 10.0, leave=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def status(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def say(self, text: str) -> None:
        """A line above the bar (per-run figures)."""
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


@contextmanager
def progress(total: int, desc: str, unit: str = "msg") -> Iterator[Progress]:
    bar = Progress(total, desc, unit)
    try:
        yield bar
    finally:
        bar.close()


def num(value: Any, digits: int = 0) -> str:
    """A figure for people: thousands separated; n/a for one a run could not measure."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt(s: dict[str, Any] | None, digits: int = 0) -> str:
    """``median (min-max)`` for a summary; one run (or no spread) prints just its value."""
    if not s or not s.get("n"):
        return "n/a"
    med = num(s["median"], digits)
    if s["n"] == 1 or s["min"] == s["max"]:
        return med
    return f"{med} ({num(s['min'], digits)}-{num(s['max'], digits)})"


def finish(result: Result, lines: list[str], args: Any) -> None:
    """Print the summary lines; unless ``--no-save``, keep ``--note``, save the JSON and
    regenerate RESULTS.md."""
    for line in lines:
        print(line)
    if getattr(args, "note", ""):
        result.notes.append(args.note)
    if args.no_save:
        return
    path = result.save()
    print(f"saved {path.relative_to(ROOT)}")
    from benchmarks.report import write_report

    write_report()
    print("regenerated benchmarks/RESULTS.md")


Tick = Callable[[int], None]


def load_options(ap: Any, messages: int, concurrency: str = "50", procs: int = 2,
                 peer: str = "auto", targets: bool = False) -> None:
    """The options every load-driven scenario takes."""
    ap.add_argument("--messages", type=int, default=messages, help="messages per run")
    ap.add_argument("--size", default="5",
                    help="KB per message: 5 (fixed), 2-64 (log-uniform) or mix")
    ap.add_argument("--concurrency", default=concurrency,
                    help="SMTP sessions; a comma list sweeps (1,10,50,100)")
    ap.add_argument("--procs", type=int, default=procs, help="load generator processes")
    ap.add_argument("--no-reuse", action="store_true", help="one connection per message")
    ap.add_argument("--peer", choices=("auto", "postfix", "none"), default=peer,
                    help="also run a private Postfix (auto: when installed)")
    if targets:
        target_options(ap)
    common_options(ap, repeat=3)


def target_options(ap: Any) -> None:
    """``--targets``: which targets run, interleaved (overrides ``--peer``)."""
    ap.add_argument("--targets", default="",
                    help="comma list of mta, mta-dkim (every message DKIM-signed, RSA-2048), "
                         "mta-replicated (2 nodes, each its own spool, every message on both "
                         "disks before 250), mta-x2 (2 standalone node processes on one "
                         "port, SO_REUSEPORT), postfix; overrides --peer")


def common_options(ap: Any, repeat: int) -> None:
    ap.add_argument("--repeat", type=int, default=repeat, help="runs per configuration")
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                    help="seconds to wait (after a sync) before each run")
    ap.add_argument("--no-save", action="store_true",
                    help="print only: no JSON under benchmarks/results/, RESULTS.md untouched")
    ap.add_argument("--note", default="", help="a word on this run, kept in the JSON")


def quick_options(ap: Any, args: Any, what: str, **values: Any) -> None:
    """``--quick``: a smoke run with ``values`` for the options left at their defaults, and
    nothing saved (a smoke figure must never become the latest result a target is judged
    by)."""
    if not getattr(args, "quick", False):
        return
    for key, value in values.items():
        if getattr(args, key) == ap.get_default(key):
            setattr(args, key, value)
    args.no_save = True
    print(f"quick smoke run ({what}); nothing saved", flush=True)


def add_quick(ap: Any, what: str) -> None:
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {what}; implies --no-save")


def sweep(spec: str) -> list[int]:
    return [int(x) for x in str(spec).split(",") if x.strip()]
