"""CUDA-graph capture and replay, the one way every captured path of the worker does it.

A graph replays a fixed sequence of kernels on fixed addresses with one launch: the
decode step, the VLA feature pass and the expert's Euler steps are each hundreds of small
kernels whose launches, not arithmetic, set their time at small batches. A captured
function reads its inputs from tensors it closed over and returns tensors that every
replay overwrites; callers copy new inputs in, replay, and read (or copy out) the
outputs before the next replay of any graph of the same `GraphCache` (they share one
memory pool, so they must never run at the same time).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class Graph:
    """`fn` captured: `replay()` reruns it and returns the same output tensors."""

    def __init__(self, fn: Callable[[], Any], pool: Any = None, warmup: int = 2) -> None:
        import torch

        # warm-up runs on a side stream: kernel selection, compilation and the allocator's
        # first requests must not happen inside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
            self.output = fn()

    def replay(self) -> Any:
        self.graph.replay()
        return self.output


class GraphCache:
    """Graphs by key, made on first use, least recently used dropped past `max_graphs`;
    all share one memory pool."""

    def __init__(self, max_graphs: int = 16) -> None:
        import torch

        self.max_graphs = max_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: OrderedDict[Hashable, Any] = OrderedDict()
        self.captured = 0

    def get(self, key: Hashable, make: Callable[[Any], Any]) -> Any:
        """The entry for `key`; `make(pool)` builds it (an object holding a `Graph`)."""
        entry = self.graphs.get(key)
        if entry is None:
            entry = make(self.pool)
            self.captured += 1
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return entry

    def __contains__(self, key: Hashable) -> bool:
        return key in self.graphs

    def __len__(self) -> int:
        return len(self.graphs)
