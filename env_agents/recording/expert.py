"""A scripted MiniWorld expert: turn toward the goal entity, then walk to it.

It reads the simulator's state (agent pose, goal position), which a learned policy never
sees; its only job is to produce demonstrations that succeed.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from env_agents.envs.miniworld import MOVE_FORWARD, TURN_LEFT, TURN_RIGHT, goal_entity


def heading_error(env) -> Optional[float]:
    """Signed angle (radians) from the agent's heading to the goal; >0 means turn left."""
    ent = goal_entity(env)
    if ent is None:
        return None
    agent = env.unwrapped.agent
    d = np.asarray(ent.pos, np.float64) - np.asarray(agent.pos, np.float64)
    # MiniWorld's heading: dir_vec = (cos(dir), 0, -sin(dir)).
    target = math.atan2(-d[2], d[0])
    return (target - agent.dir + math.pi) % (2 * math.pi) - math.pi


class ScriptedExpert:
    """Outside the field of view (more than `view_deg` off-axis) turn left to search; in
    view, turn toward the goal while it is more than `tolerance_deg` off-axis, else move
    forward; with probability `epsilon` a random action instead (recoveries from states
    the expert would not visit). Searching in one fixed direction matters for imitation:
    the shorter way round to an unseen goal is not in the image, and a policy trained on
    it dithers left-right."""

    def __init__(
        self, tolerance_deg: float = 12.0, view_deg: float = 28.0, epsilon: float = 0.0, seed: int = 0
    ) -> None:
        self.tolerance = math.radians(tolerance_deg)
        self.view = math.radians(view_deg)
        self.epsilon = epsilon
        self.rng = np.random.default_rng(seed)

    def __call__(self, env) -> int:
        n = int(env.action_space.n)
        if self.epsilon and self.rng.random() < self.epsilon:
            return int(self.rng.integers(0, min(n, 3)))
        err = heading_error(env)
        if err is None:
            return MOVE_FORWARD
        if err > self.tolerance or err < -self.view:
            return TURN_LEFT
        if err < -self.tolerance:
            return TURN_RIGHT
        return MOVE_FORWARD
