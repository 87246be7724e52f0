"""Crafter (2-D open-world survival), headless, with its own four-tuple API.

A text_action agent sees the frame and picks one of Crafter's 17 action names. Crafter
has no goal, so an episode counts as a success when it unlocked an achievement; the
number unlocked is its progress score.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from env_agents.envs.base import EnvAdapter, Observation, StepResult
from env_agents.envs.prompts import choice_messages
from schemas.messages import Reply, Request, TextActionRequest

TASK = "Survive and unlock as many achievements as you can (collect wood, place a table, make tools, ...)."


class CrafterAdapter(EnvAdapter):
    kinds = ("text_action",)

    def __init__(
        self, env_id: str = "crafter", size: int = 224, seed: int = 0, length: int = 10000, **_: Any
    ) -> None:
        try:
            import crafter
            from crafter import constants
        except ImportError as exc:
            raise RuntimeError("Crafter is not installed: pip install crafter") from exc
        self.env_id = env_id
        self.env = crafter.Env(size=(int(size), int(size)), length=int(length), seed=seed)
        self.action_names: List[str] = [a.replace("_", " ") for a in constants.actions]
        self.unlocked = 0

    def _obs(self, frame, info: Optional[dict] = None) -> Observation:
        info = info or {}
        inv = info.get("inventory") or {}
        text = TASK
        if inv:
            text += " Inventory: " + ", ".join(f"{k} {v}" for k, v in sorted(inv.items()) if v)
        return Observation(
            frame=frame,
            text=text,
            commands=self.action_names,
            info={"achievements": self.unlocked},
            progress=float(self.unlocked),
        )

    def reset(self, seed: Optional[int] = None) -> Observation:
        if seed is not None:
            self.env._seed = seed  # Crafter reads its seed at reset; it has no reset(seed=)
        self.unlocked = 0
        return self._obs(self.env.reset())

    def step(self, action: Any) -> StepResult:
        frame, reward, done, info = self.env.step(int(action))
        self.unlocked = sum(1 for v in info.get("achievements", {}).values() if v > 0)
        dead = info.get("discount", 1.0) == 0.0
        return StepResult(self._obs(frame, info), float(reward), dead, done and not dead, self.unlocked > 0)

    def request(self, kind: str, obs: Observation, **kw: Any) -> Request:
        if kind != "text_action":
            raise ValueError(f"Crafter serves text_action only, not {kind!r}")
        return TextActionRequest(
            messages=choice_messages(obs, self.action_names), admissible_commands=self.action_names, **kw
        )

    def random_action(self, rng) -> int:
        return int(rng.integers(len(self.action_names)))

    def actions(self, kind: str, reply: Reply) -> Sequence[Any]:
        res = reply.result
        if res.choice_index is not None and 0 <= res.choice_index < len(self.action_names):
            return [res.choice_index]
        text = (res.choice or res.text or "").strip().lower()
        return [self.action_names.index(text) if text in self.action_names else 0]
