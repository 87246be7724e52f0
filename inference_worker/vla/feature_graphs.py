"""CUDA-graph replay of the VLM feature pass, in two halves.

At small batches the pass is ~700 kernels (32 vision blocks, k text layers) and the GPU
waits on their launches: eager, one 392-px frame took 70-80 ms on an H100 whose compute
for it is a few ms. The pass has no GPU->CPU sync (engines/vision_encoder.py), so it
replays as two graphs: the frames' half (pixel preparation and vision tower, per frame
count and frame size), queued as soon as the frames are on the device, and the text half
(the first k decoder layers, per batch, padded prompt length and image grids), once the
CPU has built the prompts, which it does while the tower runs. Prompts are left-padded to
a multiple of `length_step` tokens so instructions of slightly different lengths share a
graph; padding is masked, so features are equal. Batches above `max_batch` run eagerly.
All graphs share one memory pool: the frame graph's output is copied into the text
graph's input before any other graph replays (FeatureExtractor.encode keeps that order).
Capture and replay go through engines/cuda_graphs.py.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from inference_worker.engines.cuda_graphs import Graph, GraphCache


class _FrameGraph:
    """uint8 frames (n, H, W, 3) on the device -> the tower's image features."""

    def __init__(self, extractor: Any, frames: Any, pool: Any) -> None:
        self.frames = frames.clone()
        _, grid = extractor.prepare_pixels(self.frames)
        self.grid = grid
        self.grids = [grid] * frames.shape[0]
        # the captured kernels read the plan's tensors by address: hold them
        self.plan = extractor.vision.plan(self.grids, frames.device)

        def run() -> torch.Tensor:
            values, _ = extractor.prepare_pixels(self.frames)
            return extractor.vision(values, self.grids, None)

        self.graph = Graph(run, pool)

    def run(self, frames: Any) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
        self.frames.copy_(frames)
        return self.graph.replay(), self.grid


class _Graph:
    def __init__(self, extractor: Any, batch: Any, feats: Any, width: int, pool: Any) -> None:
        stack, dev = extractor.stack, extractor.device
        b = batch.batch
        self.width = width
        self.ids = torch.zeros((b, width), dtype=torch.long, device=dev)
        self.mask = torch.zeros((b, width), dtype=torch.long, device=dev)
        self.pos = torch.zeros((3, b, width), dtype=torch.long, device=dev)
        # the captured kernels read their inputs by address: every input is copied in
        self.feats = torch.zeros_like(feats)
        self.index = torch.zeros_like(batch.image_index)
        self.cache = stack.new_cache(b, width, layers=extractor.layer)
        self.load(batch, feats)

        def run() -> torch.Tensor:
            h = stack.input_embeddings(self.ids, self.feats, self.index)
            return stack.prefill(self.cache, h, self.pos, self.mask, layers=extractor.layer)

        self.graph = Graph(run, pool)

    def load(self, batch: Any, feats: Any) -> None:
        s = batch.length
        pad = self.width - s
        self.ids.zero_()
        self.ids[:, pad:].copy_(batch.input_ids)
        self.mask.zero_()
        self.mask[:, pad:].copy_(batch.attention_mask)
        self.pos.zero_()
        self.pos[:, :, pad:].copy_(batch.position_ids)
        self.feats.copy_(feats)
        idx = batch.image_index
        self.index.copy_(idx // s * self.width + idx % s + pad)

    def run(self, batch: Any, feats: Any) -> torch.Tensor:
        self.load(batch, feats)
        return self.graph.replay()[:, self.width - batch.length :].clone()


class FeatureGraphs:
    def __init__(
        self, extractor: Any, max_batch: int = 64, length_step: int = 16, max_graphs: int = 32
    ) -> None:
        self.extractor = extractor
        self.max_batch, self.length_step = max_batch, length_step
        # one memory pool for all graphs: they never run at once, and each result is
        # copied out before the next replay
        self.graphs = GraphCache(max_graphs)

    @property
    def captured(self) -> int:
        return self.graphs.captured

    def image_features(self, frames: Any) -> Optional[Tuple[torch.Tensor, Tuple[int, int, int]]]:
        """(image features, patch grid) of uint8 frames (n, H, W, 3) of one size, by graph
        replay; None above max_batch. The features are the graph's output buffer: use them
        before the next replay."""
        if frames.shape[0] > self.max_batch:
            return None
        key = ("frames", *frames.shape)
        g = self.graphs.get(key, lambda pool: _FrameGraph(self.extractor, frames, pool))
        return g.run(frames)

    def __call__(self, batch: Any, feats: Any) -> Optional[torch.Tensor]:
        """Hidden states (B, S, hidden) of a batch whose image features the tower gave
        (`feats`), by graph replay, or None where a graph does not apply."""
        if batch.batch > self.max_batch or batch.image_index is None:
            return None
        width = -(-batch.length // self.length_step) * self.length_step
        key = (batch.batch, width, tuple(tuple(g) for g in batch.grids))
        g = self.graphs.get(key, lambda pool: _Graph(self.extractor, batch, feats, width, pool))
        return g.run(batch, feats)
