"""Benchmark result records: benchmarks/results/NAME.json, a list of
{"metric", "value", "unit", "baseline", "ratio", "machine", "date", "command", "commit",
"runs", "min", "max"}.

A figure measured several times is recorded as the median of its runs (never the best),
with the number of runs and their min and max; `baseline` is measured in the same run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Union


def usable_cores() -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container may see the host's cores but be allowed a few of them)."""
    cores: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = usable_cores()
    desc = (
        f"{cores:g} cores {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )
    # VLMQ_BENCH_MACHINE names the machine (e.g. which lent host); VLMQ_BENCH_GPU the card.
    for label in (os.environ.get("VLMQ_BENCH_GPU"), os.environ.get("VLMQ_BENCH_MACHINE")):
        if label:
            desc = f"{label}; {desc}"
    return desc


@lru_cache(maxsize=1)
def current_commit() -> str:
    """The git SHA of the code that ran (VLMQ_BENCH_COMMIT where there is no checkout, e.g.
    a copied tree on the GPU machine), with "+dirty" when the code had uncommitted changes
    (benchmarks/results/ aside)."""
    env = os.environ.get("VLMQ_BENCH_COMMIT")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # results written by earlier benchmarks are not code changes
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":!/benchmarks/results"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@dataclass
class Record:
    metric: str
    value: float
    unit: str
    baseline: Optional[float] = None
    ratio: Optional[float] = None
    machine: str = ""
    date: str = ""
    command: str = ""
    commit: str = ""
    runs: int = 1
    min: Optional[float] = None
    max: Optional[float] = None


def record(
    metric: str,
    value: Union[float, Sequence[float]],
    unit: str,
    baseline: Optional[Union[float, Sequence[float]]] = None,
    machine: str = "",
) -> Record:
    """One record. `value` (and `baseline`) may be the list of every run's figure: the
    record holds its median, the number of runs and their min and max."""
    runs = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
    if not runs:
        raise ValueError(f"{metric}: no runs")
    if isinstance(baseline, (list, tuple)):
        baseline = statistics.median(float(b) for b in baseline) if baseline else None
    mid = statistics.median(runs)

    def keep(x: float) -> float:  # 6 significant digits: small fractions keep their ratios
        return float(f"{x:.6g}")

    ratio = None
    if baseline not in (None, 0):
        ratio = keep(mid / baseline)
    return Record(
        metric=metric,
        value=keep(mid),
        unit=unit,
        baseline=None if baseline is None else keep(float(baseline)),
        ratio=ratio,
        machine=machine or machine_description(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        command=" ".join(shlex.quote(a) for a in ["vlmq", *sys.argv[1:]]) if sys.argv else "",
        commit=current_commit(),
        runs=len(runs),
        min=keep(min(runs)),
        max=keep(max(runs)),
    )


def write_results(path: str, records: List[Record]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=2)
        f.write("\n")
