"""A static KV cache: one preallocated (rows, kv_heads, capacity, head_dim) block per layer for
keys and for values, all in one tensor.

Fixed shapes and addresses are what lets a decode step be captured in a CUDA graph, and
what lets one prompt's cache be repeated across its candidate continuations. Each row is
one sequence; `mask` says which columns of its row a sequence may attend to (a prompt
prefilled in a left-padded group starts with masked padding columns). The decode pool
(decoder.py) is one such cache with a row per slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from inference_worker.engines.upload import constant


@dataclass
class KVCache:
    # (2 * layers, B, kv_heads, capacity, head_dim): every layer's keys and values in one
    # tensor, so moving rows is one copy, not one per layer
    store: Any
    mask: Any  # (B, capacity) bool: column holds a real token of that row

    @classmethod
    def empty(
        cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device
    ) -> KVCache:
        import torch

        return cls(
            torch.zeros((2 * layers, batch, kv_heads, capacity, head_dim), dtype=dtype, device=device),
            torch.zeros((batch, capacity), dtype=torch.bool, device=device),
        )

    def __post_init__(self) -> None:
        self.keys: List[Any] = list(
            self.store[0::2].unbind(0)
        )  # per layer: (B, kv_heads, capacity, head_dim)
        self.values: List[Any] = list(self.store[1::2].unbind(0))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def rows(self, n: int) -> KVCache:
        """A view of the first n rows (writes go to this cache)."""
        return self.slice(0, n)

    def slice(self, lo: int, hi: int) -> KVCache:
        """A view of rows [lo, hi) (writes go to this cache)."""
        if lo == 0 and hi == self.batch:
            return self
        return KVCache(self.store[:, lo:hi], self.mask[lo:hi])

    def move_rows(self, dst: Any, src: Any, span: int) -> None:
        """Copy the first `span` columns of rows `src` onto rows `dst` (index tensors of equal
        length; no row is both), with their masks."""
        self.store[:, dst, :, :span] = self.store[:, src, :, :span]
        self.mask[dst] = self.mask[src]

    def load_prefix(self, hf_cache: Any, attention_mask: Any) -> None:
        """Copy a prefill's transformers cache (B, kv_heads, S, D per layer) into columns [0, S)."""
        pairs = layer_tensors(hf_cache)
        s = attention_mask.shape[1]
        b = attention_mask.shape[0]
        for i, (k, v) in enumerate(pairs):
            self.keys[i][:b, :, :s].copy_(k)
            self.values[i][:b, :, :s].copy_(v)
        self.mask[:b].zero_()
        self.mask[:b, :s].copy_(attention_mask.bool())

    def repeat_rows(self, counts: List[int], extra_capacity: int) -> KVCache:
        """A new cache whose row r of self appears counts[r] times, with room for more columns."""
        import torch

        index = torch.repeat_interleave(
            torch.arange(len(counts), device=self.mask.device), constant(counts, self.mask.device)
        )
        cap = self.capacity + extra_capacity
        store = self.store.new_zeros(
            (self.store.shape[0], len(index), *self.store.shape[2:3], cap, self.store.shape[4])
        )
        store[:, :, :, : self.capacity].copy_(self.store.index_select(1, index))
        mask = self.mask.new_zeros((len(index), cap))
        mask[:, : self.capacity].copy_(self.mask.index_select(0, index))
        return KVCache(store, mask)


def layer_tensors(hf_cache: Any) -> List[Any]:
    """(keys, values) per layer from a transformers cache object, across its API versions."""
    layers = getattr(hf_cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(hf_cache.key_cache, hf_cache.value_cache))
