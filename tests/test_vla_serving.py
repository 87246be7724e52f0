"""Serving action_chunk: the per-session cache, exactness of cache hits, and the handler
end to end through a real redis-server and worker on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from env_agents.client import AgentClient, ReplyError
from inference_worker.handlers import build_handlers
from inference_worker.handlers.action_chunk import ActionChunkHandler
from inference_worker.vla.cache import FeatureCache
from inference_worker.vla.model import QwenVLA
from schemas.errors import ErrorCode
from schemas.messages import ActionChunkRequest
from tests.helpers import WorkerThread, synthetic_settings, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def steps_of(cache, sid, step, value="cur", instruction="go"):
    values, slots = cache.context(sid, step, instruction, value)
    return values, [(s.step, s.exact) for s in slots]


def test_cache_aligns_t_minus_2_and_4_with_step_and_handles_gaps():
    c: FeatureCache[str] = FeatureCache(num_frames=3, frame_skip=2)
    for t in range(7):
        c.put("s", t, "go", f"f{t}")
    assert c.frames("s") == [1, 2, 3, 4, 5, 6]  # >= newest - 4, plus one older
    values, slots = steps_of(c, "s", 6, "f6")
    assert values == ["f2", "f4", "f6"] and all(e for _, e in slots)
    # Episode start: slots before step 0 are step 0, exactly as in training.
    c.reset("s")
    c.put("s", 0, "go", "f0")
    assert steps_of(c, "s", 0, "f0") == (["f0", "f0", "f0"], [(0, True), (0, True), (0, True)])
    c.put("s", 1, "go", "f1")
    assert steps_of(c, "s", 1, "f1")[0] == ["f0", "f0", "f1"]
    # A gap (steps 2..9 never sent): the nearest older frames stand in, flagged inexact.
    c.put("s", 10, "go", "f10")
    values, slots = steps_of(c, "s", 10, "f10")
    assert values == ["f1", "f1", "f10"] and [e for _, e in slots] == [False, False, True]
    # A request for an older step never sees newer frames.
    assert steps_of(c, "s", 1, "f1")[0] == ["f1", "f1", "f1"]
    # A changed instruction starts over (features depend on it).
    c.put("s", 11, "other", "g11")
    assert c.frames("s") == [11] and c.get("s", 10, "go") is None


def test_cache_is_bounded_by_sessions_and_ttl():
    clock = Clock()
    c: FeatureCache[int] = FeatureCache(max_sessions=3, ttl_s=10.0, clock=clock)
    for i in range(5):
        c.put(f"s{i}", 0, "", i)
    assert len(c) == 3 and c.get("s0", 0, "") is None and c.stats["evicted"] == 2
    c.get("s2", 0, "")  # a read does not refresh; a put does
    c.put("s2", 1, "", 9)
    clock.now = 11.0
    c.put("s9", 0, "", 1)
    assert c.frames("s2") == [] and c.frames("s9") == [0] and c.stats["expired"] == 3


def frame(seed: int, size: int = 112) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def handlers(tiny_vla):
    vla = QwenVLA.load(tiny_vla)
    shared = QwenVLA.load(tiny_vla, vlm=vla.extractor.vlm)
    return ActionChunkHandler(vla, "features"), ActionChunkHandler(shared, "frames")


def test_a_cache_hit_gives_the_chunk_of_re_encoding_every_frame(handlers):
    cached, reencode = handlers
    for step in range(7):
        reqs = [
            ActionChunkRequest(
                session_id=f"s{j}",
                step=step,
                image=frame(10 * j + step),
                instruction="go to the red box",
                noise_seed=100 * step + j,
                reset=step == 0,
            )
            for j in range(3)
        ]
        a, b = cached.run(reqs), reencode.run(reqs)
        for x, y in zip(a.results, b.results):
            assert x.chunk.shape == (50, cached.cfg.action_dim) and x.chunk.dtype == np.float32
            assert x.cache_hit and x.frames_encoded == 1 and y.frames_encoded == 3
            np.testing.assert_allclose(x.chunk, y.chunk, atol=1e-4)
        assert {"decode", "encode", "expert"} <= set(a.timings)
    # A redelivered request (same session and step) encodes nothing and gives the same chunk.
    again = cached.run([reqs[0]]).results[0]
    assert again.frames_encoded == 0
    np.testing.assert_allclose(again.chunk, a.results[0].chunk, atol=1e-4)


def test_one_session_twice_in_a_batch_runs_in_step_order(handlers):
    cached, _ = handlers
    reqs = [
        ActionChunkRequest(session_id="twice", step=s, image=frame(s), noise_seed=s, reset=s == 0)
        for s in (2, 0, 1)
    ]
    out = cached.run(reqs).results
    assert [r.frames_encoded for r in out] == [1, 1, 1]
    assert cached.cache.frames("twice") == [0, 1, 2] and all(r.cache_hit for r in out)


def test_bad_requests_fail_alone(handlers):
    cached, _ = handlers
    good = ActionChunkRequest(session_id="ok", image=frame(1), noise_seed=1)
    bad_prev = ActionChunkRequest(session_id="b1", image=frame(1), prev_chunk=np.zeros((10, 3), np.float32))
    bad_delay = ActionChunkRequest(
        session_id="b2",
        image=frame(1),
        prev_chunk=np.zeros((10, cached.cfg.action_dim), np.float32),
        inference_delay=11,
    )
    bad_text = ActionChunkRequest(session_id="b3", image=frame(1), instruction="<|image_pad|>")
    out = cached.run([good, bad_prev, bad_delay, bad_text]).results
    assert out[0].chunk.shape == (50, cached.cfg.action_dim)
    assert [r.code for r in out[1:]] == [ErrorCode.INVALID] * 3


def test_action_chunks_end_to_end_through_redis(settings, tiny_vla, tiny_qwen2_vl):
    ws = synthetic_settings(
        settings,
        backend="hf",
        model_path=tiny_qwen2_vl,
        kinds=("action_chunk", "text_action"),
        max_wait_ms=20.0,
        options={"vla": tiny_vla},
    )
    handlers = build_handlers(ws)  # what `vlmq worker --model M --option vla=DIR` builds
    handler = handlers["action_chunk"]
    assert isinstance(handler, ActionChunkHandler) and set(handlers) == {"action_chunk", "text_action"}
    assert handler.vla.extractor.vlm is handlers["text_action"].engine.vlm  # one VLM in memory
    with WorkerThread(ws, handlers):
        with AgentClient("robot-a", settings=settings) as a, AgentClient("robot-b", settings=settings) as b:
            for step in range(5):
                for client, seed in ((a, 0), (b, 50)):
                    reply = client.request(
                        ActionChunkRequest(
                            step=step,
                            image=frame(seed + step),
                            instruction="go to the red box",
                            reset=step == 0,
                            noise_seed=step,
                        ),
                        timeout=60,
                    )
                    assert reply.ok and reply.result.chunk.shape == (50, handler.cfg.action_dim)
                    assert reply.result.frames_encoded == 1 and reply.result.cache_hit
                    assert {"encode", "expert", "queue_ms"} <= set(reply.timings)
            # RTC through the wire: the frozen rows come back as sent.
            prev = np.tile(np.linspace(-1, 1, handler.cfg.action_dim, dtype=np.float32), (30, 1))
            reply = a.request(
                ActionChunkRequest(
                    step=5,
                    image=frame(5),
                    instruction="go to the red box",
                    prev_chunk=prev,
                    inference_delay=3,
                    execution_horizon=10,
                    noise_seed=1,
                ),
                timeout=60,
            )
            np.testing.assert_allclose(reply.result.chunk[:3], prev[:3])
            # Bad input: an error reply and a dead letter; the worker keeps serving.
            with pytest.raises(ReplyError) as err:
                a.request(
                    ActionChunkRequest(step=6, image=frame(6), prev_chunk=np.zeros((4, 2), np.float32)),
                    timeout=60,
                )
            assert err.value.code == ErrorCode.INVALID
            r = connect_sync(settings)
            keys = Keys(settings.prefix, settings.partitions)
            dlq = keys.dead_letters("action_chunk", keys.partition_of("robot-a"))
            assert wait_for(lambda: r.xlen(dlq) == 1, 20)
            assert b.request(ActionChunkRequest(step=5, image=frame(55), noise_seed=5), timeout=60).ok
            assert handler.cache.frames("robot-b")[-1] == 5
