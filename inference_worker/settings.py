"""Worker settings: one object; `vlmq worker --help` lists the flag and env var of each.

`--option KEY=VALUE` pairs are backend-specific: each key belongs to one option group
(OPTION_GROUPS: the engine's, the self-check's and vLLM's in engines/options.py, the
handlers' below), a typed settings class of schemas/settings.py whose keys are also read
from VLMQ_<KEY> (the engine's from VLMQ_ENGINE_<KEY>). A key of no group, or a value a
group refuses, stops the worker at start (`check_options`)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple, Type, TypeVar

from broker.settings import BrokerSettings
from inference_worker.engines.options import EngineOptions, SelfCheckOptions, VLLMOptions
from schemas import settings as tree
from schemas.limits import Limits
from schemas.messages import KINDS

T = TypeVar("T")


@dataclass(frozen=True)
class VLAOptions:
    """The action_chunk handler's (handlers/action_chunk.py)."""

    vla: Optional[str] = None  # the VLA folder; serving action_chunk needs it
    # features: cache VLM features per session; frames: cache decoded frames and re-encode
    # all of a request's frames (the no-cache baseline)
    vla_cache: str = tree.setting("features", choices=("features", "frames"))
    vla_sessions: int = 1024  # sessions kept in the feature cache, least recently used evicted
    vla_ttl_s: float = 600.0  # a session idle this long is dropped from the cache
    vla_steps: int = 0  # Euler steps; 0 = the VLA's config
    # on CUDA, replay the expert's Euler steps and the VLM feature pass as CUDA graphs
    vla_cuda_graphs: bool = True


@dataclass(frozen=True)
class FaultOptions:
    """Faults the synthetic backend injects on demand (handlers/synthetic.py)."""

    fault_kill_on: Optional[str] = None
    fault_device_assert_on: Optional[str] = None
    fault_oom_over: int = 0


# Every --option key belongs to one of these, named by the component that reads it.
OPTION_GROUPS: Dict[str, type] = {
    "engine": EngineOptions,
    "VLA": VLAOptions,
    "self-check": SelfCheckOptions,
    "vLLM": VLLMOptions,
    "synthetic backend": FaultOptions,
}


def option_keys() -> Dict[str, str]:
    """Every --option key, to the component that reads it."""
    return {key: owner for owner, cls in OPTION_GROUPS.items() for key in tree.keys(cls)}


def options_of(group: Type[T], options: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> T:
    """One option group from --option pairs (the others' keys are left alone) and its variables."""
    return tree.load(group, environ, pairs=options, strict=False)


def check_options(options: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> None:
    """Refuse, before anything loads, a key no component reads (with the known keys) and a
    value its group refuses (a typo would otherwise be ignored, or fail after the model loaded)."""
    tree.check_keys(options, option_keys())
    for group in OPTION_GROUPS.values():
        options_of(group, options, environ)


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
    gil_switch_ms: float = 0.0  # sys.setswitchinterval for the worker's process; 0 = Python's
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
    options: Dict[str, str] = field(default_factory=dict)  # --option pairs, read through OPTION_GROUPS
    strict: bool = False  # refuse to start if the engine's self-check fails (no stock fallback)
    # a torch profiler trace of `profile_steps` model steps after `profile_skip` (profiling.py)
    profile_dir: Optional[str] = None
    profile_steps: int = 100
    profile_skip: int = 200  # at least 1

    def batch_limit(self, kind: str) -> int:
        return self.max_batch_by_kind.get(kind, self.max_batch)

    @property
    def read_ahead(self) -> int:
        return self.prefetch or 2 * max([self.max_batch, *self.max_batch_by_kind.values()])

    def option_group(self, group: Type[T]) -> T:
        """The typed options of one group (VLAOptions, ...) from --option and the environment."""
        return options_of(group, self.options)
