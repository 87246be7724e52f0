"""The language model's decoder layers run over a `KVCache`, with plain tensor ops.

transformers' own forward builds masks and cache updates with Python logic per call;
here every step is a fixed sequence of tensor ops on fixed shapes, so it can be captured
in a CUDA graph (decode, the VLA feature pass) and batched over candidates (scoring). It
uses the model's own weights, projections and rotary embedding; norms, rope and SwiGLU
are the fused.py functions (transformers' arithmetic, fewer kernels), the q/k/v and
gate/up projections run as one GEMM each (fused_linear.py), and the attention
plumbing is here (a decode step's, on CUDA, two Triton kernels a layer:
`_decode_layers`). The prompt pass (`prefill`) takes input embeddings with the image
features already in place and writes the decode cache directly. New tokens are text,
so the three M-RoPE axes share one position. Deepstack models (Qwen3-VL) add vision
features inside early layers, which this stack does not: their prompt pass stays
transformers'. tests/test_models_engine.py checks it against the model's full forward.
"""

from __future__ import annotations

from typing import Any, Optional

from inference_worker.engines.fused import Kernels
from inference_worker.engines.fused_linear import fuse_layer
from inference_worker.engines.kv_cache import KVCache


class TextStack:
    def __init__(
        self,
        model: Any,
        compile: bool = False,
        rotary: str = "auto",
        decode: str = "auto",
        swiglu: str = "kernel",
        split: int = 0,
    ) -> None:
        lm = model.model.language_model
        self.model = model
        self.layers = list(lm.layers)
        self.norm = lm.norm
        self.embed = lm.embed_tokens
        self.rotary = lm.rotary_emb
        self.lm_head = model.lm_head
        cfg = lm.config
        self.kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads  # query heads per KV head
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.swiglu = getattr(cfg, "hidden_act", "silu") == "silu"
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.k = Kernels(
            compile, cuda=self.device.type == "cuda", rotary=rotary, decode=decode, swiglu=swiglu, split=split
        )
        self.fused = [fuse_layer(layer) for layer in self.layers]
        # decode steps through the Triton rope + cache write and attention kernels: they
        # take a layer's one q/k/v projection, no per-head norm between it and the rope, and
        # a head size that is a power of two of at least 16 (a block of the kernel)
        self.decode_kernels = (
            self.k.decode_attention is not None
            and self.head_dim >= 16
            and self.head_dim & (self.head_dim - 1) == 0
            and all(f is not None for f in self.fused)
            and not any(hasattr(layer.self_attn, "q_norm") for layer in self.layers)
        )

    def new_cache(self, batch: int, capacity: int, layers: Optional[int] = None) -> KVCache:
        return KVCache.empty(
            len(self.layers[:layers]), batch, self.kv_heads, capacity, self.head_dim, self.dtype, self.device
        )

    def input_embeddings(self, tokens, image_features=None, image_index=None) -> Any:
        """Token embeddings (B, S, hidden), with image features (one row per image token)
        written at the flat positions `image_index` of their placeholders."""
        h = self.embed(tokens)
        if image_features is not None:
            h.view(-1, h.shape[-1]).index_copy_(0, image_index, image_features.to(h.dtype))
        return h

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
        h, pending = self._layers(
            cache, h, positions.unsqueeze(0).expand(3, b, t), cols, allowed, cache.capacity
        )
        return self.lm_head(self._final_norm(h, pending)).float()

    def decode(self, cache: KVCache, tokens, positions, cols, rows, span: int) -> Any:
        """One new token per row, each at its own place: row r's token `tokens[r]` at rope
        position `positions[r]` goes to cache column `cols[r]` of row r (`rows` is
        arange(B)), and attends to the first `span` columns its mask allows. `cache` holds
        exactly these B rows. Returns logits (B, vocab) in float32."""
        import torch

        b = tokens.shape[0]
        cache.mask[rows, cols] = torch.ones_like(cols, dtype=torch.bool)  # no host scalar: capturable
        h = self.embed(tokens[:, None])
        if self.decode_kernels:
            h, pending = self._decode_layers(cache, h, positions, cols, span)
        else:
            allowed = cache.mask[:, None, None, :span]  # (B, 1, 1, span)
            h, pending = self._layers(
                cache, h, positions[None, :, None].expand(3, b, 1), (rows, cols), allowed, span
            )
        return self.lm_head(self._final_norm(h, pending))[:, 0].float()

    def prefill(self, cache: KVCache, embeds, positions, attention_mask, layers: Optional[int] = None) -> Any:
        """A whole left-padded prompt from its input embeddings (B, T, D) at M-RoPE `positions`
        (3, B, T), into cache columns [0, T) of rows [0, B). With `layers`, only the first
        that many layers run and their output (the residual stream, no final norm) is
        returned for every token; otherwise the logits (B, vocab) of the last token."""
        import torch

        b, t = attention_mask.shape
        rows = cache.rows(b)
        rows.mask.zero_()
        rows.mask[:, :t].copy_(attention_mask.bool())
        cols = torch.arange(t, device=embeds.device)
        causal = cols[None, :] <= cols[:, None]  # (T, T)
        # a padding position attends to itself alone: a query with no key at all gives NaN
        # in some SDPA kernels, which its key and value would carry into later layers
        own = cols[None, :] == cols[:, None]
        allowed = ((rows.mask[:, None, :t] & causal[None]) | own[None]).unsqueeze(1)  # (B, 1, T, T)
        h, pending = self._layers(rows, embeds, positions, cols, allowed, t, layers)
        if layers is not None:
            return h + pending
        return self.lm_head(self._final_norm(h[:, -1:], pending[:, -1:]))[:, 0].float()

    def _final_norm(self, h, pending) -> Any:
        return self.k.add_rms_norm(h, pending, self.norm.weight, self.norm.variance_epsilon)[1]

    def _layers(self, cache: KVCache, h, positions, cols, allowed, span: int, layers: Optional[int] = None):
        """The decoder layers over hidden states h (B, T, D): keys and values go to cache
        columns `cols` (T,) of every row, or with `cols` = (rows, columns) to one column per
        row; attention reads the first `span` columns under `allowed`. Returns (h, the last
        sublayer's output still to be added to it)."""
        import torch.nn.functional as F

        k_ = self.k
        b, t = h.shape[:2]
        cos, sin = self.rotary(h, positions)
        bias = attention_bias(allowed, self.groups, h.dtype)
        pending = None  # the last sublayer's output, added to h by the next norm
        for i, layer in enumerate(self.layers[:layers]):
            attn = layer.self_attn
            h, x = self._input_norm(h, pending, layer.input_layernorm)
            fused = self.fused[i]
            if fused is not None:
                q, k, v = F.linear(x, fused.qkv_weight, fused.qkv_bias).split(fused.qkv_sizes, dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(b, t, -1, self.head_dim)
            k = k.view(b, t, -1, self.head_dim)
            v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
                q = k_.rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
                k = k_.rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            q, k = k_.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            if isinstance(cols, tuple):  # one column per row (decode)
                rows_, cols_ = cols
                cache.keys[i][rows_, :, cols_] = k[:, :, 0]
                cache.values[i][rows_, :, cols_] = v[:, :, 0]
            else:  # the same columns for every row
                cache.keys[i].index_copy_(2, cols, k)
                cache.values[i].index_copy_(2, cols, v)
            keys, values = cache.keys[i][:, :, :span], cache.values[i][:, :, :span]
            o = grouped_attention(q, keys, values, bias, attn.scaling)
            post = layer.post_attention_layernorm
            h, x = k_.add_rms_norm(
                h, attn.o_proj(o.transpose(1, 2).reshape(b, t, -1)), post.weight, post.variance_epsilon
            )
            pending = self._mlp(layer, fused, x, prompt=t > 1)
        return h, pending

    def _input_norm(self, h, pending, norm):
        """(h, the layer's normed input): the previous sublayer's output `pending` is added
        to h in the same kernel as the norm (none before the first layer)."""
        if pending is None:
            return h, self.k.rms_norm(h, norm.weight, norm.variance_epsilon)
        return self.k.add_rms_norm(h, pending, norm.weight, norm.variance_epsilon)

    def _mlp(self, layer, fused, x, prompt: bool = False) -> Any:
        """The MLP of one layer; a prompt pass's SwiGLU goes in the gate/up product's
        epilogue where `Kernels.linear_swiglu` is on (a decode step's few rows would fill a
        fraction of the kernel's tiles)."""
        import torch.nn.functional as F

        mlp = layer.mlp
        if not self.swiglu:
            return mlp(x)
        if fused is not None and fused.gate_up_weight is not None:
            if prompt and self.k.linear_swiglu is not None:
                return mlp.down_proj(self.k.linear_swiglu(x, fused.gate_up_weight))
            gate, up = F.linear(x, fused.gate_up_weight).chunk(2, dim=-1)
            return mlp.down_proj(self.k.silu_mul(gate, up))
        return mlp.down_proj(self.k.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))

    def _decode_layers(self, cache: KVCache, h, positions, cols, span: int):
        """`_layers` for one token per row (decode) on the Triton kernels: per layer the
        q/k/v projection, one kernel that rotates q and k and writes k and v to column
        cols[r] of row r, and one that attends over each row's first `span` columns its
        mask allows."""
        import torch.nn.functional as F

        k_ = self.k
        b = h.shape[0]
        cos, sin = self.rotary(h, positions[None, :, None].expand(3, b, 1))
        cos = cos.expand(b, 1, self.head_dim).reshape(b, self.head_dim).contiguous()
        sin = sin.expand(b, 1, self.head_dim).reshape(b, self.head_dim).contiguous()
        heads = self.kv_heads * self.groups
        pending = None
        for i, layer in enumerate(self.layers):
            attn, fused = layer.self_attn, self.fused[i]
            h, x = self._input_norm(h, pending, layer.input_layernorm)
            qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
            keys, values = cache.keys[i], cache.values[i]
            q = k_.decode_rope_write(qkv, cos, sin, keys, values, cols, heads)
            o = k_.decode_attention(q, keys, values, cache.mask, span, attn.scaling)
            post = layer.post_attention_layernorm
            h, x = k_.add_rms_norm(h, attn.o_proj(o.view(b, 1, -1)), post.weight, post.variance_epsilon)
            pending = self._mlp(layer, fused, x)
        return h, pending


def attention_bias(allowed, groups: int, dtype):
    """The additive mask of `grouped_attention` (0 where `allowed` (B, 1, T, S), -inf
    elsewhere), made once per forward instead of once per layer. Its rows are the T query
    positions of each of the `groups` query heads folded into the query length (one row when
    T = 1: it broadcasts over them), and start at 16-element boundaries: SDPA's
    memory-efficient kernel copies a mask into that layout on every call otherwise."""
    import torch

    b, _, t, s = allowed.shape
    if t > 1:
        allowed = allowed.unsqueeze(2).expand(b, 1, groups, t, s).reshape(b, 1, groups * t, s)
    full = torch.full(
        (b, 1, allowed.shape[2], s + (-s % 16)), float("-inf"), dtype=dtype, device=allowed.device
    )
    return full[..., :s].masked_fill_(allowed, 0.0)


def grouped_attention(q, k, v, bias, scale: float):
    """Attention of q (B, H, T, D) over a GQA cache k, v (B, KV, S, D) under the additive
    mask `bias` of `attention_bias`.

    The H/KV query heads that share a KV head are folded into the query length, so one
    SDPA call reads each cached key and value once; expanding the cache to H heads (what
    `enable_gqa` falls back to with a mask) copies it H/KV times per layer and step.
    """
    import torch.nn.functional as F

    b, h, t, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, (h // kv) * t, d)  # query head i reads KV head i // g, as transformers' repeat_kv
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=bias, scale=scale)
    return o.reshape(b, h, t, d)
