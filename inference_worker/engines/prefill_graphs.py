"""The chat prompt pass's text layers per (rows bucket, width bucket), replayed as a CUDA graph.

The prompt pass of a small prefill group is ~400 kernels of the text layers (plus the vision
tower's, vision_graphs.py) launched one by one from Python, and in served chat the groups
are small: a group goes once its oldest prompt has waited `max_wait_ms`. The GPU then waits
on the launches, and the model thread does nothing else meanwhile. Here a group's prompts
are left-padded to a width bucket (a multiple of `width_step` columns) and its rows to a
rows bucket (decoder.py's BUCKETS), and the text layers over those shapes are captured once
and replayed with one launch. Padding is masked (a padding position attends to itself
alone), so the real rows' keys, values and last logits are those of the unpadded pass.

A captured pass writes keys and values to fixed addresses: a staging cache (one flat
buffer of `max_tokens` columns, viewed at each bucket's shape), copied into the group's
decode slots after the replay. The group then decodes from column `width` (the bucket's),
which the engine hands to the decoder, so the padding takes up to `width_step` - 1
columns from the room a slot leaves for the answer. Groups wider than half a slot run
eagerly (their prompt pass is long enough that launches don't matter, and their answers
keep all their room), and so do groups past `max_tokens` padded tokens. `padded` runs the
same padded shapes eagerly: what the CPU tests run, and what a graph is compared with.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, List, Optional, Tuple

from inference_worker.engines.cuda_graphs import Graph, GraphCache
from inference_worker.engines.decoder import bucket
from inference_worker.engines.kv_cache import KVCache
from inference_worker.engines.text_stack import TextStack

MODES = ("off", "on", "padded")


class _Inputs:
    """A bucket's padded inputs and its view of the staging cache."""

    def __init__(self, staging: KVCache, stack: TextStack, rows: int, width: int, hidden: int) -> None:
        import torch

        dev = stack.device
        self.embeds = torch.zeros((rows, width, hidden), dtype=stack.dtype, device=dev)
        self.positions = torch.zeros((3, rows, width), dtype=torch.long, device=dev)
        self.mask = torch.zeros((rows, width), dtype=torch.long, device=dev)
        layers, kv, hd = staging.store.shape[0], staging.store.shape[2], staging.store.shape[4]
        flat = staging.store.view(-1)[: layers * rows * kv * width * hd]
        self.cache = KVCache(
            flat.view(layers, rows, kv, width, hd), staging.mask.view(-1)[: rows * width].view(rows, width)
        )

    def load(self, embeds: Any, positions: Any, attention_mask: Any) -> None:
        b, t = attention_mask.shape
        pad = self.mask.shape[1] - t
        for static, value in ((self.embeds, embeds), (self.mask, attention_mask)):
            static.zero_()
            static[:b, pad:].copy_(value)
        self.positions.zero_()
        self.positions[:, :b, pad:].copy_(positions)


class _Entry:
    def __init__(self, stack: TextStack, inputs: _Inputs, pool: Any) -> None:
        self.inputs = inputs
        self.graph = Graph(
            lambda: stack.prefill(inputs.cache, inputs.embeds, inputs.positions, inputs.mask), pool
        )


class PrefillGraphs:
    def __init__(
        self,
        stack: TextStack,
        mode: str,
        width_step: int = 16,
        max_tokens: int = 8192,
        max_graphs: int = 24,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"prefill_graphs={mode!r}: choose one of {', '.join(MODES)}")
        if width_step < 1:
            raise ValueError(f"prefill_width_step={width_step}: it must be at least 1")
        self.stack, self.mode = stack, mode
        self.width_step, self.max_tokens = width_step, max_tokens
        self.graphs: Optional[GraphCache] = GraphCache(max_graphs) if mode == "on" else None
        self._staging: Optional[KVCache] = None

    @property
    def captured(self) -> int:
        return self.graphs.captured if self.graphs is not None else 0

    def __call__(self, cache: KVCache, embeds: Any, positions: Any, attention_mask: Any) -> Tuple[Any, int]:
        """The prompts' keys and values into rows [0, B) of `cache`, as `TextStack.prefill`;
        returns (the logits of each last token, the column their decoding starts at)."""
        b, t = attention_mask.shape
        width = self._width(t)
        rows = bucket(b) if bucket(b) * width <= self.max_tokens else b
        if self.mode == "off" or rows * width > self.max_tokens or 2 * width > cache.capacity:
            return self.stack.prefill(cache, embeds, positions, attention_mask), t
        if self.graphs is None:  # padded, eager
            inputs = _Inputs(self._stage(), self.stack, rows, width, embeds.shape[-1])
            inputs.load(embeds, positions, attention_mask)
            logits = self.stack.prefill(inputs.cache, inputs.embeds, inputs.positions, inputs.mask)
        else:
            entry = self.graphs.get(
                (rows, width),
                lambda pool: _Entry(
                    self.stack, _Inputs(self._stage(), self.stack, rows, width, embeds.shape[-1]), pool
                ),
            )
            inputs = entry.inputs
            inputs.load(embeds, positions, attention_mask)
            logits = entry.graph.replay()
        cache.store[:, :b, :, :width].copy_(inputs.cache.store[:, :b])
        cache.mask[:b].zero_()
        cache.mask[:b, :width].copy_(inputs.cache.mask[:b])
        return logits[:b].clone(), width

    def pieces(self, n: int, tokens: int) -> List[int]:
        """The sizes of the consecutive pieces a group of `n` prompts of up to `tokens` tokens
        is prefilled in, each its own pass (the vision tower's frames are bucketed the same
        way, vision_graphs.py). Padding a group to its rows bucket computes the padding rows
        in full (17 prompts padded to 24 cost 7 prompts more); a pass costs its rows, at
        least 1.5 prompts' worth (a small pass is bound by reading the weights: a 2B model's
        3 GB against ~0.7 ms of arithmetic a prompt), plus 0.25 for its launches. The split
        cheapest by that measure: 17 = 16 + 1, 5 = 4 + 1, 23 stays 24 rows. Estimates from
        an H100 profile (docs/BENCHMARKS.md), not measured split against padded yet."""
        if self.mode == "off":
            return [n]
        return list(_split(n, self._width(tokens), self.max_tokens))

    def _width(self, tokens: int) -> int:
        """A group's padded width: its longest prompt rounded up to the width step."""
        return -(-tokens // self.width_step) * self.width_step

    def _stage(self) -> KVCache:
        """The staging cache: `max_tokens` columns of every layer, viewed per bucket."""
        if self._staging is None:
            self._staging = self.stack.new_cache(1, self.max_tokens)
        return self._staging


@lru_cache(maxsize=1024)
def _split(n: int, width: int, max_tokens: int) -> Tuple[int, ...]:
    def cost(p: int) -> float:
        rows = bucket(p)
        if rows * width > max_tokens:  # run eagerly at its own size: the launches cost more
            return p + 2.0
        return max(rows, 1.5) + 0.25

    best, last = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for m in range(1, n + 1):
        for p in range(1, m + 1):
            c = best[m - p] + cost(p)
            if c < best[m]:
                best[m], last[m] = c, p
    out: List[int] = []
    while n:
        out.append(last[n])
        n -= last[n]
    return tuple(sorted(out, reverse=True))
