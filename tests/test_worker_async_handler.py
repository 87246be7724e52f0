"""The worker's path for kinds whose backend batches by itself (`AsyncHandler`, the vLLM
backend's chat kinds): each admitted request is served on its own, concurrently, on the
event loop; an expired one is answered `expired` without reaching the backend; a failure
fails its request alone; shutdown waits for what is in flight.

The handler here is a real AsyncHandler whose backend is an asyncio sleep (no model), so
these run everywhere; tests/test_models_vllm.py runs the same path on vLLM.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from env_agents.client import AsyncAgentClient
from inference_worker.handlers.base import AsyncHandler
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import Request, TextActionRequest, TextActionResult
from tests.helpers import WorkerThread, synthetic_settings


class SleepyBackend(AsyncHandler):
    """Answers each request after `delay_s` of awaiting (as a backend's own batching
    would), echoing its text; counts how many are in its hands at once."""

    kind = "text_action"

    def __init__(self, delay_s: float = 0.3) -> None:
        self.delay_s = delay_s
        self.active = 0
        self.peak = 0
        self.served = 0
        self.warmed = False

    async def warmup_async(self) -> None:
        self.warmed = True

    async def serve(self, request: Request):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            text = request.messages[-1].text()
            if text == "raise":
                raise RuntimeError("backend exploded")
            if text == "refuse":
                return ProtocolError(ErrorCode.INVALID, "backend refused this one")
            self.served += 1
            return TextActionResult(text=text)
        finally:
            self.active -= 1


def say(text: str, step: int = 0, **kw) -> TextActionRequest:
    return TextActionRequest(messages=[{"role": "user", "content": text}], step=step, **kw)


def test_requests_are_served_concurrently_and_fail_alone(settings):
    backend = SleepyBackend(delay_s=0.3)
    worker_settings = synthetic_settings(settings, kinds=("text_action",), max_batch=4)

    async def go():
        async with AsyncAgentClient(
            f"a-{uuid.uuid4().hex[:6]}", settings=settings, raise_on_error=False
        ) as c:
            texts = [f"q{i}" for i in range(6)] + ["raise", "refuse"]
            futs = [await c.submit(say(t, step=i)) for i, t in enumerate(texts)]
            t0 = time.perf_counter()
            replies = await asyncio.wait_for(asyncio.gather(*futs), 30)
            return replies, time.perf_counter() - t0

    with WorkerThread(worker_settings, {"text_action": backend}) as w:
        replies, took = asyncio.run(go())
        stats = dict(w.worker.stats)
    assert backend.warmed
    # 8 requests of 0.3 s each in well under 8 x 0.3 s: they were in the backend together,
    # more of them than max_batch (vlmq does not batch these)
    assert backend.peak > 4 and took < 1.5
    assert [r.result.text for r in replies[:6]] == [f"q{i}" for i in range(6)]
    assert all(r.batch_size == 1 and {"queue_ms", "model_ms"} <= set(r.timings) for r in replies[:6])
    boom, refused = replies[6], replies[7]
    assert not boom.ok and boom.error.code == ErrorCode.INTERNAL and "backend exploded" in boom.error.message
    assert not refused.ok and refused.error.code == ErrorCode.INVALID
    assert stats["requests"] == 8 and stats["dead_letters"] == 2
    r = connect_sync(settings)
    assert r.xlen(Keys(settings.prefix).dead_letters("text_action", 0)) == 2


def test_an_expired_request_never_reaches_the_backend(settings):
    backend = SleepyBackend(delay_s=0.0)

    async def go():
        async with AsyncAgentClient("late", settings=settings, raise_on_error=False) as c:
            late = await c.submit(say("too late", deadline=time.time() - 1.0))
            ok = await c.submit(say("in time", step=1, deadline=time.time() + 60))
            return await asyncio.wait_for(asyncio.gather(late, ok), 30)

    with WorkerThread(synthetic_settings(settings, kinds=("text_action",)), {"text_action": backend}):
        late, ok = asyncio.run(go())
    assert not late.ok and late.error.code == ErrorCode.EXPIRED
    assert ok.ok and ok.result.text == "in time"
    assert backend.served == 1


def test_shutdown_waits_for_requests_in_flight(settings):
    backend = SleepyBackend(delay_s=1.0)
    w = WorkerThread(synthetic_settings(settings, kinds=("text_action",)), {"text_action": backend})

    async def go():
        async with AsyncAgentClient("inflight", settings=settings, raise_on_error=False) as c:
            futs = [await c.submit(say(f"x{i}", step=i)) for i in range(3)]
            while backend.active < 3:
                await asyncio.sleep(0.01)
            w.loop.call_soon_threadsafe(w.worker.request_stop)
            return await asyncio.wait_for(asyncio.gather(*futs), 30)

    with w:
        replies = asyncio.run(go())
    assert all(r.ok for r in replies) and backend.served == 3


def test_vllm_backend_refuses_action_chunk_beside_it(settings, tmp_path):
    """A vllm worker asked to also serve the VLA would load the VLM a second time: it
    refuses at start, before vLLM (or any model) loads, with a one-line reason."""
    from inference_worker.handlers import build_handlers
    from inference_worker.models.errors import ModelLoadError

    worker_settings = synthetic_settings(
        settings,
        backend="vllm",
        model_path=str(tmp_path),
        kinds=("action_chunk", "text_action"),
        options={"vla": str(tmp_path)},
    )
    with pytest.raises(ModelLoadError, match="does not serve action_chunk") as err:
        build_handlers(worker_settings)
    assert "\n" not in str(err.value)
