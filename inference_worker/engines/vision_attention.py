"""Vision-tower attention batched across images.

With SDPA, transformers' Qwen-VL vision attention runs one attention call per image per
layer (it splits the packed sequence at `cu_seqlens`): 128 frames x 32 layers = 4,096
small calls per batch. Flash-attention kernels take the packed sequence directly, but
they are not installed here. This function is registered as an attention implementation
whose name contains "flash", so the vision blocks hand it the packed sequence and
`cu_seqlens`; it gathers segments of equal length (frames of one size) into one batched
SDPA call per length. Only the vision tower uses it; the language model keeps SDPA.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

NAME = "vlmq_flash_packed_sdpa"


def packed_sdpa(
    module: Any,
    query,
    key,
    value,
    attention_mask=None,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    cu_seq_lens_q=None,
    **kwargs: Any,
) -> Tuple[Any, None]:
    """query/key/value: (1, heads, tokens, dim) packed; returns (1, tokens, heads, dim)."""
    import torch
    import torch.nn.functional as F

    _, heads, total, dim = query.shape
    segments = 1 if cu_seq_lens_q is None else cu_seq_lens_q.shape[0] - 1
    longest = kwargs.get("max_length_q")
    if isinstance(longest, int) and segments * longest == total:
        # frames of one size: the packed sequence is already (segments, length) in order, so
        # a view batches it, with no index copies and no read of cu_seqlens (no GPU sync)
        q, k, v = (x[0].view(heads, segments, longest, dim).transpose(0, 1) for x in (query, key, value))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        return o.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None
    bounds = [0, total] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    out = query.new_empty(heads, total, dim)
    by_length: dict = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        idx = torch.tensor(starts, device=query.device)[:, None] + torch.arange(length, device=query.device)
        idx = idx.reshape(-1)
        n = len(starts)
        # (heads, n*length, dim) -> (n, heads, length, dim): one attention batch per length
        q, k, v = (
            x[0].index_select(1, idx).reshape(heads, n, length, dim).transpose(0, 1).contiguous()
            for x in (query, key, value)
        )
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        out.index_copy_(1, idx, o.transpose(0, 1).reshape(heads, n * length, dim))
    return out.transpose(0, 1).unsqueeze(0), None


def use_packed_vision_attention(model: Any) -> bool:
    """Route the vision tower's attention through `packed_sdpa`; False if the model has no
    vision tower on SDPA (e.g. real flash-attention is already in use)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa)
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is None or visual.config._attn_implementation not in (None, "sdpa", "eager"):
        return False
    visual.config._attn_implementation = NAME
    return True
