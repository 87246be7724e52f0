"""The vision tower's elementwise work as single kernels (Triton or torch.compile, CUDA).

For 128 frames the 2B vision tower holds 32k patch rows per layer; transformers applies
its rotary embedding in float32 op by op and its MLP activation as separate kernels, each
a full pass over tens of MB: ~50 ms a batch on an H100. The Qwen2-VL rotary embedding
and QuickGELU run as the Triton kernels of triton_kernels.py where Triton is installed
(their compiled versions took 17 and 18 ms a batch), QuickGELU inside the epilogue of the
MLP's first product (`linear_quick_gelu`); other towers' functions and activations run
compiled, one kernel each. The rotary function is swapped in the model's
modeling module (the blocks look it up there); activations are wrapped per block around
one shared function of the activation's own class. Falls back to the original ops if
compiling fails. With Triton, each block's residual adds run fused with the LayerNorm that
reads their sum (`fuse_block_norms`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

from inference_worker.engines import triton_kernels
from inference_worker.engines.fused import _maybe_compiled, add_norm

ROTARY = "apply_rotary_pos_emb_vision"
# the attribute of a block's output that carries the next block's normed input
NORMED = "vlmq_normed"
FUSABLE_BLOCKS = ("Qwen2VLVisionBlock",)


def fuse_vision_ops(model: Any) -> bool:
    from torch import nn

    visual = getattr(getattr(model, "model", model), "visual", None)
    blocks = getattr(visual, "blocks", None)
    if not blocks:
        return False
    modeling = importlib.import_module(type(blocks[0]).__module__)
    on_triton = triton_kernels.available() and next(visual.parameters()).device.type == "cuda"
    rotary = getattr(modeling, ROTARY, None)
    if rotary is not None and not getattr(rotary, "vlmq_fused", False):
        # the module-level function serves every model of this architecture in the process
        fused = _maybe_compiled(rotary, True)
        triton_rotary = modeling.__name__.endswith(".modeling_qwen2_vl") and triton_kernels.available()

        def rotary_fn(q, k, cos, sin):
            if triton_rotary and q.is_cuda:
                return triton_kernels.rotary_vision(q, k, cos, sin)
            return fused(q, k, cos, sin)

        rotary_fn.vlmq_fused = True  # type: ignore[attr-defined]
        rotary_fn.original = rotary  # type: ignore[attr-defined]
        setattr(modeling, ROTARY, rotary_fn)

    class FusedActivation(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    shared: dict = {}
    for blk in blocks:
        if on_triton and _quick_gelu_mlp(blk.mlp):
            blk.mlp.forward = _fused_mlp(blk.mlp)
            continue
        for name in ("act", "act_fn"):
            act = getattr(blk.mlp, name, None)
            if act is None or isinstance(act, FusedActivation) or any(True for _ in act.parameters()):
                continue
            kind = type(act)
            if kind not in shared:
                sample = act  # activations hold no state: one instance serves every block
                if on_triton and kind.__name__ == "QuickGELUActivation":
                    shared[kind] = triton_kernels.quick_gelu
                else:
                    shared[kind] = _maybe_compiled(lambda x, _a=sample: type(_a).forward(_a, x), True)
            setattr(blk.mlp, name, FusedActivation(shared[kind]))
    if on_triton:
        fuse_block_norms(blocks, add_norm)
    return True


def _quick_gelu_mlp(mlp: Any) -> bool:
    """Qwen2-VL's vision MLP: fc2(QuickGELU(fc1(x)))."""
    return (
        type(mlp).__name__ == "VisionMlp"
        and type(getattr(mlp, "act", None)).__name__ == "QuickGELUActivation"
        and all(hasattr(mlp, n) for n in ("fc1", "fc2"))
    )


def _fused_mlp(mlp: Any) -> Callable:
    def forward(x: Any) -> Any:
        return mlp.fc2(triton_kernels.linear_quick_gelu(x, mlp.fc1.weight, mlp.fc1.bias))

    return forward


def _fits(block: Any) -> bool:
    """A pre-norm block as Qwen2-VL's: x + attn(norm1(x)), then x + mlp(norm2(x)), LayerNorms."""
    from torch import nn

    norms = [getattr(block, n, None) for n in ("norm1", "norm2")]
    return (
        all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms)
        and type(block).__name__ in FUSABLE_BLOCKS
    )


def fuse_block_norms(blocks: Sequence[Any], adder: Callable[[Any, Any, Any], Any]) -> bool:
    """Run each block's residual adds fused with the LayerNorm after them: norm2 in the
    block, and the next block's norm1 at its end. transformers' loop passes only the hidden
    states from block to block, so a block hands the next one its normed input as an
    attribute of its output, tagged with the norm that made it; a block whose input lacks
    it (the first, or one called out of order) norms its input itself. `adder(h, delta,
    norm)` returns (h + delta, norm(h + delta)): fused.add_norm."""
    if not blocks or not all(_fits(b) for b in blocks):
        return False
    for i, blk in enumerate(blocks):
        nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else None
        blk.forward = _fused_forward(blk, nxt, adder)
    return True


def _fused_forward(blk: Any, next_norm: Any, adder: Callable[[Any, Any, Any], Any]) -> Callable:
    def forward(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        normed = getattr(hidden_states, NORMED, None)
        x = normed[1] if normed is not None and normed[0] is blk.norm1 else blk.norm1(hidden_states)
        h, x = adder(hidden_states, blk.attn(x, *args, **kwargs), blk.norm2)
        delta = blk.mlp(x)
        if next_norm is None:
            return h + delta
        h, x = adder(h, delta, next_norm)
        setattr(h, NORMED, (next_norm, x))
        return h

    return forward
