"""The engine's text stack over quantized projections, on CPU.

`quantize=nf4` serves through bitsandbytes' `Linear4bit` on CUDA (tests/test_models_gpu.py
runs that path, graphs included). Here: the rule that keeps the fused q/k/v and gate/up
GEMMs off layers that are not plain `nn.Linear` (always), and, where bitsandbytes is
installed (its CPU backend quantizes and multiplies 4-bit weights too), the tiny Qwen2-VL
with every text-layer projection an nf4 `Linear4bit`: the engine == the stock forward of
an identically quantized copy, greedy and teacher-forced, batched == unbatched.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from inference_worker.engines.fused_linear import ATTR, fuse_layer  # noqa: E402


class QuantizedLinear(torch.nn.Linear):
    """A layer type of its own, as quantized layers are (bitsandbytes' Linear4bit and
    Linear8bitLt subclass nn.Linear and keep their weights in their own format)."""


def _layer(linear=torch.nn.Linear):
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(layer.self_attn, name, linear(16, 8, bias=True))
    for name in ("gate_proj", "up_proj"):
        setattr(layer.mlp, name, linear(16, 12, bias=False))
    return layer


def test_fused_linear_leaves_quantized_layers_alone():
    plain, quant = _layer(), _layer(QuantizedLinear)
    q_weight = quant.self_attn.q_proj.weight
    assert fuse_layer(plain) is not None
    assert fuse_layer(quant) is None and not hasattr(quant, ATTR)
    assert quant.self_attn.q_proj.weight is q_weight  # not rebound to a slice


def _quantize_text_layers(model, bnb) -> int:
    """Every nn.Linear of the language model's layers -> nf4 Linear4bit (fp32 compute) with
    the same weights, as transformers' bitsandbytes integration replaces them."""
    n = 0
    for layer in model.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if type(mod) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    mod.in_features,
                    mod.out_features,
                    bias=mod.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if mod.bias is not None:
                    q.bias = torch.nn.Parameter(mod.bias.data.clone(), requires_grad=False)
                setattr(parent, name, q.to("cpu"))  # quantizes
                n += 1
    return n


def test_the_text_stack_runs_over_nf4_projections(tiny_qwen2_vl):
    bnb = pytest.importorskip(
        "bitsandbytes", reason="bitsandbytes is not installed here (the gpu extra has it)"
    )
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.parity import compare_topk, engine_trace, reference_trace
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm

    vlm, pristine = load_vlm(tiny_qwen2_vl), load_vlm(tiny_qwen2_vl)
    assert _quantize_text_layers(vlm.model, bnb) == _quantize_text_layers(pristine.model, bnb) > 0
    q = vlm.model.model.language_model.layers[0].self_attn.q_proj
    if q.weight.dtype != torch.uint8:
        pytest.skip("this bitsandbytes build does not quantize on the CPU")
    engine = ChatEngine(vlm)
    assert all(f is None for f in engine.stack.fused)
    rs = np.random.RandomState(2)
    prompts = [
        user_prompt(rs.randint(0, 256, (64, 64, 3), dtype=np.uint8), "What next?"),
        user_prompt("Text only, a little longer than the other one."),
        user_prompt(rs.randint(0, 256, (100, 37, 3), dtype=np.uint8), "Go on."),
    ]
    samp = [Sampling(max_tokens=8)] * len(prompts)
    batched = engine.generate(prompts, samp)
    alone = [engine.generate([p], [s])[0] for p, s in zip(prompts, samp)]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    for prompt, ours in zip(prompts[:2], batched):
        ref = reference_trace(pristine, prompt, max_tokens=8)
        assert ours.token_ids == ref.tokens[: len(ours.token_ids)]
        report = compare_topk(ref, engine_trace(engine, prompt, ref.tokens))
        assert report.argmax_agreement == 1.0 and report.max_abs_diff < 1e-3, report
