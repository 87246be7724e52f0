"""`vlmq bench NAME`: each benchmark module of `BENCHMARKS` gives its flags (`add_args`)
and `run`; its docstring is its help. Only `vlmq` imports this module: it imports every
benchmark, which `import ops.bench.chat` should not."""

from __future__ import annotations

import argparse
import importlib
from typing import Callable

from broker.commands import Command
from ops.bench import BENCHMARKS


def _with_out(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default=f"benchmarks/results/{name}.json", help="results file (%(default)s)")
        add_args(p)

    return add


def _benchmark(name: str, module: str) -> Command:
    mod = importlib.import_module(module)
    doc = mod.__doc__
    return Command(
        name,
        help=doc.strip().splitlines()[0],
        description=doc,
        add_args=_with_out(name, mod.add_args),
        run=mod.run,
    )


COMMAND = Command(
    "bench",
    help="run a benchmark and write benchmarks/results/NAME.json",
    description="Each benchmark measures vlmq beside a baseline in the same run and writes "
    "records {metric, value, unit, baseline, ratio, machine, date, command}.",
    metavar="NAME",
    subcommands=[_benchmark(name, module) for name, module in BENCHMARKS.items()],
)
