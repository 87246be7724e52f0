"""Frames-v0: a synthetic env for measuring control and serving, with no simulator.

Each step draws the next frame of a seeded moving-block scene and consumes one action of
any shape; episodes last `max_episode_steps` steps and never succeed. It exists so that the
queue-threshold control loop can be measured against a real model worker where no
simulator can run (a GPU machine without OpenGL): the frames are real images the model
encodes, only the task is absent.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from env_agents.envs.base import EnvAdapter, Observation, StepResult
from schemas.messages import ActionChunkRequest, Reply, Request


class FramesAdapter(EnvAdapter):
    kinds = ("action_chunk",)

    def __init__(
        self, env_id: str = "Frames-v0", size: int = 224, seed: int = 0, max_episode_steps: int = 300
    ) -> None:
        self.env_id = env_id
        self.size = size
        self.max_episode_steps = max_episode_steps
        self.rng = np.random.default_rng(seed)
        self.t = 0
        self.instruction = "follow the block"

    def _frame(self) -> np.ndarray:
        img = np.full((self.size, self.size, 3), 40, np.uint8)
        side = max(1, self.size // 6)
        x = (self.t * 3 + self.offset) % (self.size - side)
        img[self.size // 3 : self.size // 3 + side, x : x + side] = self.color
        return img

    def reset(self, seed: Optional[int] = None) -> Observation:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t = 0
        self.offset = int(self.rng.integers(0, self.size))
        self.color = self.rng.integers(80, 255, 3, dtype=np.uint8)
        return Observation(frame=self._frame(), text=self.instruction)

    def step(self, action: Any) -> StepResult:
        self.t += 1
        truncated = self.t >= self.max_episode_steps
        return StepResult(Observation(frame=self._frame(), text=self.instruction), 0.0, False, truncated)

    def request(self, kind: str, obs: Observation, **kw: Any) -> Request:
        return ActionChunkRequest(image=obs.frame, instruction=self.instruction, **kw)

    def actions(self, kind: str, reply: Reply) -> Sequence[Any]:
        return list(np.asarray(reply.result.chunk, np.float32))
