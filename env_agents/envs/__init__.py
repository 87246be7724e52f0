"""Env adapters by id: one module per env family, imported only when asked for.

MiniWorld-*-v0   3-D navigation (every kind)        env_agents.envs.miniworld
textworld        locally generated TextWorld games  env_agents.envs.textworld
alfworld         ALFWorld, when its files exist     env_agents.envs.alfworld
crafter          Crafter, when installed            env_agents.envs.crafter
Frames-v0        synthetic frames, no simulator     env_agents.envs.frames
"""

from __future__ import annotations

from typing import Any

from env_agents.envs.base import EnvAdapter, Observation, StepResult

FAMILIES = {
    "miniworld": "MiniWorld-*-v0 (e.g. MiniWorld-OneRoom-v0)",
    "textworld": "textworld",
    "alfworld": "alfworld",
    "crafter": "crafter",
    "frames": "Frames-v0 (synthetic frames, for benchmarks)",
}


def make_adapter(env_id: str, seed: int = 0, size: int = 224, **options: Any) -> EnvAdapter:
    """The adapter for an env id; options are the adapter's keyword arguments."""
    low = env_id.lower()
    if env_id.startswith("MiniWorld-"):
        from env_agents.envs.miniworld import MiniWorldAdapter

        return MiniWorldAdapter(env_id, size=size, seed=seed, **options)
    if low == "textworld":
        from env_agents.envs.textworld import TextWorldAdapter

        return TextWorldAdapter(env_id, seed=seed, **options)
    if low == "alfworld":
        from env_agents.envs.alfworld import ALFWorldAdapter

        return ALFWorldAdapter(env_id, seed=seed, **options)
    if low == "crafter":
        from env_agents.envs.crafter import CrafterAdapter

        return CrafterAdapter(env_id, size=size, seed=seed, **options)
    if low == "frames-v0":
        from env_agents.envs.frames import FramesAdapter

        return FramesAdapter(env_id, size=size, seed=seed, **options)
    raise ValueError(f"unknown env {env_id!r}; known: {'; '.join(FAMILIES.values())}")


__all__ = ["FAMILIES", "EnvAdapter", "Observation", "StepResult", "make_adapter"]
