"""Record MiniWorld episodes driven by an expert, in the capture format.

The clock is simulated, as a capture tool on a fixed-rate screen grab would see it: frame
i is grabbed at i / fps (+ jitter), the expert then presses the key of its action a few
milliseconds later (keyup of the previous key first, keydown again every frame while held,
like key auto-repeat), and the env steps. Some frames are grabbed twice (same timestamp),
as real capture does. The last frame, after the episode ends, has no key held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from env_agents.recording.actions import MINIWORLD_KEYS
from env_agents.recording.format import EpisodeWriter


@dataclass
class RecordingOptions:
    fps: float = 10.0
    qpc_freq: int = 10_000_000
    offset_ms: float = 0.0
    duplicate_prob: float = 0.03
    jitter_ms: float = 2.0
    max_steps: Optional[int] = None  # None: the env's own limit
    key_repeat: bool = True


def record_episode(
    env,
    path: str,
    policy: Callable[[object], int],
    describe: Callable[[object], str],
    opts: RecordingOptions,
    rng: np.random.Generator,
    meta: Optional[Dict[str, object]] = None,
) -> Dict[str, object]:
    """One episode from env.reset() to its end, written to `path`; returns its summary."""
    obs, _ = env.reset()
    instruction = describe(env)
    writer = EpisodeWriter(
        path, fps=opts.fps, qpc_freq=opts.qpc_freq, offset_ms=opts.offset_ms, extra_meta=dict(meta or {})
    )
    tick = opts.qpc_freq / 1000.0  # ticks per ms
    t0 = int(rng.integers(10**9, 10**10))
    h, w = obs.shape[:2]
    writer.event("mousemove", t0 - int(5 * tick), x=w // 2, y=h // 2)
    limit = opts.max_steps or getattr(env.unwrapped, "max_episode_steps", 1000)
    held: Optional[int] = None
    success, steps, done = False, 0, False
    actions: List[int] = []
    period_ms = 1000.0 / opts.fps
    ts = t0
    for i in range(limit + 1):
        ts = t0 + int((i * period_ms + rng.uniform(-opts.jitter_ms, opts.jitter_ms)) * tick)
        writer.frame(obs, ts)
        if rng.random() < opts.duplicate_prob:
            writer.frame(obs, ts)
        if done or i == limit:
            break
        action = int(policy(env))
        key = MINIWORLD_KEYS[action]
        press_at = ts + int(rng.uniform(5.0, 0.4 * period_ms) * tick)
        if key != held:
            if held is not None:
                writer.event("keyup", press_at - int(tick), vk=held)
            writer.event("keydown", press_at, vk=key)
            held = key
        elif opts.key_repeat:
            writer.event("keydown", press_at, vk=key)
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action)
        steps += 1
        done = bool(terminated or truncated)
        success = success or bool(terminated and reward > 0)
    if held is not None:
        writer.event("keyup", ts + int(rng.uniform(1.0, 5.0) * tick), vk=held)
    summary = {"instruction": instruction, "success": success, "steps": steps}
    writer.close(**summary)
    return {**summary, "path": path, "actions": actions}


def record(
    env_id: str,
    out_dir: str,
    episodes: int,
    size: int = 384,
    seed: int = 0,
    opts: Optional[RecordingOptions] = None,
    epsilon: float = 0.0,
    progress: bool = False,
) -> List[Dict[str, object]]:
    """Record `episodes` expert episodes of a MiniWorld env under out_dir/episode_NNNNN."""
    from env_agents.envs.miniworld import instruction_for, make_miniworld
    from env_agents.recording.expert import ScriptedExpert

    opts = opts or RecordingOptions()
    env = make_miniworld(env_id, size=size, seed=seed)
    expert = ScriptedExpert(epsilon=epsilon, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    it = range(episodes)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"recording {env_id}", unit="ep")
    try:
        for n in it:
            path = os.path.join(out_dir, f"episode_{n:05d}")
            summary = record_episode(
                env,
                path,
                expert,
                instruction_for,
                opts,
                rng,
                meta={"env_id": env_id, "seed": seed, "episode": n, "recorder": "vlmq scripted expert"},
            )
            out.append(summary)
    finally:
        env.close()
    return out
