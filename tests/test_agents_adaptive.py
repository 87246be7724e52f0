"""The adaptive threshold: g from the p90 of recent round trips, clamped, with a margin.

The controller runs on an event loop whose clock is virtual (it jumps to the next timer
whenever nothing is ready), against a client whose replies come back after a latency the
test chooses: minutes of 30 Hz control in milliseconds, exactly reproducible, no Redis.
One test runs the same comparison against a real synthetic worker on a real Redis."""

from __future__ import annotations

import asyncio
from typing import Callable, List, Optional

import numpy as np
import pytest

from env_agents.control.controller import ControlConfig, Controller
from env_agents.control.stats import fixed_g_requests_per_step
from env_agents.control.threshold import AdaptiveThreshold, FixedThreshold, LatencyWindow
from env_agents.control.tracer import Tracer
from env_agents.envs.frames import FramesAdapter
from schemas.actions import ACTION_DIM
from schemas.messages import ActionChunkResult, Reply


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose time() is virtual: when no callback is ready it jumps to the
    earliest live timer instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        if not self._ready:
            live = [h.when() for h in self._scheduled if not h.cancelled()]
            if live and min(live) > self._now:
                self._now = min(live)
        super()._run_once()


def run_virtual(coro):
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class FakeClient:
    """Replies with a zero chunk `latency(i)` seconds after request i (None: never)."""

    def __init__(self, latency: Callable[[int], Optional[float]], chunk: int = 50) -> None:
        self.latency = latency
        self.chunk = chunk
        self.sent: List[object] = []
        self.futures: List[asyncio.Future] = []

    async def submit(self, req) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        delay = self.latency(len(self.sent))
        self.sent.append(req)
        self.futures.append(fut)
        if delay is not None:
            loop.call_later(delay, self._reply, fut, req)
        return fut

    def _reply(self, fut: asyncio.Future, req) -> None:
        if fut.done():
            return
        result = ActionChunkResult(chunk=np.zeros((self.chunk, ACTION_DIM), np.float32))
        fut.set_result(
            Reply(request_id=req.request_id, session_id="s", kind="action_chunk", ok=True, result=result)
        )


class Spy(Tracer):
    def __init__(self) -> None:
        self.failures: List[str] = []

    def failed(self, session, t, req, code) -> None:
        self.failures.append(code)


def control(latency, episodes=1, max_steps=600, tracer=None, **cfg):
    config = ControlConfig(kind="action_chunk", rate_hz=30.0, max_steps=max_steps, **cfg)
    client = FakeClient(latency)

    async def main():
        ctl = Controller("s", FramesAdapter(size=8, max_episode_steps=10_000), client, config, tracer)
        return [await ctl.run_episode(e, seed=e) for e in range(episodes)], ctl

    stats, ctl = run_virtual(main())
    return stats, ctl, client


def test_latency_window_is_a_nearest_rank_quantile_of_the_last_samples():
    w = LatencyWindow(size=10)
    assert w.quantile() is None
    for x in range(1, 21):  # only 11..20 stay
        w.add(x / 100)
    assert len(w) == 10
    assert w.quantile(0.9) == pytest.approx(0.19)  # 9th of 10, an observed value
    assert w.quantile(0.5) == pytest.approx(0.15)
    assert w.quantile(1.0) == pytest.approx(0.20)


def test_adaptive_g_follows_the_p90_within_its_clamp():
    th = AdaptiveThreshold(rate_hz=30, g_min=0.1, g_max=0.9, margin=1.5, window=10)
    assert th.g(50) == 0.9  # nothing measured: as early as allowed
    for _ in range(10):
        th.observe(0.5)
    # ceil(1.5 x 0.5 s x 30 Hz) + 1 = 24 actions ahead of 50
    assert th.actions_ahead() == 24 and th.g(50) == pytest.approx(0.48)
    for _ in range(10):
        th.observe(0.01)  # fast worker: ceil(0.45) + 1 = 2 actions, below g_min x 50
    assert th.g(50) == pytest.approx(0.1)
    for _ in range(10):
        th.observe(5.0)  # slower than any chunk can cover: g_max bounds the requests
    assert th.g(50) == pytest.approx(0.9)
    # one slow reply in ten does not move the p90; two do
    for x in [0.1] * 9 + [2.0]:
        th.observe(x)
    assert th.g(50) == pytest.approx(6 / 50)  # ceil(1.5 x 0.1 s x 30 Hz) + 1
    th.observe(2.0)
    assert th.g(50) == pytest.approx(0.9)


def test_threshold_settings_are_checked_before_a_run():
    with pytest.raises(ValueError, match="control rate"):
        ControlConfig(adaptive=True, rate_hz=0.0)
    with pytest.raises(ValueError, match="g_min"):
        ControlConfig(adaptive=True, g_min=0.6, g_max=0.5)
    with pytest.raises(ValueError, match="margin"):
        ControlConfig(adaptive=True, g_margin=0.5)
    assert isinstance(ControlConfig(adaptive=True, mode="sync").make_threshold(), FixedThreshold)
    assert ControlConfig(adaptive=True, mode="sync").make_threshold().g(50) == 0.0
    assert ControlConfig(adaptive=True).threshold_label.startswith("adaptive [0.1, 0.75]")


def test_adaptive_threshold_keeps_the_queue_from_running_dry_where_a_low_fixed_g_starves():
    # 0.5 s per chunk at 30 Hz is 15 actions; g = 0.2 of a 50-action chunk leaves 10.
    fixed, _, _ = control(lambda i: 0.5, threshold=0.2)
    adaptive, ctl, _ = control(lambda i: 0.5, adaptive=True)
    fixed, adaptive = fixed[0], adaptive[0]
    assert fixed.steps == adaptive.steps == 600
    assert fixed.starved > 50 and fixed.starvation_fraction > 0.1, fixed
    assert adaptive.starved == 0, adaptive
    assert ctl.threshold.g(50) == pytest.approx(0.48)  # ceil(1.5 x 15) + 1 = 24 actions
    # It asks earlier, so more often: once per (1 - 0.48) x 50 = 26 actions (+ the first).
    assert adaptive.requests == pytest.approx(600 / 26 + 1, abs=2)
    assert adaptive.requests / adaptive.steps == pytest.approx(fixed_g_requests_per_step(0.48, 50), rel=0.1)
    assert adaptive.timeouts == adaptive.errors == 0


def test_adaptive_threshold_asks_less_often_than_fixed_g_when_replies_are_fast():
    fixed, _, _ = control(lambda i: 0.05, threshold=0.5)
    adaptive, ctl, _ = control(lambda i: 0.05, adaptive=True)
    fixed, adaptive = fixed[0], adaptive[0]
    assert fixed.starved == adaptive.starved == 0
    assert ctl.threshold.g(50) == pytest.approx(0.1)  # g_min: ceil(2.25) + 1 = 4 < 5 actions
    assert adaptive.requests < 0.6 * fixed.requests  # every 45 actions instead of every 25
    assert adaptive.mean_g < 0.2 and fixed.mean_g == pytest.approx(0.5)  # (the first request: g_max)


def test_adaptive_threshold_recovers_after_the_latency_jumps():
    # Fast replies during episode 0, then six times slower for good: episode 1 may starve
    # while the window still holds fast round trips, episode 2 never does.
    jump = []

    def latency(i: int) -> float:
        return 0.6 if jump else 0.1

    config = ControlConfig(kind="action_chunk", rate_hz=30.0, max_steps=600, adaptive=True)
    client = FakeClient(latency)

    async def main():
        ctl = Controller("s", FramesAdapter(size=8, max_episode_steps=10_000), client, config)
        out = [await ctl.run_episode(0, 0)]
        g_fast = ctl.threshold.g(50)
        jump.append(True)
        out += [await ctl.run_episode(e, e) for e in (1, 2)]
        return out, g_fast, ctl.threshold.g(50)

    (ep0, ep1, ep2), g_fast, g_slow = run_virtual(main())
    assert ep0.starved == 0 and ep2.starved == 0
    assert g_fast == pytest.approx(6 / 50) and g_slow == pytest.approx(28 / 50)  # ceil(1.5 x 0.6 x 30) + 1
    assert ep1.starved > 0  # what the window had not seen yet cost a few cycles
    assert ep2.requests / ep2.steps > ep0.requests / ep0.steps  # the price of asking earlier


def test_a_timeout_is_an_error_a_failure_for_the_tracers_and_a_latency_sample():
    spy = Spy()
    stats, ctl, client = control(
        lambda i: None if i == 1 else 0.1, max_steps=200, tracer=spy, adaptive=True, request_timeout_s=2.0
    )
    s = stats[0]
    assert s.timeouts == 1 and s.errors == 1 and s.steps == 200
    assert spy.failures == ["timeout"]
    assert client.futures[1].cancelled()  # the client's slot for it is free again
    assert len(ctl.threshold.window) == s.replies + 1  # every round trip, the timeout too
    assert max(ctl.threshold.window._samples) > 2.0


def test_a_full_backlog_is_an_error_and_the_episode_goes_on():
    from broker.publisher import BacklogFull

    class Refusing(FakeClient):
        async def submit(self, req):
            if not self.refused:
                self.refused.append(req)
                raise BacklogFull("req:action_chunk", 100, 100)
            return await super().submit(req)

    spy = Spy()
    client = Refusing(lambda i: 0.05)
    client.refused = []
    config = ControlConfig(kind="action_chunk", rate_hz=30.0, max_steps=60)

    async def main():
        return await Controller("s", FramesAdapter(size=8), client, config, spy).run_episode(0, 0)

    stats = run_virtual(main())
    assert stats.errors == 1 and stats.steps == 60 and spy.failures == ["backlog_full"]
    assert client.refused[0].reset and client.sent[0].reset  # the retry still starts the episode
    assert not any(r.reset for r in client.sent[1:])
