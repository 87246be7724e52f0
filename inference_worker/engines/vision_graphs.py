"""The chat prompt pass's vision tower per frame-count bucket, replayed as a CUDA graph.

A profile of the served 2B chat load on an H100 (docs/BENCHMARKS.md, "Chat throughput")
found the model thread spending ~15% of its time launching the vision tower's kernels one
by one for prompt groups of ~32-42 frames, time in which it does nothing else. When every
image of a group has one patch grid (a simulator's frames all have one size), the tower's
work depends only on the number of frames, so the group is padded to a bucket of frames
(decoder.py's BUCKETS) and the bucket's pass is captured once and replayed with one
launch. Frames are independent through the tower (attention runs within a frame, the
merger within a frame's patches), so the padding frames change nothing of the real ones;
their rows are cut off. Other groups (several sizes, video grids, more than `max_frames`)
run eagerly as before. `padded` mode runs the same padded shapes eagerly: what the CPU
tests run, and what a graph is compared with.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from inference_worker.engines.cuda_graphs import Graph, GraphCache
from inference_worker.engines.decoder import bucket
from inference_worker.engines.vision_encoder import Grid, VisionEncoder

MODES = ("off", "on", "padded")


class _Entry:
    def __init__(self, encoder: VisionEncoder, grid: Grid, frames: int, pixels: Any, pool: Any) -> None:
        self.grids = [grid] * frames
        self.pixels = pixels.new_zeros((frames * grid[1] * grid[2], pixels.shape[1]))
        # the captured kernels read the plan's tensors by address: hold them
        self.plan = encoder.plan(self.grids, pixels.device)
        self.graph = Graph(lambda: encoder(self.pixels, self.grids, None), pool)


class VisionGraphs:
    def __init__(
        self, encoder: VisionEncoder, mode: str, max_frames: int = 128, max_graphs: int = 16
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"vision_graphs={mode!r}: choose one of {', '.join(MODES)}")
        self.encoder, self.mode, self.max_frames = encoder, mode, max_frames
        self.graphs: Optional[GraphCache] = GraphCache(max_graphs) if mode == "on" else None

    @property
    def captured(self) -> int:
        return self.graphs.captured if self.graphs is not None else 0

    def __call__(self, pixel_values: Any, grids: Sequence[Grid], grid_thw: Any) -> Any:
        """(image tokens, hidden) of the images, as `VisionEncoder` gives them."""
        key = self._bucket(grids)
        if self.mode == "off" or key is None or not self.encoder.sync_free:
            return self.encoder(pixel_values, grids, grid_thw)
        grid, frames = key
        n = len(grids)
        tokens = n * grid[1] * grid[2] // self.encoder.merge**2
        if self.graphs is None:  # padded, eager
            pad = pixel_values.new_zeros(((frames - n) * grid[1] * grid[2], pixel_values.shape[1]))
            return self.encoder(_cat(pixel_values, pad), [grid] * frames, None)[:tokens]
        entry = self.graphs.get(key, lambda pool: _Entry(self.encoder, grid, frames, pixel_values, pool))
        entry.pixels[: pixel_values.shape[0]].copy_(pixel_values)
        return entry.graph.replay()[:tokens].clone()

    def _bucket(self, grids: Sequence[Grid]) -> Optional[Tuple[Grid, int]]:
        """(the one grid, frames padded to a bucket), or None where the group can't be padded."""
        if not grids or len(grids) > self.max_frames:
            return None
        grid = tuple(int(x) for x in grids[0])
        if grid[0] != 1 or any(tuple(int(x) for x in g) != grid for g in grids):
            return None
        return grid, min(bucket(len(grids)), self.max_frames)  # type: ignore[return-value]


def _cat(a: Any, b: Any) -> Any:
    import torch

    return torch.cat([a, b]) if b.shape[0] else a
