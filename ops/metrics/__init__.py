"""Prometheus metrics for the worker and the agents (ops/metrics/names.py lists them all).

prometheus-client comes with the `ops` extra and is imported only when metrics are used:
`from ops.metrics import WorkerMetrics` works in a core install until it is called.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "WorkerMetrics": "ops.metrics.worker",
    "AgentMetrics": "ops.metrics.agents",
    "start_agent_metrics": "ops.metrics.agents",
    "MetricsServer": "ops.metrics.registry",
    "serve_registry": "ops.metrics.registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ops.metrics' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
