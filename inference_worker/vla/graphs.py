"""CUDA-graph replay of the expert: context projection + all Euler steps as one graph.

Eager, the 10 Euler steps of an 8-block expert launch ~1,500 small kernels, and at batch 1
the GPU waits on the launches, not on arithmetic. A graph per (batch, context length)
shape replays them with one launch. Batches are padded up to a batch bucket (the decode graphs'
buckets: served batch sizes vary from batch to batch) and context lengths up to a multiple
of `length_step` tokens (masked, so the result is the same) to keep the number of graphs small;
the least recently used graph is dropped past `max_graphs`. Guided (RTC) sampling needs
autograd and stays eager. Capture and replay go through engines/cuda_graphs.py.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from inference_worker.engines.cuda_graphs import Graph, GraphCache
from inference_worker.engines.decoder import bucket
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
        self, expert: FlowMatchingExpert, steps: int, length_step: int = 64, max_graphs: int = 48
    ) -> None:
        self.expert, self.steps = expert, steps
        self.length_step = length_step
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
        Lb = -(-L // self.length_step) * self.length_step
        Bb = bucket(B)  # a graph per batch bucket: rows past B replay with the last row's inputs
        if Bb != B:
            pad = Bb - B

            def more(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                return None if x is None else torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])

            feats, ids, mask, noise, state = (more(x) for x in (feats, ids, mask, noise, state))
        g = self.graphs.get(
            (Bb, Lb), lambda pool: _Graph(self.expert, self.steps, Bb, Lb, D, feats.dtype, feats.device, pool)
        )
        self.stats["replayed"] += 1
        return g.run(feats, ids, mask, noise, state)[:B]
