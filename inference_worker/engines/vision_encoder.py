"""Images -> image-token embeddings, with no GPU->CPU sync inside the vision tower.

transformers' vision forward derives `cu_seqlens`, the longest segment and the patch
positions from `image_grid_thw` on every call, reading it back from the GPU; it also
accepts them precomputed. For the Qwen2-VL tower this module computes them on the CPU
from the grids the input builder already knows (once per distinct set of grids), so a
batch of frames runs as one stream of kernels: the CPU can queue the whole tower ahead
of the GPU, and the pass can be captured in a CUDA graph (vla/feature_graphs.py). Other
towers (Qwen2.5-VL windows, Qwen3-VL deepstack) take transformers' path unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Sequence, Tuple

Grid = Tuple[int, int, int]

PRECOMPUTABLE = ("Qwen2VisionTransformerPretrainedModel",)


class VisionEncoder:
    def __init__(self, model: Any, max_plans: int = 32) -> None:
        self.model = model
        self.visual = model.model.visual
        from inference_worker.engines.vision_attention import NAME

        # cu_seqlens stays on the CPU, which only our attention function accepts (real
        # flash-attention kernels want it on the GPU)
        self.sync_free = (
            type(self.visual).__name__ in PRECOMPUTABLE and self.visual.config._attn_implementation == NAME
        )
        self.merge = int(self.visual.spatial_merge_size)
        self.max_plans = max_plans
        self._plans: OrderedDict[Tuple[Grid, ...], Dict[str, Any]] = OrderedDict()

    def __call__(self, pixel_values: Any, grids: Sequence[Grid], grid_thw: Any) -> Any:
        """(sum of image tokens, hidden) for images with patch grids `grids` (t, h, w), in order."""
        visual = self.visual
        pixel_values = pixel_values.type(visual.dtype)
        if not self.sync_free:
            return self._stock(pixel_values, grid_thw)
        import torch

        out = visual(
            pixel_values,
            grid_thw=torch.tensor(grids, dtype=torch.long),
            **self.plan(grids, pixel_values.device),
        )
        return out.pooler_output

    def _stock(self, pixel_values: Any, grid_thw: Any) -> Any:
        import torch

        feats = self.model.model.get_image_features(pixel_values, grid_thw)
        return torch.cat(list(feats.pooler_output), dim=0)

    def plan(self, grids: Sequence[Grid], device: Any) -> Dict[str, Any]:
        """cu_seqlens (on the CPU: the attention function reads only its shape when every
        frame has one size), the longest segment, and the rotary patch positions."""
        grids = tuple(tuple(int(x) for x in g) for g in grids)
        plan = self._plans.get(grids)
        if plan is None:
            import torch
            import torch.nn.functional as F
            from transformers.vision_utils import get_vision_position_ids

            grid = torch.tensor(grids, dtype=torch.long)
            lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            plan = dict(
                cu_seqlens=cu,
                max_seqlen=int(lengths.max()),
                position_ids=get_vision_position_ids(grid, self.merge).to(device),
            )
            self._plans[grids] = plan
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        self._plans.move_to_end(grids)
        return dict(plan)  # the forward pops what it uses


def has_deepstack(model: Any) -> bool:
    """Qwen3-VL feeds features of intermediate vision layers into early text layers."""
    vision = getattr(model.config, "vision_config", None)
    return bool(getattr(vision, "deepstack_visual_indexes", None))
