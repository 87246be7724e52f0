"""WorkerMetrics: the worker's Prometheus metrics, fed by the WorkerObserver hooks.

    vlmq worker --metrics-port 9100      # or Worker(settings, handlers, observers=[WorkerMetrics(settings)])

Hooks run on the worker's event loop and only touch in-memory counters; Redis gauges are
sampled by the HTTP server's thread at scrape time (redis_sampler.py), so a scrape never
slows the loop.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

from broker.replies import Settlement
from inference_worker.events import WorkerObserver
from inference_worker.scheduler import Batch, Item
from inference_worker.settings import WorkerSettings
from ops.metrics import names as n
from ops.metrics.redis_sampler import RedisSampler
from ops.metrics.registry import MetricsServer, build, require_prometheus, serve_registry

# created_at of admitted requests until their reply is written; bounded in case a commit
# never comes (the worker died mid-way: then the process is gone anyway).
_MAX_TRACKED = 200_000


def model_label(settings: WorkerSettings) -> str:
    if settings.model_name:
        return settings.model_name
    if settings.model_path:
        return os.path.basename(os.path.normpath(settings.model_path))
    return settings.backend


class WorkerMetrics(WorkerObserver):
    def __init__(self, settings: WorkerSettings, registry=None, sample_redis: bool = True) -> None:
        pc = require_prometheus()
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        self.model = model_label(settings)
        self.m = build(n.WORKER_METRICS, self.registry)
        self.m[n.WORKER_INFO.name].labels(
            settings.name, settings.backend, self.model, ",".join(settings.kinds)
        ).set(1)
        if sample_redis:
            self.registry.register(RedisSampler(settings.broker))
        self._created: Dict[Tuple[str, str], float] = {}
        self.server: Optional[MetricsServer] = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> WorkerMetrics:
        self.server = serve_registry(self.registry, port, addr)
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _km(self, spec: n.MetricSpec, kind: str, *more: str):
        return self.m[spec.name].labels(kind, self.model, *more)

    # ------------------------------------------------------------------ hooks

    def on_admitted(self, kind: str, item: Item) -> None:
        d = item.delivery
        self._km(n.REQUESTS, kind).inc()
        if d.deliveries > 1:
            self._km(n.REDELIVERIES, kind).inc()
        self._km(n.STREAM_WAIT, kind).observe(max(0.0, d.received_at - item.request.created_at))
        if len(self._created) >= _MAX_TRACKED:
            self._created.clear()
        self._created[(d.stream, d.entry_id)] = item.request.created_at

    def on_batch(self, batch: Batch, timings: Dict[str, float], started: float, finished: float) -> None:
        kind = batch.kind
        self._km(n.BATCHES, kind).inc()
        self._km(n.BATCH_SIZE, kind).observe(len(batch.items))
        self._km(n.BATCH_SECONDS, kind).observe(max(0.0, finished - started))
        for stage, ms in timings.items():
            self._km(n.STAGE_SECONDS, kind, stage).observe(ms / 1000.0)
        wait = self._km(n.SCHEDULE_WAIT, kind)
        for i in batch.items:
            wait.observe(max(0.0, started - i.delivery.received_at))

    def on_reply(self, kind: str, error: Optional[str]) -> None:
        self._km(n.REPLIES, kind, "ok" if error is None else "error").inc()
        if error is not None:
            self._km(n.ERRORS, kind, error).inc()

    def on_dead_letter(self, kind: str, code: str) -> None:
        self._km(n.DEAD_LETTERS, kind, code).inc()

    def on_committed(self, settlements: Sequence[Settlement], seconds: float) -> None:
        now = time.time()
        kinds = set()
        for o in settlements:
            d = o.delivery
            kinds.add(d.kind)
            self._km(n.WORKER_LATENCY, d.kind).observe(max(0.0, now - d.received_at))
            created = self._created.pop((d.stream, d.entry_id), None)
            if created is not None:
                self._km(n.REQUEST_LATENCY, d.kind).observe(max(0.0, now - created))
        for kind in kinds:
            self._km(n.STAGE_SECONDS, kind, "reply").observe(seconds)

    def on_tick(self, queued: int, in_flight: int, kinds: Sequence[str]) -> None:
        self.m[n.WORKER_QUEUED.name].set(queued)
        self.m[n.WORKER_IN_FLIGHT.name].set(in_flight)
        self._sample_gpu()

    def on_health(self, stalled_s: float, last_commit_at: float) -> None:
        self.m[n.WORKER_STALLED.name].set(stalled_s)
        self.m[n.WORKER_LAST_COMMIT.name].set(last_commit_at)

    def on_redis_error(self, op: str) -> None:
        self.m[n.WORKER_REDIS_ERRORS.name].labels(op).inc()

    def on_run_alone(self, kind: str) -> None:
        self._km(n.RUNS_ALONE, kind).inc()

    def _sample_gpu(self) -> None:
        torch = sys.modules.get("torch")  # only if the backend loaded it: never import torch here
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for i in range(torch.cuda.device_count()):
            dev = f"cuda:{i}"
            self.m[n.GPU_ALLOCATED.name].labels(dev).set(torch.cuda.memory_allocated(i))
            self.m[n.GPU_RESERVED.name].labels(dev).set(torch.cuda.memory_reserved(i))
            self.m[n.GPU_PEAK.name].labels(dev).set(torch.cuda.max_memory_allocated(i))
