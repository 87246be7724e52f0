"""Online evaluation in MiniWorld: success rate of the VLA policy and of a random policy.

The VLA acts through the same `ActionChunkHandler` the worker serves with (cache,
batching, sampling), in-process. It asks for a chunk every `replan_every` env steps and
executes that many rows of it (row -> MiniWorld action: env_agents.recording.actions).
With replan_every = frame_skip (2) every request finds frames t-2 and t-4 in the cache.
The random policy draws uniformly from the env's actions. Both run the same episodes
(same env seed), so their success rates compare directly.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from env_agents.recording.actions import vector_to_action


def _episodes(
    env_id: str,
    episodes: int,
    seed: int,
    size: int,
    act: Callable[[Any, np.ndarray, int, str, bool], List[int]],
    max_steps: Optional[int],
    progress: bool,
    desc: str,
) -> Dict[str, Any]:
    from env_agents.envs.miniworld import instruction_for, make_miniworld

    env = make_miniworld(env_id, size=size, seed=seed)
    limit = max_steps or getattr(env.unwrapped, "max_episode_steps", 1000)
    wins, lengths = 0, []
    it = range(episodes)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc, unit="ep")
    try:
        for _ in it:
            obs, _ = env.reset()
            text = instruction_for(env)
            step, done, success, queue = 0, False, False, []
            while not done and step < limit:
                if not queue:
                    queue = list(act(env, obs, step, text, step == 0))
                obs, reward, terminated, truncated, _ = env.step(int(queue.pop(0)))
                step += 1
                done = bool(terminated or truncated)
                success = success or bool(terminated and reward > 0)
            wins += int(success)
            lengths.append(step)
    finally:
        env.close()
    return {
        "success_rate": wins / max(episodes, 1),
        "episodes": episodes,
        "mean_steps": float(np.mean(lengths)),
    }


def random_policy_rate(
    env_id: str,
    episodes: int,
    seed: int = 1000,
    size: int = 64,
    max_steps: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)

    def act(env, obs, step, text, reset):
        return [int(rng.integers(0, env.action_space.n))]

    return _episodes(env_id, episodes, seed, size, act, max_steps, progress, "random policy")


def vla_policy_rate(
    handler,
    env_id: str,
    episodes: int,
    seed: int = 1000,
    size: int = 384,
    replan_every: int = 2,
    max_steps: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    from schemas.messages import ActionChunkRequest

    timings: List[float] = []
    counter = {"n": 0}

    def act(env, obs, step, text, reset):
        counter["n"] += 1
        req = ActionChunkRequest(
            session_id="eval", step=step, image=obs, instruction=text, reset=reset, noise_seed=counter["n"]
        )
        t0 = time.perf_counter()
        out = handler.run([req])
        timings.append((time.perf_counter() - t0) * 1000.0)
        res = out.results[0]
        if isinstance(res, Exception):
            raise res
        n = int(env.action_space.n)
        return [vector_to_action(row, n) for row in res.chunk[: max(1, replan_every)]]

    out = _episodes(env_id, episodes, seed, size, act, max_steps, progress, "VLA policy")
    out["chunk_ms_p50"] = float(np.median(timings)) if timings else 0.0
    out["chunks"] = len(timings)
    return out
