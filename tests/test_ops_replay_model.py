"""Record -> replay on the tiny Qwen2-VL (random weights, real architecture) served by the hf
backend: against the same checkpoint nothing differs (greedy decoding is deterministic);
against a checkpoint built with another seed the replay reports the differences."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from env_agents.client import AsyncAgentClient
from inference_worker.settings import WorkerSettings
from ops.recording import read_recording
from ops.replay import DIFFER, MATCH, ReplayOptions, counts, replay, report
from schemas.messages import PreferenceRequest, StructuredActionRequest, TextActionRequest
from tests.helpers import WorkerThread
from tests.test_ops_record_replay import Recorder

pytest.importorskip("transformers")
KINDS = ("text_action", "structured_action", "preference")


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def _requests(i: int):
    look = [{"type": "image", "image": _frame(i)}, {"type": "text", "text": f"room {i}: where next?"}]
    yield TextActionRequest(messages=[{"role": "user", "content": look}], max_tokens=8, step=0)
    yield TextActionRequest(
        messages=[{"role": "user", "content": f"you are in room {i}"}],
        admissible_commands=["go north", "go south", "open door"],
        step=1,
    )
    yield StructuredActionRequest(image=_frame(i + 5), task_name="find_cave", max_tokens=12, step=2)
    yield PreferenceRequest(
        image_a=_frame(i), image_b=_frame(i + 1), task="reach the door", max_tokens=6, step=3
    )


async def _traffic(settings, sessions: int) -> int:
    async def one(i: int) -> int:
        async with AsyncAgentClient(f"tiny-{i}", settings=settings) as client:
            for req in _requests(i):
                await client.request(req, timeout=120)
        return 4

    return sum(await asyncio.gather(*(one(i) for i in range(sessions))))


@pytest.fixture(scope="module")
def other_tiny_qwen2_vl(tmp_path_factory) -> str:
    """The tiny Qwen2-VL again, from another seed: a deliberately changed model."""
    from inference_worker.models import make_model

    return make_model("qwen2-vl", str(tmp_path_factory.mktemp("tiny-qwen2-vl-seed1")), preset="tiny", seed=1)


def _worker(settings, model: str) -> WorkerThread:
    return WorkerThread(
        WorkerSettings(
            broker=settings, backend="hf", model_path=model, kinds=KINDS, max_wait_ms=5.0, heartbeat_s=0.5
        )
    )


def test_replay_on_the_tiny_model_same_checkpoint_no_differences_other_seed_differences(
    settings, tiny_qwen2_vl, other_tiny_qwen2_vl, tmp_path
):
    path = str(tmp_path / "tiny.vlmqrec")
    with _worker(settings, tiny_qwen2_vl):
        recorder = Recorder(settings, path)
        recorder.start()
        assert recorder.ready.wait(30)
        sent = asyncio.run(_traffic(settings, sessions=3))
        recorder.stop()
        rec = read_recording(path)
        assert len(rec.requests()) == sent and len(rec.replies_by_rid()) == sent

        same = asyncio.run(replay(settings, rec, ReplayOptions(timeout=120)))
    assert counts(same)[MATCH] == sent, report(path, rec, same, settings, 0.0, 20)

    with _worker(settings, other_tiny_qwen2_vl):
        changed = asyncio.run(replay(settings, rec, ReplayOptions(timeout=120)))
    n = counts(changed)
    assert n["failed"] == 0 and n[DIFFER] + n[MATCH] == sent
    text = report(path, rec, changed, settings, 0.0, 20)
    # Free-form generations change with the weights; the report names the fields.
    generated = [
        c for c in changed if c.entry.kind == "text_action" and c.request.admissible_commands is None
    ]
    assert all(c.status == DIFFER for c in generated), text
    assert any(d.path == "result.text" for c in generated for d in c.diffs)
    scored = [c for c in changed if c.request.kind == "text_action" and c.request.admissible_commands]
    assert all(any(d.path.startswith("result.scores") for d in c.diffs) for c in scored), text
    assert "differences (" in text and "result.text:" in text
