"""Hooks the controller calls as an episode runs; traces (SQLite) implement them."""

from __future__ import annotations

from typing import Any

from env_agents.envs.base import Observation, StepResult
from schemas.messages import Reply, Request


class Tracer:
    def episode_start(self, session: str, episode: int, seed: int, obs: Observation) -> None:
        pass

    def request(self, session: str, t: int, obs: Observation, req: Request) -> None:
        pass

    def reply(self, session: str, t: int, req: Request, reply: Reply, rtt_ms: float) -> None:
        pass

    def step(self, session: str, t: int, item: Any, env_action: Any, result: StepResult) -> None:
        pass

    def episode_end(self, stats: Any) -> None:
        pass
