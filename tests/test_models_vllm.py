"""The vLLM backend on a tiny checkpoint, where vLLM is installed (a CUDA machine with vllm).

Skipped elsewhere: the CPU machines have no vLLM, and the GPU machine's image has none
and its wheel is over the device tool's transfer limit (docs/MODELS.md).
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="vllm is not installed here (see docs/MODELS.md, vLLM backend)")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs CUDA here"),
]


def test_vllm_engine_generates_and_scores(tiny_qwen2_vl):
    import numpy as np

    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.engines.vllm_engine import VLLMChatEngine
    from inference_worker.settings import WorkerSettings

    engine = VLLMChatEngine.from_settings(
        WorkerSettings(
            backend="vllm", model_path=tiny_qwen2_vl, options={"vllm_gpu_memory_utilization": "0.3"}
        )
    )
    frame = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    out = engine.generate([user_prompt(frame, "next?"), user_prompt("text")], [Sampling(max_tokens=5)] * 2)
    assert all(1 <= c.completion_tokens <= 5 and c.prompt_tokens > 0 for c in out)
    scored = engine.score([user_prompt(frame, "pick")], [["0", "1", "-1"]])[0]
    assert len(scored.scores) == 3 and all(s < 0 for s in scored.scores)
