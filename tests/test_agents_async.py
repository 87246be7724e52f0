"""Queue-threshold control against a real worker (synthetic handler of known latency) on
a real Redis: no starvation when the latency fits the threshold budget, starvation
counted when it does not, and the similarity filter never leaves the queue empty."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from env_agents.client import AsyncAgentClient
from env_agents.control.controller import ControlConfig, Controller
from env_agents.envs.base import EnvAdapter, Observation, StepResult
from schemas.actions import ACTION_DIM
from schemas.messages import ActionChunkRequest
from tests.helpers import WorkerThread, synthetic_settings


class StillCamera(EnvAdapter):
    """An env whose view never changes (a robot standing still): every frame is a
    near-duplicate, the case where LeRobot's server-side filter starves the robot."""

    kinds = ("action_chunk",)
    env_id = "still-camera"

    def __init__(self) -> None:
        self.frame = np.full((32, 32, 3), 90, np.uint8)

    def reset(self, seed=None) -> Observation:
        return Observation(frame=self.frame.copy(), text="stand still")

    def step(self, action) -> StepResult:
        return StepResult(Observation(frame=self.frame.copy()), 0.0, False, False)

    def request(self, kind, obs, **kw):
        return ActionChunkRequest(image=obs.frame, instruction=obs.text, **kw)

    def actions(self, kind, reply):
        return list(np.asarray(reply.result.chunk, np.float32))


def run_controller(settings, config: ControlConfig, latency_ms: float, chunk: int, adapter=None):
    wsettings = synthetic_settings(
        settings,
        synthetic_latency_ms=latency_ms,
        synthetic_chunk=(chunk, ACTION_DIM),
        kinds=("action_chunk",),
    )

    async def main():
        async with AsyncAgentClient("agent-0", settings=settings, raise_on_error=False) as client:
            ctl = Controller("agent-0", adapter or StillCamera(), client, config)
            return await ctl.run_episode(0, seed=0)

    with WorkerThread(wsettings):
        return asyncio.run(main())


def test_no_starvation_when_latency_fits_the_threshold_budget(settings):
    # g x chunk = 25 actions = 833 ms at 30 Hz of budget for a 30 ms model.
    cfg = ControlConfig(kind="action_chunk", rate_hz=30, threshold=0.5, max_steps=120)
    stats = run_controller(settings, cfg, latency_ms=30, chunk=50)
    assert stats.steps == 120 and stats.errors == 0
    assert stats.requests >= 4  # refilled while acting: 120 steps / 25 per refill
    assert stats.starved == 0, stats
    assert stats.merged_rows > 0  # chunks overlapped the queue and were merged


def test_starvation_is_counted_when_latency_exceeds_the_budget(settings):
    # g x chunk = 2 actions = 67 ms of budget for a 300 ms model: the queue runs dry.
    cfg = ControlConfig(kind="action_chunk", rate_hz=30, threshold=0.2, max_steps=40)
    stats = run_controller(settings, cfg, latency_ms=300, chunk=10)
    assert stats.steps == 40 and stats.errors == 0
    assert stats.starved > 0 and stats.starvation_fraction > 0
    assert stats.idle_starved == 0  # a request was always in flight while starving


def test_sync_mode_stands_still_for_every_round_trip(settings):
    cfg = ControlConfig(kind="action_chunk", mode="sync", rate_hz=30, max_steps=60)
    stats = run_controller(settings, cfg, latency_ms=30, chunk=20)
    assert stats.steps == 60 and stats.errors == 0
    assert stats.requests == 3  # one per emptied queue, none ahead of time
    assert stats.merged_rows == 0
    assert stats.starved >= stats.requests - 1  # each refill after the first costs ticks


def test_similarity_filter_skips_duplicates_but_never_leaves_the_queue_empty(settings):
    # g = 0.9: the controller wants a chunk whenever <= 45 actions are queued; every frame
    # is a duplicate, so the filter holds them back until the must-go level.
    cfg = ControlConfig(kind="action_chunk", rate_hz=30, threshold=0.9, similarity=0.5, max_steps=150)
    stats = run_controller(settings, cfg, latency_ms=20, chunk=50)
    assert stats.steps == 150 and stats.errors == 0
    assert stats.skipped > 0
    assert stats.requests >= 3  # 150 steps of 50-action chunks: it kept asking
    assert stats.idle_starved == 0  # never: empty queue and nothing asked for


@pytest.mark.parametrize("merge", ["replace", "weighted_average"])
def test_async_chunks_reach_a_real_env(settings, merge):
    from env_agents.envs.miniworld import MiniWorldAdapter

    cfg = ControlConfig(kind="action_chunk", rate_hz=60, threshold=0.5, merge=merge, max_steps=30)
    adapter = MiniWorldAdapter("MiniWorld-OneRoom-v0", size=32, seed=0)
    try:
        stats = run_controller(settings, cfg, latency_ms=10, chunk=20, adapter=adapter)
    finally:
        adapter.close()
    assert stats.steps == 30 and stats.errors == 0 and stats.requests >= 2


def test_adaptive_threshold_against_a_real_worker(settings):
    # 150 ms per chunk at 30 Hz runs 4.5 actions: g = 0.1 of a 30-action chunk leaves 3 and
    # starves; the adaptive g measures the round trip and asks early enough.
    fixed = run_controller(
        settings, ControlConfig(kind="action_chunk", rate_hz=30, threshold=0.1, max_steps=90), 150, 30
    )
    cfg = ControlConfig(kind="action_chunk", rate_hz=30, adaptive=True, g_margin=2.0, max_steps=90)
    adaptive = run_controller(settings, cfg, latency_ms=150, chunk=30)
    assert fixed.steps == adaptive.steps == 90 and fixed.errors == adaptive.errors == 0
    assert fixed.starved > 0
    assert adaptive.starved == 0, adaptive
    # ceil(2 x ~0.15 s x 30 Hz) + 1 ~ 10-11 actions of 30, well above the fixed 0.1
    assert 0.25 < adaptive.mean_g < 0.9
    assert adaptive.requests > fixed.requests  # asking earlier costs requests
