"""CUDA-graph replay of the VLM feature pass (vision tower + first k decoder layers).

At small batches the pass is ~700 kernels (32 vision blocks, k text layers) and the GPU
waits on their launches: eager, one 392-px frame took 70-80 ms on an H100 whose compute
for it is a few ms. The pass has no GPU->CPU sync (engines/vision_encoder.py), so it is
captured once per (batch, padded prompt length, image grids) and replayed with one
launch. Prompts are left-padded to a multiple of `length_step` tokens so instructions
of slightly different lengths share a graph; padding is masked, so features are equal.
Batches above `max_batch` run eagerly. Capture and replay go through engines/cuda_graphs.py.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from inference_worker.engines.cuda_graphs import Graph, GraphCache


class _Graph:
    def __init__(self, extractor: Any, batch: Any, width: int, pool: Any) -> None:
        stack, dev = extractor.stack, extractor.device
        b = batch.batch
        self.width = width
        self.grids = list(batch.grids)
        self.ids = torch.zeros((b, width), dtype=torch.long, device=dev)
        self.mask = torch.zeros((b, width), dtype=torch.long, device=dev)
        self.pos = torch.zeros((3, b, width), dtype=torch.long, device=dev)
        self.pixels = torch.zeros_like(batch.pixel_values)
        self.index = torch.zeros_like(batch.image_index)
        self.cache = stack.new_cache(b, width, layers=extractor.layer)
        # the captured kernels read the plan's tensors by address: hold them
        self.plan = extractor.vision.plan(self.grids, dev)
        self.load(batch)

        def run() -> torch.Tensor:
            feats = extractor.vision(self.pixels, self.grids, None)
            h = stack.input_embeddings(self.ids, feats, self.index)
            return stack.prefill(self.cache, h, self.pos, self.mask, layers=extractor.layer)

        self.graph = Graph(run, pool)

    def load(self, batch: Any) -> None:
        s = batch.length
        pad = self.width - s
        self.ids.zero_()
        self.ids[:, pad:].copy_(batch.input_ids)
        self.mask.zero_()
        self.mask[:, pad:].copy_(batch.attention_mask)
        self.pos.zero_()
        self.pos[:, :, pad:].copy_(batch.position_ids)
        self.pixels.copy_(batch.pixel_values)
        idx = batch.image_index
        self.index.copy_(idx // s * self.width + idx % s + pad)

    def run(self, batch: Any) -> torch.Tensor:
        self.load(batch)
        return self.graph.replay()[:, self.width - batch.length :].clone()


class FeatureGraphs:
    def __init__(
        self, extractor: Any, max_batch: int = 64, length_step: int = 16, max_graphs: int = 24
    ) -> None:
        self.extractor = extractor
        self.max_batch, self.length_step = max_batch, length_step
        # one memory pool for all graphs: they never run at once, and each result is
        # copied out before the next replay
        self.graphs = GraphCache(max_graphs)

    @property
    def captured(self) -> int:
        return self.graphs.captured

    def __call__(self, batch: Any) -> Optional[torch.Tensor]:
        """Hidden states (B, S, hidden) by graph replay, or None where a graph does not apply."""
        if batch.batch > self.max_batch or batch.pixel_values is None:
            return None
        width = -(-batch.length // self.length_step) * self.length_step
        key = (batch.batch, width, tuple(tuple(g) for g in batch.grids))
        g = self.graphs.get(key, lambda pool: _Graph(self.extractor, batch, width, pool))
        return g.run(batch)
