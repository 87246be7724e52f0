"""CUDA-graph replay of the expert: context projection + all Euler steps as one graph.

Eager, the 10 Euler steps of an 8-block expert launch ~1,500 small kernels, and at batch 1
the GPU waits on the launches, not on arithmetic. A graph per (batch, context length)
shape replays them with one launch. Context lengths are padded up to a multiple of
`bucket` tokens (masked, so the result is the same) to keep the number of graphs small;
the least recently used graph is dropped past `max_graphs`. Guided (RTC) sampling needs
autograd and stays eager. Capture and replay go through engines/cuda_graphs.py.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from inference_worker.engines.cuda_graphs import Graph, GraphCache
from inference_worker.vla.expert import FlowMatchingExpert
from inference_worker.vla.flow import euler_sample


class _Graph:
    def __init__(
        self, expert: FlowMatchingExpert, steps: int, B: int, L: int, D: int, dtype, device, pool
    ) -> None:
        cfg = expert.cfg
        self.feats = torch.zeros(B, L, D, dtype=dtype, device=device)
        self.ids = torch.zeros(B, L, dtype=torch.long, device=device)
        self.mask = torch.zeros(B, L, dtype=torch.bool, device=device)
        self.mask[:, 0] = True
        self.noise = torch.zeros(B, cfg.chunk_size, cfg.action_dim, device=device)
        self.state = torch.zeros(B, max(cfg.state_dim, 1), device=device)

        def fn() -> torch.Tensor:
            state = self.state if cfg.state_dim else None
            ctx = expert.prepare(self.feats, self.ids, self.mask, state)
            return euler_sample(expert, ctx, self.noise, steps)

        self.graph = Graph(fn, pool)

    def run(self, feats, ids, mask, noise, state) -> torch.Tensor:
        L = feats.shape[1]
        self.feats.zero_()
        self.mask.zero_()
        self.ids.zero_()
        self.feats[:, :L].copy_(feats)
        self.ids[:, :L].copy_(ids)
        self.mask[:, :L].copy_(mask)
        self.noise.copy_(noise)
        if state is not None:
            self.state.copy_(state)
        return self.graph.replay().clone()


class GraphedSampler:
    def __init__(
        self, expert: FlowMatchingExpert, steps: int, bucket: int = 64, max_graphs: int = 16
    ) -> None:
        self.expert, self.steps = expert, steps
        self.bucket = bucket
        self.graphs = GraphCache(max_graphs)
        self.stats: Dict[str, int] = {"replayed": 0}

    def __call__(
        self,
        feats: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        state: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, L, D = feats.shape
        Lb = -(-L // self.bucket) * self.bucket
        g = self.graphs.get(
            (B, Lb), lambda pool: _Graph(self.expert, self.steps, B, Lb, D, feats.dtype, feats.device, pool)
        )
        self.stats["replayed"] += 1
        return g.run(feats, ids, mask, noise, state)
