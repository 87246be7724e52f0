"""Benchmark result records: benchmarks/results/NAME.json, a list of
{"metric", "value", "unit", "baseline", "ratio", "machine", "date", "command"}."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional


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
    desc = f"{os.cpu_count()} cores {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    gpu = os.environ.get("VLMQ_BENCH_GPU")
    if gpu:
        desc = f"{gpu}; {desc}"
    return desc


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


def record(
    metric: str, value: float, unit: str, baseline: Optional[float] = None, machine: str = ""
) -> Record:
    ratio = None
    if baseline not in (None, 0):
        ratio = round(value / baseline, 4)
    return Record(
        metric=metric,
        value=round(float(value), 4),
        unit=unit,
        baseline=None if baseline is None else round(float(baseline), 4),
        ratio=ratio,
        machine=machine or machine_description(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        command=" ".join(shlex.quote(a) for a in ["vlmq", *sys.argv[1:]]) if sys.argv else "",
    )


def write_results(path: str, records: List[Record]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=2)
        f.write("\n")
