"""The three chat kinds end to end: agent client -> real Redis -> `Worker` with the hf backend
and a tiny random-weight Qwen2-VL (a real architecture; its answers are noise) -> reply."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

pytest.importorskip("torch")

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient, AsyncAgentClient, ReplyError
from inference_worker.parsing.minerl_action import BUTTONS, default_action
from schemas.errors import ErrorCode
from schemas.images import encode_jpeg, encode_png
from schemas.messages import PreferenceRequest, StructuredActionRequest, TextActionRequest
from tests.helpers import WorkerThread, start_worker_process, stop_process, synthetic_settings

CHAT_KINDS = ("text_action", "structured_action", "preference")
RS = np.random.RandomState(11)
FRAME = RS.randint(0, 256, (64, 64, 3), dtype=np.uint8)
OTHER = RS.randint(0, 256, (48, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def broker(redis_server) -> BrokerSettings:
    return BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", claim_min_idle_ms=1000)


@pytest.fixture(scope="module")
def worker(broker, tiny_qwen2_vl):
    settings = synthetic_settings(
        broker, backend="hf", model_path=tiny_qwen2_vl, kinds=CHAT_KINDS, max_wait_ms=20.0, max_batch=16
    )
    with WorkerThread(settings) as w:
        yield w


@pytest.fixture
def client(worker, broker):
    with AgentClient(f"s-{uuid.uuid4().hex[:8]}", settings=broker) as c:
        yield c


def chat(*parts, **kw) -> TextActionRequest:
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts
    ]
    return TextActionRequest(messages=[{"role": "user", "content": content}], **kw)


def test_text_action_free_text(client):
    r = client.request(chat(FRAME, "What do you do next?", max_tokens=7), timeout=120)
    res = r.result
    assert r.ok and isinstance(res.text, str) and res.choice is None
    assert 1 <= res.completion_tokens <= 7 and res.prompt_tokens > 4 + 4  # 4 image tokens at 64 px
    assert res.finish_reason in ("stop", "length")
    assert {"preprocess", "prefill", "decode", "queue_ms", "intake_ms"} <= set(r.timings)
    assert 0.0 <= r.timings["intake_ms"] <= r.timings["queue_ms"]


def test_text_action_admissible_commands(client):
    commands = ["go to fridge 1", "open drawer 2", "look", "take apple 1 from countertop 1"]
    res = client.request(chat(OTHER, "Choose.", admissible_commands=commands), timeout=120).result
    assert len(res.scores) == len(commands) and all(s < 0 for s in res.scores)
    assert res.choice_index == int(np.argmax(res.scores)) and res.choice == commands[res.choice_index]
    assert res.text == res.choice and res.completion_tokens == 0


def test_structured_action_malformed_answer_gives_the_default_action_and_a_flag(client):
    r = client.request(
        StructuredActionRequest(
            image=encode_jpeg(FRAME), task_name="FindCave", max_tokens=12, constrained=False
        ),
        timeout=120,
    )
    res = r.result
    assert set(res.action) == set(BUTTONS) | {"camera"}
    # free text: the tiny random model answers noise, never JSON: a valid default action, flagged
    assert res.parse_ok is False and res.action == default_action()
    assert res.text and res.reasoning == res.text.strip()
    assert "postprocess" in r.timings  # the parse, after the answer came out of the engine


def test_structured_action_with_own_messages(client):
    req = StructuredActionRequest(
        image=FRAME,
        messages=[{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Act."}],
        max_tokens=5,
    )
    res = client.request(req, timeout=120).result
    assert res.prompt_tokens > 4 and set(res.action) == set(BUTTONS) | {"camera"}


def test_preference_two_step_and_one_pass(client):
    two = client.request(
        PreferenceRequest(
            image_a=FRAME, image_b=encode_png(OTHER), task="move the cube into the hole", max_tokens=10
        ),
        timeout=120,
    ).result
    assert two.mode == "two_step" and two.label in (-1, 0, 1) and len(two.texts) == 2
    assert two.completion_tokens <= 10 + 16  # the summary step has max_tokens 16
    one = client.request(
        PreferenceRequest(image_a=FRAME, image_b=OTHER, task="sweep the puck into the goal", mode="one_pass"),
        timeout=120,
    ).result
    assert one.mode == "one_pass" and set(one.scores) == {"0", "1", "-1"}
    assert one.label == int(max(one.scores, key=one.scores.get))


def test_mixed_batch_with_one_bad_image(worker, broker):
    """Requests of several sessions batch together; an image that does not decode fails alone
    with an error reply and a dead-letter entry, and the worker keeps serving."""
    broken = encode_jpeg(FRAME)[:40]  # a JPEG header and nothing else

    async def go():
        async with AsyncAgentClient("mix-a", settings=broker, raise_on_error=False) as a:
            async with AsyncAgentClient("mix-b", settings=broker, raise_on_error=False) as b:
                futs = [await a.submit(chat(FRAME, f"q{i}", max_tokens=3, step=i)) for i in range(4)]
                futs.append(await b.submit(chat(broken, "bad")))
                futs += [await b.submit(chat(OTHER, f"r{i}", max_tokens=3, step=i + 1)) for i in range(3)]
                return await asyncio.wait_for(asyncio.gather(*futs), 120)

    replies = asyncio.run(go())
    bad = replies[4]
    assert not bad.ok and bad.error.code == ErrorCode.INVALID and "could not be decoded" in bad.error.message
    assert all(r.ok for i, r in enumerate(replies) if i != 4)
    assert max(r.batch_size for r in replies) > 1
    r = connect_sync(broker)
    assert r.xlen(Keys(broker.prefix).dead_letters("text_action", 0)) >= 1
    with AgentClient("after", settings=broker) as c:  # still serving
        assert c.request(chat("still there?", max_tokens=2), timeout=120).ok


def test_error_reply_for_prompt_placeholders(client):
    with pytest.raises(ReplyError) as err:
        client.request(chat("<|image_pad|> smuggled placeholder", max_tokens=2), timeout=120)
    assert err.value.reply.error.code == ErrorCode.INVALID and "placeholder" in err.value.reply.error.message


def test_worker_fails_fast_on_a_missing_model_folder(settings, tmp_path):
    proc = start_worker_process(settings, "--backend", "hf", "--model", str(tmp_path / "nowhere"))
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode not in (0, None)
    assert "does not exist" in out and "Traceback" not in out
