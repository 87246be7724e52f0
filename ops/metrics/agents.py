"""AgentMetrics: the agents' side of the metrics, above all end-to-end latency as they see it.

The reply carries created_at (agent clock), received_at and replied_at (worker clock), so an
agent splits its round trip into legs without any other source:

    metrics = start_agent_metrics(9101)          # serve /metrics (vlmq agents --metrics-port)
    metrics.sent("text_action")
    reply = await client.request(req, timeout=10)
    metrics.observe(reply)                       # latency, legs, status, error code
    metrics.failed("text_action", "timeout")     # no reply: timeouts, backlog_full
    metrics.step("miniworld"); metrics.episode("miniworld")

Several agent processes, one endpoint: call `prepare_multiprocess()` in the parent before
starting them (and before anything imports prometheus_client), create an AgentMetrics in
each child, and `start_agent_metrics(port, multiprocess=True)` in the parent: the parent's
/metrics sums what every process wrote (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Optional

from env_agents.control.tracer import Tracer
from ops.metrics import names as n
from ops.metrics.registry import (
    MetricsServer,
    build,
    multiprocess_registry,
    require_prometheus,
    serve_registry,
)
from schemas.messages import Reply, Request

_MP_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(directory: Optional[str] = None) -> str:
    """Point this process and its children at a fresh multiprocess directory; returns it."""
    directory = directory or tempfile.mkdtemp(prefix="vlmq-agent-metrics-")
    os.makedirs(directory, exist_ok=True)
    os.environ[_MP_ENV] = directory
    return directory


class AgentMetrics:
    def __init__(self, registry=None) -> None:
        pc = require_prometheus()
        multiprocess = bool(os.environ.get(_MP_ENV))
        # In multiprocess mode values live in files, not in a registry of this process.
        self.registry = (
            registry if registry is not None else (None if multiprocess else pc.CollectorRegistry())
        )
        self.m = build(n.AGENT_METRICS, self.registry, gauge_mode="livesum")
        self.server: Optional[MetricsServer] = None

    def sent(self, kind: str, n_requests: int = 1) -> None:
        self.m[n.AGENT_REQUESTS.name].labels(kind).inc(n_requests)

    def observe(self, reply: Reply, now: Optional[float] = None) -> None:
        """Record a reply the agent has in hand (ok or error)."""
        now = time.time() if now is None else now
        kind = reply.kind
        self.m[n.AGENT_REPLIES.name].labels(kind, "ok" if reply.ok else "error").inc()
        if not reply.ok and reply.error is not None:
            code = getattr(reply.error.code, "value", reply.error.code)
            self.m[n.AGENT_ERRORS.name].labels(kind, str(code)).inc()
        if reply.created_at:
            self.m[n.AGENT_LATENCY.name].labels(kind).observe(max(0.0, now - reply.created_at))
        if reply.created_at and reply.received_at and reply.replied_at:
            legs = self.m[n.AGENT_TRANSIT.name]
            legs.labels(kind, "to_worker").observe(max(0.0, reply.received_at - reply.created_at))
            legs.labels(kind, "in_worker").observe(max(0.0, reply.replied_at - reply.received_at))
            legs.labels(kind, "to_agent").observe(max(0.0, now - reply.replied_at))

    def failed(self, kind: str, code: str) -> None:
        """A request that got no reply: 'timeout', 'backlog_full', ..."""
        self.m[n.AGENT_ERRORS.name].labels(kind, code).inc()

    def step(self, env: str, steps: int = 1) -> None:
        self.m[n.AGENT_STEPS.name].labels(env).inc(steps)

    def episode(self, env: str) -> None:
        self.m[n.AGENT_EPISODES.name].labels(env).inc()

    def sessions(self, delta: int) -> None:
        self.m[n.AGENT_SESSIONS.name].inc(delta)

    def serve(self, port: int, addr: str = "0.0.0.0") -> AgentMetrics:
        registry = self.registry if self.registry is not None else multiprocess_registry()
        self.server = serve_registry(registry, port, addr)
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class MetricsTracer(Tracer):
    """The controller's hooks, as agent metrics: one per runner process."""

    def __init__(self, env: str, metrics: Optional[AgentMetrics] = None) -> None:
        self.env = env
        self.metrics = metrics or AgentMetrics()

    def session_start(self, session: str) -> None:
        self.metrics.sessions(1)

    def session_end(self, session: str) -> None:
        self.metrics.sessions(-1)

    def request(self, session: str, t: int, obs: Any, req: Request) -> None:
        self.metrics.sent(req.kind)

    def reply(self, session: str, t: int, req: Request, reply: Reply, rtt_ms: float) -> None:
        self.metrics.observe(reply)

    def failed(self, session: str, t: int, req: Request, code: str) -> None:
        self.metrics.failed(req.kind, code)

    def step(self, session: str, t: int, item: Any, env_action: Any, result: Any) -> None:
        self.metrics.step(self.env)

    def episode_end(self, stats: Any) -> None:
        self.metrics.episode(self.env)

    def close(self) -> None:
        self.metrics.close()


def start_agent_metrics(port: int, addr: str = "0.0.0.0", multiprocess: bool = False) -> AgentMetrics:
    """AgentMetrics serving /metrics on addr:port. With multiprocess=True the endpoint sums
    the metrics of every process sharing PROMETHEUS_MULTIPROC_DIR (see prepare_multiprocess)."""
    if multiprocess and not os.environ.get(_MP_ENV):
        raise RuntimeError("multiprocess metrics: call prepare_multiprocess() before starting processes")
    return AgentMetrics().serve(port, addr)
