"""`vlmq bench NAME`: benchmarks that write benchmarks/results/NAME.json."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "transport": "ops.bench.transport",
    "agents": "ops.bench.agents",
    "alfworld": "ops.bench.alfworld",
    "reliability": "ops.bench.reliability",
    "chat": "ops.bench.chat",
    "scale": "ops.bench.scale",
    "vla": "ops.bench.vla",
    "ops": "ops.bench.ops_overhead",
    "multigpu": "ops.bench.multigpu",
    "kernels": "ops.bench.kernels",
    "backends": "ops.bench.backends",
    "structured": "ops.bench.structured",
}


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark and write benchmarks/results/NAME.json",
        description="Each benchmark measures vlmq beside a baseline in the same run and writes "
        "records {metric, value, unit, baseline, ratio, machine, date, command}.",
    )
    bsub = p.add_subparsers(dest="bench", metavar="NAME")
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        bp = bsub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__)
        bp.add_argument("--out", default=f"benchmarks/results/{name}.json", help="results file (%(default)s)")
        mod.add_args(bp)
        bp.set_defaults(func=mod.run)
    p.set_defaults(func=lambda args: p.print_help() or 2)


__all__ = ["BENCHMARKS", "register"]
