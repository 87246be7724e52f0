"""Progress of a run: every process counts its env steps and requests as they happen and
reports them twice a second, so the bar moves with the work (an episode of 500 steps at
30 Hz takes ~17 s; a bar of whole episodes would stand still that long)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Optional

from env_agents.control.tracer import Tracer
from env_agents.runner.spec import RunSpec

REPORT_EVERY_S = 0.5


class StepCounter(Tracer):
    """Counts one process's env steps and requests (a tracer every session shares)."""

    def __init__(self) -> None:
        self.steps = 0
        self.requests = 0
        self._sent = (0, 0)

    def request(self, session: str, t: int, obs: Any, req: Any) -> None:
        self.requests += 1

    def step(self, session: str, t: int, item: Any, env_action: Any, result: Any) -> None:
        self.steps += 1

    def delta(self) -> Optional[Dict[str, int]]:
        """What happened since the last call, or None when nothing did."""
        now = (self.steps, self.requests)
        if now == self._sent:
            return None
        out = {"steps": now[0] - self._sent[0], "requests": now[1] - self._sent[1]}
        self._sent = now
        return out

    async def report(self, emit: Callable[[str, Any], None], every_s: float = REPORT_EVERY_S) -> None:
        """Emit ("progress", delta) every `every_s` until cancelled; `flush` sends the rest."""
        while True:
            await asyncio.sleep(every_s)
            self.flush(emit)

    def flush(self, emit: Callable[[str, Any], None]) -> None:
        d = self.delta()
        if d is not None:
            emit("progress", d)


class ProgressBar:
    """The parent's bar: env steps of all sessions against n x episodes x max_steps (the
    total shrinks when an episode ends early), episodes, requests and starvation beside.
    Preference runs have no control loop and count episodes."""

    def __init__(self, spec: RunSpec, file=None) -> None:
        from tqdm import tqdm

        self.max_steps = spec.control.max_steps
        self.episodes_total = spec.n * spec.episodes
        self.by_steps = spec.task != "preference"
        self.episodes = self.requests = self.starved = 0
        if self.by_steps:
            total, unit, desc = self.episodes_total * self.max_steps, "step", "env steps"
        else:
            total, unit, desc = self.episodes_total, "ep", "episodes"
        self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, file=file, mininterval=0.5)

    @property
    def n(self) -> int:
        return int(self.bar.n)

    @property
    def total(self) -> int:
        return int(self.bar.total)

    def take(self, what: str, payload: Any) -> None:
        if what == "progress" and self.by_steps:
            self.requests += payload["requests"]
            self.bar.update(payload["steps"])
        elif what == "episode":
            self.episodes += 1
            self.starved += payload["starved"]
            if self.by_steps:
                # An episode that ended before max_steps leaves steps that will never come.
                self.bar.total -= max(0, self.max_steps - payload["steps"])
                self.bar.refresh()
            else:
                self.bar.update(1)
        else:
            return
        self.bar.set_postfix(
            episodes=f"{self.episodes}/{self.episodes_total}", requests=self.requests, starved=self.starved
        )

    def close(self) -> None:
        self.bar.close()


def progress_bar(spec: RunSpec, enabled: bool, file=None) -> Optional[ProgressBar]:
    if not enabled:
        return None
    try:
        return ProgressBar(spec, file)
    except ImportError:  # tqdm is optional (the `envs` extra brings it)
        return None
