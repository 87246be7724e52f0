"""Roll out an env, pick frame pairs whose ground-truth progress differs, ask for labels.

Labels follow RL-VLM-F: 0 = the first image (image_a) makes more progress, 1 = the
second, -1 = no preference. A label is correct when it names the frame with the higher
ground-truth score (MiniWorld: minus the distance to the goal).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from env_agents.control.stats import EpisodeStats

# RL-VLM-F's vlm_query_log.csv columns first, then what this runner adds.
RL_VLM_F_COLUMNS = [
    "ground_truth_score_1",
    "ground_truth_score_2",
    "vlm_predicted_label",
    "timestamp",
    "train_iter",
]
COLUMNS = [
    *RL_VLM_F_COLUMNS,
    "session",
    "episode",
    "step_1",
    "step_2",
    "request_id",
    "latency_ms",
    "ok",
    "vlm_text",
]


def pick_pairs(
    scores: List[float], k: int, rng: np.random.Generator, min_gap: float = 0.0
) -> List[Tuple[int, int]]:
    """Up to k distinct index pairs (i, j), i != j, whose scores differ by more than min_gap
    (and are never tied), in random order of presentation."""
    n = len(scores)
    cand = [
        (i, j) for i in range(n) for j in range(i + 1, n) if abs(scores[i] - scores[j]) > max(min_gap, 1e-9)
    ]
    if not cand:
        return []
    picked = rng.choice(len(cand), size=min(k, len(cand)), replace=False)
    out = []
    for c in picked:
        i, j = cand[int(c)]
        out.append((i, j) if rng.random() < 0.5 else (j, i))
    return out


def label_correct(score_1: float, score_2: float, label: int) -> str:
    if label == -1:
        return "no_preference"
    better = 0 if score_1 > score_2 else 1
    return "correct" if label == better else "incorrect"


async def label_episode(
    spec, adapter, client, session: str, episode: int, seed: int
) -> Tuple[List[Dict[str, Any]], EpisodeStats]:
    cfg, pref = spec.control, spec.preference
    stats = EpisodeStats(session, episode, seed, env_id=adapter.env_id, kind="preference", mode="rollout")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    obs = adapter.reset(seed)
    if obs.progress is None or obs.frame is None:
        raise ValueError(f"{adapter.env_id} has no ground-truth progress score for preference labelling")
    frames, scores = [obs.frame], [float(obs.progress)]
    for _ in range(cfg.max_steps):
        res = adapter.step(adapter.random_action(rng))
        stats.steps += 1
        stats.reward += res.reward
        frames.append(res.obs.frame)
        scores.append(float(res.obs.progress))
        if res.done:
            stats.success, stats.terminated, stats.truncated = res.success, res.terminated, res.truncated
            break
        if stats.steps % 32 == 0:
            await asyncio.sleep(0)  # let the other sessions of this process run
    pairs = pick_pairs(scores, pref.pairs, rng, pref.min_gap)
    gate = asyncio.Semaphore(max(1, pref.concurrency))

    async def one(i: int, j: int) -> Dict[str, Any]:
        req = adapter.preference_request(
            frames[i],
            frames[j],
            step=i,
            mode=pref.mode,
            deadline=time.time() + cfg.request_timeout_s,
            **cfg.request_fields,
        )
        async with gate:
            t0 = time.perf_counter()
            stats.requests += 1
            try:
                reply = await client.request(req, timeout=cfg.request_timeout_s)
            except Exception as exc:
                stats.errors += 1
                return _row(
                    scores[i], scores[j], -1, episode, session, i, j, req.request_id, 0.0, False, repr(exc)
                )
            ms = (time.perf_counter() - t0) * 1000.0
        stats.replies += 1
        stats.latencies_ms.append(ms)
        if not reply.ok:
            stats.errors += 1
            msg = reply.error.message if reply.error else "error"
            return _row(scores[i], scores[j], -1, episode, session, i, j, req.request_id, ms, False, msg)
        res = reply.result
        text = " | ".join(res.texts)[:300]
        return _row(
            scores[i], scores[j], int(res.label), episode, session, i, j, req.request_id, ms, True, text
        )

    rows = list(await asyncio.gather(*(one(i, j) for i, j in pairs)))
    stats.wall_s = time.perf_counter() - started
    return rows, stats


def _row(s1, s2, label, episode, session, i, j, rid, ms, ok, text) -> Dict[str, Any]:
    return {
        "ground_truth_score_1": round(s1, 6),
        "ground_truth_score_2": round(s2, 6),
        "vlm_predicted_label": label,
        "timestamp": round(time.time(), 3),
        "train_iter": episode,
        "session": session,
        "episode": episode,
        "step_1": i,
        "step_2": j,
        "request_id": rid,
        "latency_ms": round(ms, 3),
        "ok": int(ok),
        "vlm_text": text,
    }
