"""Worker settings: one object; `vlmq worker --help` lists the flag and env var of each."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from broker.settings import BrokerSettings
from schemas.limits import Limits
from schemas.messages import KINDS


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    limits: Limits = field(default_factory=Limits)
    name: str = field(default_factory=default_worker_name)
    kinds: Tuple[str, ...] = KINDS
    model_name: Optional[str] = None  # also serve the model-specific streams of this name
    tenants: Tuple[str, ...] = ()  # also serve these tenants' streams (broker/keys.py)
    max_batch: int = 32
    max_batch_by_kind: Dict[str, int] = field(default_factory=dict)
    max_wait_ms: float = 2.0  # after the first request of a batch arrives
    regroup_ms: float = 50.0  # batch kinds: wait for quick-returning sessions of the last batch (regroup.py)
    serving: str = "continuous"  # chat kinds: continuous (step-level) or batch (batch at a time)
    control_kinds: Tuple[str, ...] = ("action_chunk",)  # latency class: run before any chat step
    prefill_min: int = 32  # chat requests that start decoding together, unless max_wait_ms passed
    prefetch: int = 0  # requests read ahead of the model; 0 = 2 x max_batch
    block_ms: int = 500  # XREADGROUP block; bounds how long shutdown waits for the reader
    heartbeat_s: float = 2.0
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off (ops/metrics)
    metrics_addr: str = "0.0.0.0"
    reclaim_interval_s: float = 2.0  # at most; a quarter of claim_min_idle_ms when that is shorter
    # Writing replies: transient Redis errors are retried this long, then the worker exits
    # non-zero (what it held is reclaimed by another worker).
    commit_retry_s: float = 120.0
    # backend and model
    backend: str = "hf"  # hf | vllm | synthetic
    model_path: Optional[str] = None
    device: str = "cpu"
    dtype: str = "auto"
    quantize: Optional[str] = None  # nf4
    synthetic_latency_ms: float = 0.0
    synthetic_chunk: Tuple[int, int] = (50, 7)
    options: Dict[str, str] = field(default_factory=dict)  # backend-specific key=value pairs
    strict: bool = False  # refuse to start if the engine's self-check fails (no stock fallback)

    def batch_limit(self, kind: str) -> int:
        return self.max_batch_by_kind.get(kind, self.max_batch)

    @property
    def read_ahead(self) -> int:
        return self.prefetch or 2 * max([self.max_batch, *self.max_batch_by_kind.values()])
