"""Running one decode step of the `TextStack`: eagerly, or by replaying a captured CUDA graph.

Decoding a 2B model is bound by launch overhead, not by the GPU: a step is ~400 small
kernels, ~18 ms from Python at any batch size. A CUDA graph replays all of them with one
launch. Graphs need fixed shapes and addresses, so each (batch bucket, cache capacity)
gets its own preallocated cache and graph, made on first use and kept (least recently
used first out). Rows past the real batch are idle padding.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Tuple

from inference_worker.engines.kv_cache import KVCache
from inference_worker.engines.text_stack import TextStack


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two at or above n."""
    b = max(1, minimum)
    while b < n:
        b *= 2
    return b


class EagerSteps:
    """Plain PyTorch calls; a cache exactly as large as asked for."""

    def __init__(self, stack: TextStack) -> None:
        self.stack = stack

    def open(self, batch: int, capacity: int) -> KVCache:
        return self.stack.new_cache(batch, capacity)

    def step(self, cache: KVCache, tokens: Any, positions: Any, start: int) -> Any:
        import torch

        start_t = torch.tensor(start, device=tokens.device)
        return self.stack.forward(cache, tokens[:, None], positions[:, None], start_t)[:, -1]


@dataclass
class _Graph:
    cache: KVCache
    tokens: Any  # (Bb, 1) long
    positions: Any  # (Bb, 1) long
    start: Any  # 0-dim long
    logits: Any  # (Bb, 1, vocab) float32
    graph: Any


class GraphSteps:
    """One CUDA graph per (batch bucket, capacity bucket)."""

    def __init__(self, stack: TextStack, capacity_step: int = 256, max_graphs: int = 6) -> None:
        import torch

        self.stack = stack
        self.capacity_step = capacity_step
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Tuple[int, int], _Graph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def _key(self, batch: int, capacity: int) -> Tuple[int, int]:
        step = self.capacity_step
        return bucket(batch), (capacity + step - 1) // step * step

    def open(self, batch: int, capacity: int) -> KVCache:
        key = self._key(batch, capacity)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(*key)
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return g.cache

    def _capture(self, batch: int, capacity: int) -> _Graph:
        import torch

        dev = self.stack.device
        cache = self.stack.new_cache(batch, capacity)
        tokens = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        positions = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        start = torch.tensor(capacity - 1, device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm up kernels and the allocator outside the capture
                self.stack.forward(cache, tokens, positions, start)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            logits = self.stack.forward(cache, tokens, positions, start)
        cache.mask.zero_()
        self.captures += 1
        return _Graph(cache, tokens, positions, start, logits, graph)

    def step(self, cache: KVCache, tokens: Any, positions: Any, start: int) -> Any:
        g = self.graphs[self._key(cache.batch, cache.capacity)]
        assert g.cache is cache, "a graph step must use the cache its graph was captured with"
        b = tokens.shape[0]
        g.tokens[:b, 0].copy_(tokens)
        g.positions[:b, 0].copy_(positions)
        g.start.fill_(start)
        g.graph.replay()
        return g.logits[:b, 0]
