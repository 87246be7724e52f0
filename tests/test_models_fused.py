"""The compiled per-token ops keep their compiled form across the variants a worker meets."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines.fused import Kernels, add_rms_norm  # noqa: E402


@pytest.mark.slow
def test_more_variants_than_torchs_default_limit_stay_compiled(caplog):
    """The chat engine (inference_mode) and the VLA feature pass (no_grad) share a model and
    call the same compiled functions at several dtypes and ranks: past torch's default of 8
    variants a fullgraph compile fails, and the function then ran op by op for good (seen on
    an H100 worker serving action_chunk and text_action)."""
    k = Kernels(True)
    calls = 0
    with caplog.at_level(logging.WARNING, logger="vlmq.engine"):
        for mode in (torch.no_grad, torch.inference_mode):
            for dtype in (torch.float32, torch.bfloat16):
                for shape in ((3, 5, 32), (3, 1, 32), (7, 32)):
                    with mode():
                        h, d = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
                        w = torch.randn(shape[-1], dtype=dtype)
                        got = k.add_rms_norm(h, d, w, 1e-6)
                        want = add_rms_norm(h, d, w, 1e-6)
                        tol = 1e-5 if dtype == torch.float32 else 1e-2
                        assert all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(got, want))
                        calls += 1
    assert calls == 12
    assert not [r for r in caplog.records if "op by op" in r.getMessage()], "a compiled op fell back to eager"


def test_the_triton_text_rotary_matches_the_reference_in_tritons_interpreter():
    """rope=triton: the kernel, run by Triton's CPU interpreter, gives fused.rope's result
    (computed in float32, rounded once) for GQA q/k views of one q/k/v projection, with
    sizes that are not multiples of its block. Runs where Triton is installed (not in CI,
    whose CPU torch has none; tests/test_models_gpu.py runs it on a GPU)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    code = """
import torch
from inference_worker.engines import triton_kernels as tk
from inference_worker.engines.fused import rope
g = torch.Generator().manual_seed(0)
for b, t in ((1, 1), (3, 37)):
    heads, kv, d = 6, 2, 16
    qkv = torch.randn(b, t, (heads + 2 * kv) * d, generator=g)
    q = qkv[..., : heads * d].view(b, t, heads, d).transpose(1, 2)
    k = qkv[..., heads * d : (heads + kv) * d].view(b, t, kv, d).transpose(1, 2)
    angles = torch.randn(b, t, d // 2, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    got = tk.rope(q, k, cos, sin)
    want = rope(q, k, cos, sin)
    for x, y in zip(got, want):
        assert x.shape == y.shape and x.is_contiguous(), (x.shape, y.shape)
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-5), (x - y).abs().max()
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_rope_triton_is_refused_without_cuda():
    with pytest.raises(ValueError, match="rope=triton needs a CUDA device"):
        Kernels(compile=False, cuda=False, rotary="triton")
