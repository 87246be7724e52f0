"""prometheus-client objects built from the specs in names.py, and the /metrics server."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

from ops.metrics.names import MetricSpec


def require_prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise SystemExit(
            "metrics need prometheus-client: pip install 'vlmq[ops]' (or drop --metrics-port)"
        ) from None
    return prometheus_client


def build(specs: Iterable[MetricSpec], registry, gauge_mode: str = "all") -> Dict[str, Any]:
    """One prometheus-client metric per spec, registered in `registry`, keyed by spec name.

    gauge_mode is the multiprocess aggregation of gauges (only read in multiprocess mode)."""
    pc = require_prometheus()
    out: Dict[str, Any] = {}
    for s in specs:
        kw: Dict[str, Any] = {"labelnames": s.labels, "registry": registry}
        if s.type == "counter":
            out[s.name] = pc.Counter(s.name, s.help, **kw)
        elif s.type == "gauge":
            out[s.name] = pc.Gauge(s.name, s.help, multiprocess_mode=gauge_mode, **kw)
        elif s.type == "histogram":
            out[s.name] = pc.Histogram(s.name, s.help, buckets=s.buckets, **kw)
        else:
            raise ValueError(f"{s.name}: unknown metric type {s.type!r}")
    return out


@dataclass
class MetricsServer:
    """A running /metrics endpoint (prometheus-client's threaded HTTP server)."""

    server: Any
    thread: Any
    addr: str
    port: int

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("", "0.0.0.0", "::") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_registry(registry, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve `registry` on addr:port (port 0: any free port; see .port)."""
    pc = require_prometheus()
    server, thread = pc.start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, addr, server.server_address[1])


def multiprocess_registry(directory: Optional[str] = None):
    """A registry that sums the metrics every process wrote under PROMETHEUS_MULTIPROC_DIR."""
    pc = require_prometheus()
    from prometheus_client import multiprocess

    registry = pc.CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory or os.environ["PROMETHEUS_MULTIPROC_DIR"])
    return registry
