"""The vision tower's elementwise work as single kernels (torch.compile, CUDA).

For 128 frames the 2B vision tower holds 32k patch rows per layer; transformers applies
its rotary embedding in float32 op by op and its MLP activation as separate kernels, each
a full pass over tens of MB: ~50 ms a batch on an H100. The same functions compiled run
as one kernel each. The rotary function is swapped in the model's modeling module (the
blocks look it up there); activations are wrapped per block around one compiled function
of the activation's own class. Falls back to the original ops if compiling fails.
"""

from __future__ import annotations

import importlib
from typing import Any

from inference_worker.engines.fused import _maybe_compiled

ROTARY = "apply_rotary_pos_emb_vision"


def fuse_vision_ops(model: Any) -> bool:
    from torch import nn

    visual = getattr(getattr(model, "model", model), "visual", None)
    blocks = getattr(visual, "blocks", None)
    if not blocks:
        return False
    modeling = importlib.import_module(type(blocks[0]).__module__)
    rotary = getattr(modeling, ROTARY, None)
    if rotary is not None and not getattr(rotary, "vlmq_fused", False):
        fused = _maybe_compiled(rotary, True)
        fused.vlmq_fused = True  # type: ignore[attr-defined]
        setattr(modeling, ROTARY, fused)

    class FusedActivation(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    shared: dict = {}
    for blk in blocks:
        for name in ("act", "act_fn"):
            act = getattr(blk.mlp, name, None)
            if act is None or isinstance(act, FusedActivation) or any(True for _ in act.parameters()):
                continue
            kind = type(act)
            if kind not in shared:
                sample = act  # activations hold no state: one instance serves every block
                shared[kind] = _maybe_compiled(lambda x, _a=sample: type(_a).forward(_a, x), True)
            setattr(blk.mlp, name, FusedActivation(shared[kind]))
    return True
