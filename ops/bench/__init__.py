"""`vlmq bench NAME`: benchmarks that write benchmarks/results/NAME.json (the command:
`ops/bench/cli.py`)."""

from __future__ import annotations

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
