"""The engine core through a real worker and Redis: answers leave the moment they are done,
deadlines stop running requests, control traffic never waits behind a decode, and the
admission limits. Tiny random-weight Qwen2-VL (a real architecture) on CPU, fp32; the
engine decodes every request to its max_tokens (`ignore_eos`), so lengths are exact."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("torch")

from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from inference_worker.engines.chat_engine import ChatEngine
from inference_worker.engines.options import EngineOptions
from inference_worker.handlers.synthetic import SyntheticHandler
from inference_worker.handlers.text_action import TextActionHandler
from inference_worker.models import load_vlm
from schemas.errors import ErrorCode
from schemas.limits import Limits
from schemas.messages import ActionChunkRequest, TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings

FRAME = np.random.RandomState(3).randint(0, 256, (64, 64, 3), dtype=np.uint8)
LIMITS = Limits(max_images=2, max_prompt_tokens=120)


@pytest.fixture(scope="module")
def broker(redis_server) -> BrokerSettings:
    return BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", claim_min_idle_ms=1000)


@pytest.fixture(scope="module")
def engine(tiny_qwen2_vl) -> ChatEngine:
    return ChatEngine(load_vlm(tiny_qwen2_vl), EngineOptions(ignore_eos=True), max_sequences=8)


@pytest.fixture(scope="module")
def worker(broker, engine):
    """text_action on the engine (continuous), action_chunk on a synthetic 5 ms handler."""
    settings = synthetic_settings(
        broker, kinds=("text_action", "action_chunk"), max_wait_ms=1.0, limits=LIMITS
    )
    handlers = {
        "text_action": TextActionHandler(engine, LIMITS),
        "action_chunk": SyntheticHandler("action_chunk", latency_ms=5),
    }
    with WorkerThread(settings, handlers=handlers) as w:
        yield w


def chat(*parts, **kw) -> TextActionRequest:
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts
    ]
    return TextActionRequest(messages=[{"role": "user", "content": content}], **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def test_a_finished_request_is_answered_while_its_batch_mates_decode(worker, broker):
    async def go():
        async with AsyncAgentClient("join", settings=broker) as c:
            long = await c.submit(chat(FRAME, "tell me a long story", max_tokens=300, step=0))
            short = await c.submit(chat(FRAME, "one word", max_tokens=3, step=1))
            first = await short
            still_running = not long.done()
            return first, still_running, await long

    short, still_running, long = run(go())
    assert short.ok and short.result.completion_tokens == 3
    assert long.ok and long.result.completion_tokens == 300
    assert still_running, "the short answer waited for the long one"
    assert long.replied_at > short.replied_at


def test_a_request_past_its_deadline_is_stopped_mid_generation(worker, broker):
    async def go():
        async with AsyncAgentClient("late", settings=broker, raise_on_error=False) as c:
            t0 = time.time()
            doomed = await c.request(
                chat(FRAME, "go on", max_tokens=4000, deadline=time.time() + 1.0, step=0)
            )
            waited = time.time() - t0
            after = await c.request(chat(FRAME, "next", max_tokens=4, step=1))
            return doomed, waited, after

    doomed, waited, after = run(go())
    assert not doomed.ok and doomed.error.code == ErrorCode.DEADLINE_EXCEEDED
    assert "into generation" in doomed.error.message
    assert set(doomed.error.detail) == {"deadline", "late_ms"}  # docs/PROTOCOL.md, section 8
    assert waited < 30  # 4,000 tokens would have taken far longer: it was stopped, its slot freed
    assert after.ok and after.result.completion_tokens == 4
    assert worker.worker.core.engine.running == 0


def test_control_traffic_is_served_while_a_long_chat_request_decodes(worker, broker):
    async def go():
        async with AsyncAgentClient("mixed", settings=broker) as c:
            # ~1.3 ms a step on the tiny model: ~2.6 s of decoding, far longer than the
            # control requests need if they never wait behind it
            long = await c.submit(chat(FRAME, "keep talking", max_tokens=2000, step=0))
            while worker.worker.core.engine.running == 0:  # until it is decoding
                await asyncio.sleep(0.01)
            control = []
            for i in range(5):
                t0 = time.time()
                r = await c.request(ActionChunkRequest(image=FRAME, step=10 + i))
                control.append((r, time.time() - t0, long.done()))
            return control, await long

    control, long = run(go())
    assert long.ok and long.result.completion_tokens == 2000
    assert all(r.ok and r.kind == "action_chunk" for r, _, _ in control)
    assert not any(done for _, _, done in control), "control requests waited for the chat request"
    assert max(dt for _, dt, _ in control) < 2.0


def test_admission_limits_give_clear_invalid_replies(worker, broker):
    async def go():
        async with AsyncAgentClient("limits", settings=broker, raise_on_error=False) as c:
            images = await c.request(chat(FRAME, FRAME, FRAME, "three images", max_tokens=2))
            long = await c.request(chat(FRAME, "word " * 200, max_tokens=2, step=1))
            fine = await c.request(chat(FRAME, "short", max_tokens=2, step=2))
            return images, long, fine

    images, long, fine = run(go())
    assert (
        not images.ok
        and images.error.code == ErrorCode.INVALID
        and "3 images; the limit is 2" in images.error.message
    )
    assert not long.ok and long.error.code == ErrorCode.INVALID and "the limit is 120" in long.error.message
    assert fine.ok


def test_an_unknown_option_key_is_refused_at_start():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", "--backend", "synthetic", "--option", "decod=eager"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "unknown --option key(s) decod; known keys:" in out.stderr and "decode" in out.stderr
    assert "Traceback" not in out.stderr
