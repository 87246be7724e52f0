"""The adapter interface: one per env family, the only env-specific code an agent runs.

An adapter owns its env and speaks Gymnasium's five-tuple whatever the env's own API
(TextWorld's gym wrapper and Crafter return four-tuples), turns an observation into a
request of a task kind, and a reply into queue items (a chunk gives many, a text answer
one), which `to_env_action` turns into what `env.step` takes when their turn comes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from schemas.messages import Reply, Request


@dataclass
class Observation:
    frame: Optional[np.ndarray] = None  # uint8 (H, W, 3), None for text-only envs
    text: str = ""  # what a text agent reads (the game's feedback, or the task)
    commands: Optional[List[str]] = None  # admissible commands, where the env lists them
    info: Dict[str, Any] = field(default_factory=dict)
    progress: Optional[float] = None  # ground-truth progress score (higher is better)


@dataclass
class StepResult:
    obs: Observation
    reward: float
    terminated: bool
    truncated: bool
    success: bool = False

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class EnvAdapter:
    kinds: Tuple[str, ...] = ()
    env_id: str = ""

    def reset(self, seed: Optional[int] = None) -> Observation:
        raise NotImplementedError

    def step(self, action: Any) -> StepResult:
        raise NotImplementedError

    def request(self, kind: str, obs: Observation, **kw: Any) -> Request:
        """The request for `kind` given this observation; kw are header/sampling fields."""
        raise NotImplementedError

    def actions(self, kind: str, reply: Reply) -> Sequence[Any]:
        """Queue items from an ok reply, in execution order."""
        raise NotImplementedError

    def to_env_action(self, item: Any) -> Any:
        return item

    def share(self, index: int, count: int) -> None:
        """This adapter serves session `index` of `count` built with the same options;
        adapters over a fixed set of games take their share of it (others have nothing to
        share)."""

    def random_action(self, rng: np.random.Generator) -> Any:
        """An env action drawn uniformly (rollouts for preference labelling)."""
        raise NotImplementedError(f"{self.env_id} has no random policy")

    def preference_request(self, frame_a: np.ndarray, frame_b: np.ndarray, **kw: Any) -> Request:
        raise NotImplementedError(f"{self.env_id} does not support preference labelling")

    def close(self) -> None:
        pass
