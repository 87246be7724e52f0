"""What a run is: everything a runner process needs, picklable (processes are spawned)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol

from broker.settings import BrokerSettings
from env_agents.control.controller import ControlConfig
from env_agents.control.tracer import Tracer


@dataclass(frozen=True)
class PreferenceConfig:
    pairs: int = 16  # frame pairs labelled per episode
    concurrency: int = 8  # label requests in flight per session
    mode: str = "two_step"  # two_step | one_pass (PreferenceRequest.mode)
    min_gap: float = 0.0  # skip pairs whose ground-truth scores differ by less


class MetricsExport(Protocol):
    """Agent metrics from a package above this one (ops.metrics, which this package never
    imports). It travels to every runner process with the spec, so it is picklable."""

    def start(self) -> Any:
        """In the launching process, before any runner process starts: serve the endpoint.
        Returns an object whose `close()` stops serving it."""

    def tracer(self, spec: RunSpec) -> Tracer:
        """The metrics of one runner process, fed by the controller's hooks."""


@dataclass(frozen=True)
class RunSpec:
    env_id: str
    control: ControlConfig
    broker: BrokerSettings
    n: int = 1  # sessions
    procs: int = 1
    episodes: int = 1  # per session
    seed: int = 0
    size: int = 224  # observation side (square) for image envs
    env_options: Dict[str, Any] = field(default_factory=dict)
    session_prefix: str = "agent"
    traces: Optional[str] = None  # SQLite path
    metrics: Optional[MetricsExport] = None  # vlmq agents --metrics-port
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    @property
    def task(self) -> str:
        return self.control.kind

    def session_id(self, index: int) -> str:
        return f"{self.session_prefix}-{index}"

    def episode_seed(self, index: int, episode: int) -> int:
        return self.seed + 1000 * index + episode

    def sessions_of(self, proc: int) -> List[int]:
        return list(range(proc, self.n, self.procs))
