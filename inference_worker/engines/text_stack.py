"""The language model's decoder layers run over a `KVCache`, with plain tensor ops.

transformers' own forward builds masks and cache updates with Python logic per call;
here every step is a fixed sequence of tensor ops on fixed shapes, so it can be captured
in a CUDA graph (decode) and batched over candidates (scoring). It reuses the model's own
modules (projections, norms, MLPs, rotary embedding, rope function): only the attention
plumbing is written here. New tokens are text, so the three M-RoPE axes share one
position and no vision or deepstack input is needed after the prefill.
tests/test_models_text_stack.py checks it against the model's full forward.
"""

from __future__ import annotations

from typing import Any

from inference_worker.engines.kv_cache import KVCache


class TextStack:
    def __init__(self, model: Any) -> None:
        import importlib

        lm = model.model.language_model
        self.model = model
        self.layers = list(lm.layers)
        self.norm = lm.norm
        self.embed = lm.embed_tokens
        self.rotary = lm.rotary_emb
        self.lm_head = model.lm_head
        cfg = lm.config
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        modeling = importlib.import_module(type(self.layers[0]).__module__)
        self.apply_rope = modeling.apply_rotary_pos_emb
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.empty(
            len(self.layers), batch, self.kv_heads, capacity, self.head_dim, self.dtype, self.device
        )

    def forward(self, cache: KVCache, tokens, positions, start) -> Any:
        """Run `tokens` (B, T) at rope `positions` (B, T), writing cache columns start..start+T-1
        (`start`: 0-dim long tensor); returns logits (B, T, vocab) in float32."""
        import torch

        b, t = tokens.shape
        cols = start + torch.arange(t, device=tokens.device)
        cache.mask.index_fill_(1, cols, True)
        causal = torch.arange(cache.capacity, device=tokens.device)[None, :] <= cols[:, None]  # (T, cap)
        allowed = (cache.mask[:, None, :] & causal[None]).unsqueeze(1)  # (B, 1, T, cap)

        h = self.embed(tokens)
        cos, sin = self.rotary(h, positions.unsqueeze(0).expand(3, b, t))
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, -1, self.head_dim)
            k = attn.k_proj(x).view(b, t, -1, self.head_dim)
            v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            cache.keys[i].index_copy_(2, cols, k)
            cache.values[i].index_copy_(2, cols, v)
            o = grouped_attention(q, cache.keys[i], cache.values[i], allowed, attn.scaling)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h)).float()


def grouped_attention(q, k, v, allowed, scale: float):
    """Attention of q (B, H, T, D) over a GQA cache k, v (B, KV, S, D), mask (B, 1, T, S).

    The H/KV query heads that share a KV head are folded into the query length, so one
    SDPA call reads each cached key and value once; expanding the cache to H heads (what
    `enable_gqa` falls back to with a mask) copies it H/KV times per layer and step.
    """
    import torch.nn.functional as F

    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    qg = q.reshape(b, kv, g * t, d)  # query head i reads KV head i // g, as transformers' repeat_kv
    mask = allowed.unsqueeze(2).expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(b, h, t, d)
