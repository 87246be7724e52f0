"""`--metrics-port` of `vlmq worker` and `vlmq agents`.

Neither package imports ops: each command takes what watches it from its parser's defaults
(the worker: observer factories; the agents: a metrics export that travels to every runner
process), and `vlmq` puts these there. Nothing here imports prometheus-client until a
command runs with a metrics port (it is in the `ops` extra, not the core install).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, List


def worker_metrics(settings) -> List[Any]:
    if not settings.metrics_port:
        return []
    from ops.metrics.worker import WorkerMetrics

    return [WorkerMetrics(settings).serve(settings.metrics_port, settings.metrics_addr)]


@dataclass(frozen=True)
class AgentMetricsExport:
    """env_agents.runner.spec.MetricsExport: one endpoint in the launching process for the
    metrics every runner process writes (prometheus-client's multiprocess mode)."""

    port: int

    def start(self) -> Any:
        from ops.metrics.agents import prepare_multiprocess, start_agent_metrics

        prepare_multiprocess()  # before any agent process starts: they inherit the directory
        return start_agent_metrics(self.port, multiprocess=True)

    def tracer(self, spec) -> Any:
        from ops.metrics.agents import MetricsTracer

        return MetricsTracer(spec.env_id)


def plug(commands: argparse._SubParsersAction) -> None:
    commands.choices["worker"].set_defaults(observer_factories=(worker_metrics,))
    commands.choices["agents"].set_defaults(metrics_export=AgentMetricsExport)
