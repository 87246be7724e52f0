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


def test_triton_kernels_match_the_reference_in_tritons_interpreter():
    """Run by Triton's CPU interpreter: rope=triton gives fused.rope's result (computed in
    float32, rounded once) for GQA q/k views of one q/k/v projection, with sizes that are
    not multiples of its block, and so does the vision rotary; the vision blocks' add + LayerNorm gives
    fused.add_layer_norm's sum and norm at a width that is not a power of two; the fused
    fc1 + QuickGELU product, over row counts that do and do not fill its tiles, gives the
    product then the activation, and so does the gate/up product with SwiGLU in its
    epilogue; a decode step's rope + cache write and its attention (whole or split
    into 64-column pieces) give fused.rope, the indexed cache writes and grouped_attention
    under its mask. Runs where Triton is installed (not in CI, whose CPU torch
    has none; tests/test_models_gpu.py runs them on a GPU)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    code = """
import torch
from inference_worker.engines import triton_kernels as tk
from inference_worker.engines.fused import add_layer_norm, rope, silu_mul
g = torch.Generator().manual_seed(0)
for rows, n in ((1, 80), (5, 80), (3, 64)):
    h, d = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    s, y = tk.add_layer_norm(h, d, w, b, 1e-6)
    s_ref, y_ref = add_layer_norm(h, d, w, b, 1e-6)
    assert torch.equal(s, s_ref)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5), (y - y_ref).abs().max()
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
# the vision rotary on strided q/k views of one qkv projection: transformers' own function
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
for rows in (1, 37):
    qkv = torch.randn(rows, 3, 4, 16, generator=g)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
    angles = torch.randn(rows, 8, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    for got, want in zip(tk.rotary_vision(q, k, cos, sin), apply_rotary_pos_emb_vision(q, k, cos, sin)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
# a decode step's rope + cache write, then its attention, against fused.rope, indexed
# writes and grouped_attention under attention_bias (rows with masked columns, spans that
# are not a multiple of the kernel's block)
from inference_worker.engines.text_stack import attention_bias, grouped_attention
heads, kv, d, cap = 6, 2, 16, 160
for b, span in ((1, 16), (5, 70), (3, 150)):
    qkv = torch.randn(b, 1, (heads + 2 * kv) * d, generator=g)
    angles = torch.randn(b, 1, d // 2, generator=g)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    store = torch.randn(2, b, kv, cap, d, generator=g)
    mask = torch.rand(b, cap, generator=g) < 0.6
    cols = torch.randint(0, span, (b,), generator=g)
    mask[torch.arange(b), cols] = True
    keys, values = store[0].clone(), store[1].clone()
    q_got = tk.decode_rope_write(qkv, cos.reshape(b, d), sin.reshape(b, d), keys, values, cols, heads)
    q = qkv[..., : heads * d].view(b, 1, heads, d).transpose(1, 2)
    k = qkv[..., heads * d : (heads + kv) * d].view(b, 1, kv, d).transpose(1, 2)
    v = qkv[..., (heads + kv) * d :].view(b, 1, kv, d).transpose(1, 2)
    q_ref, k_ref = rope(q, k, cos, sin)
    keys_ref, values_ref = store[0].clone(), store[1].clone()
    keys_ref[torch.arange(b), :, cols] = k_ref[:, :, 0]
    values_ref[torch.arange(b), :, cols] = v[:, :, 0]
    assert torch.allclose(q_got, q_ref[:, :, 0], atol=1e-5), (q_got - q_ref[:, :, 0]).abs().max()
    assert torch.allclose(keys, keys_ref, atol=1e-5) and torch.equal(values, values_ref)
    bias = attention_bias(mask[:, None, None, :span], heads // kv, torch.float32)
    o_ref = grouped_attention(q_ref, keys_ref[:, :, :span], values_ref[:, :, :span], bias, 0.25)[:, :, 0]
    for chunk in (0, 64):  # split-K: 64 columns a program, the pieces merged
        o = tk.decode_attention(q_got, keys, values, mask, span, 0.25, chunk=chunk)
        assert torch.allclose(o, o_ref, atol=1e-4), (chunk, (o - o_ref).abs().max())
# the fused fc1 + QuickGELU and gate/up + SwiGLU products, launched as the engine launches
# them (the interpreter has no Hopper check and no bf16: float32, small tiles)
for rows in (64, 300):
    x, w, b = torch.randn(rows, 128, generator=g), torch.randn(512, 128, generator=g), torch.randn(512, generator=g)
    y = tk._persistent_product(tk._linear_quick_gelu, x, w, 512, (64, 128, 64, 1, 4), b)
    ref = torch.nn.functional.linear(x, w, b)
    ref = ref * torch.sigmoid(1.702 * ref)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
    w = torch.randn(2 * 256, 128, generator=g)
    y = tk._persistent_product(tk._linear_swiglu, x, w, 256, (64, 128, 64, 1, 4))
    ref = silu_mul(*torch.nn.functional.linear(x, w).chunk(2, dim=-1))
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_fused_block_norms_give_the_stock_towers_features(tiny_qwen2_vl):
    """The vision blocks with each residual add fused into the LayerNorm after it (on a CPU
    add_norm is the torch add and norm): the stock tower's features bit for bit, and only
    the first block norms its own input (each later one gets it from the block before)."""
    import numpy as np

    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.fused import add_norm
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.vision_fusion import fuse_block_norms
    from inference_worker.models import load_vlm

    rs = np.random.RandomState(0)
    prompts = [user_prompt(rs.randint(0, 256, (s, s, 3), dtype=np.uint8), "next?") for s in (64, 100, 64)]

    def features(fuse: bool):
        engine = ChatEngine(load_vlm(tiny_qwen2_vl, device="cpu", dtype="float32"), EngineOptions(fuse="off"))
        blocks = list(engine.model.model.visual.blocks)
        own_norms = []
        for blk in blocks:
            blk.norm1.register_forward_hook(lambda *_, b=blk: own_norms.append(b))
        if fuse:
            assert fuse_block_norms(blocks, add_norm)
        batch = engine.inputs.build(prompts)
        with torch.inference_mode():
            out = engine.vision(batch.pixel_values, batch.grids, batch.image_grid_thw)
        return out, own_norms, blocks

    plain, plain_norms, blocks = features(False)
    fused, fused_norms, fused_blocks = features(True)
    assert len(blocks) > 1 and plain_norms == blocks
    assert fused_norms == fused_blocks[:1]
    assert torch.equal(plain, fused)


def test_swiglu_epilogue_is_refused_without_cuda():
    with pytest.raises(ValueError, match="prefill_swiglu=epilogue needs a CUDA device"):
        Kernels(compile=False, cuda=False, swiglu="epilogue")


def test_a_decode_split_off_the_block_is_refused():
    with pytest.raises(ValueError, match="decode_split must be 0 or a positive multiple of 64"):
        Kernels(compile=False, split=100)


def test_rope_triton_is_refused_without_cuda():
    with pytest.raises(ValueError, match="rope=triton needs a CUDA device"):
        Kernels(compile=False, cuda=False, rotary="triton")
