"""Hooks the controller calls as an episode runs; traces (SQLite) and agent metrics implement them."""

from __future__ import annotations

from typing import Any, List

from env_agents.envs.base import Observation, StepResult
from schemas.messages import Reply, Request


class Tracer:
    def session_start(self, session: str) -> None:
        pass

    def session_end(self, session: str) -> None:
        pass

    def episode_start(self, session: str, episode: int, seed: int, obs: Observation) -> None:
        pass

    def request(self, session: str, t: int, obs: Observation, req: Request) -> None:
        pass

    def reply(self, session: str, t: int, req: Request, reply: Reply, rtt_ms: float) -> None:
        pass

    def failed(self, session: str, t: int, req: Request, code: str) -> None:
        """A request that got no usable reply: "timeout", or why the reply could not be read."""

    def step(self, session: str, t: int, item: Any, env_action: Any, result: StepResult) -> None:
        pass

    def episode_end(self, stats: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Tracers(Tracer):
    """Several tracers behind one: each hook goes to all of them, in order."""

    def __init__(self, tracers: List[Tracer]) -> None:
        self.tracers = tracers

    def session_start(self, session: str) -> None:
        for t in self.tracers:
            t.session_start(session)

    def session_end(self, session: str) -> None:
        for t in self.tracers:
            t.session_end(session)

    def episode_start(self, session: str, episode: int, seed: int, obs: Observation) -> None:
        for t in self.tracers:
            t.episode_start(session, episode, seed, obs)

    def request(self, session: str, t: int, obs: Observation, req: Request) -> None:
        for tr in self.tracers:
            tr.request(session, t, obs, req)

    def reply(self, session: str, t: int, req: Request, reply: Reply, rtt_ms: float) -> None:
        for tr in self.tracers:
            tr.reply(session, t, req, reply, rtt_ms)

    def failed(self, session: str, t: int, req: Request, code: str) -> None:
        for tr in self.tracers:
            tr.failed(session, t, req, code)

    def step(self, session: str, t: int, item: Any, env_action: Any, result: StepResult) -> None:
        for tr in self.tracers:
            tr.step(session, t, item, env_action, result)

    def episode_end(self, stats: Any) -> None:
        for t in self.tracers:
            t.episode_end(stats)
