"""The flow-matching action expert: a small transformer over the action chunk.

Each block: cross-attention from the action tokens to the (projected) VLM features,
causal self-attention over the action sequence, and a GELU MLP, all pre-norm residual.
Inputs per token: the noisy action, the flow time (sinusoidal, mixed with the action by an
MLP as in SmolVLA) and a learned position. Output: the velocity of each action.
The cross-attention keys/values and the additive key mask depend only on the context, so
`prepare` computes them once per chunk and the Euler steps reuse them. At small batches
the expert's time is its kernel count, not its arithmetic, so serving on CUDA runs fewer:
each residual add with the LayerNorm that reads its sum (fused.add_norm, one Triton
kernel), the MLP's GELU in its up projection, and (after `serve`) self-attention's q and
k/v projections as one product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from inference_worker.engines.fused import add_norm
from inference_worker.vla.config import VLAConfig
from inference_worker.vla.projector import FeatureProjector, StateProjector


def time_embedding(
    t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0
) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (periods from min to max, as in pi0/SmolVLA)."""
    half = dim // 2
    frac = torch.linspace(0.0, 1.0, half, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** frac
    ang = (2 * math.pi / period)[None, :] * t.float()[:, None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)

    def keys_values(self, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(ctx).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def fuse_projections(self) -> None:
        """Self-attention's q and k/v projections as one matrix product (for serving, on
        frozen weights: the fused copy does not follow later changes of q and kv)."""
        self.register_buffer("qkv_weight", torch.cat([self.q.weight, self.kv.weight]), persistent=False)
        self.register_buffer("qkv_bias", torch.cat([self.q.bias, self.kv.bias]), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        mask: Optional[torch.Tensor] = None,
        causal: bool = False,
    ) -> torch.Tensor:
        if kv is None and hasattr(self, "qkv_weight"):
            B, L, D = x.shape
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(B, L, 3, self.heads, D // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        else:
            q = self._split(self.q(x))
            k, v = kv if kv is not None else self.keys_values(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        B, _, L, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    """Pre-norm: x + cross(norm_cross(x)), x + self_attn(norm_self(x)), x + mlp(norm_mlp(x));
    FlowMatchingExpert.forward runs the blocks (each add fused with the next norm)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = Attention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.is_grad_enabled():
            # the tanh GELU in the up projection's cuBLASLt epilogue: a kernel less per
            # block and Euler step, where the expert's time is its kernel count
            up, _, down = self.mlp
            y = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
            return down(y).view(*x.shape[:-1], -1)
        return self.mlp(x)


@dataclass
class Context:
    """What the Euler steps need from the observation, computed once per chunk."""

    kv: List[Tuple[torch.Tensor, torch.Tensor]]  # per block
    # [B, 1, 1, L] added to the attention scores: 0 where a key is real, -inf at padding
    # (SDPA would convert a boolean mask to this on every call)
    key_bias: torch.Tensor

    @property
    def batch(self) -> int:
        return self.key_bias.shape[0]


class FlowMatchingExpert(nn.Module):
    def __init__(self, cfg: VLAConfig) -> None:
        super().__init__()
        if cfg.vlm_hidden <= 0:
            raise ValueError("the config's vlm_hidden must be set (from the VLM) before building the expert")
        D = cfg.expert_dim
        self.cfg = cfg
        self.features = FeatureProjector(cfg.vlm_hidden, D, cfg.num_frames)
        self.state = StateProjector(cfg.state_dim, D) if cfg.state_dim > 0 else None
        self.action_in = nn.Linear(cfg.action_dim, D)
        self.action_time = nn.Sequential(nn.Linear(2 * D, D), nn.SiLU(), nn.Linear(D, D))
        self.pos = nn.Parameter(torch.randn(cfg.chunk_size, D) * 0.02)
        self.blocks = nn.ModuleList(
            Block(D, cfg.expert_heads, cfg.mlp_ratio) for _ in range(cfg.expert_layers)
        )
        self.norm_out = nn.LayerNorm(D)
        self.action_out = nn.Linear(D, cfg.action_dim)

    def serve(self) -> FlowMatchingExpert:
        """Frozen, in eval mode, self-attention projections fused: the serving expert."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        for blk in self.blocks:
            blk.self_attn.fuse_projections()
        return self

    def prepare(
        self,
        feats: torch.Tensor,
        frame_ids: torch.Tensor,
        mask: torch.Tensor,
        state: Optional[torch.Tensor] = None,
    ) -> Context:
        """Padded features [B, L, vlm_hidden] (+ frame ids, mask, state) -> per-block K/V."""
        ctx = self.features(feats, frame_ids)
        if self.state is not None:
            if state is None:
                state = torch.zeros(ctx.shape[0], self.cfg.state_dim, device=ctx.device)
            ctx = torch.cat([ctx, self.state(state)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        kv = [blk.cross.keys_values(ctx) for blk in self.blocks]
        bias = torch.zeros(mask.shape, dtype=ctx.dtype, device=ctx.device).masked_fill(~mask, float("-inf"))
        return Context(kv, bias[:, None, None, :])

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, ctx: Context, te: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Velocity of the noisy chunk x [B, H, A] at flow time t [B]; `te` is t's
        time_embedding if the caller has it ([B or 1, expert_dim])."""
        B, H = x.shape[:2]
        a = self.action_in(x.to(self.action_in.weight.dtype))
        if te is None:
            te = time_embedding(t, a.shape[-1])
        te = te.to(a.dtype)[:, None, :].expand(B, H, -1)
        h = self.action_time(torch.cat([a, te], dim=-1)) + self.pos[:H]
        blocks = list(self.blocks)
        normed = (blocks[0].norm_cross if blocks else self.norm_out)(h)
        after = [b.norm_cross for b in blocks[1:]] + [self.norm_out]
        for blk, kv, norm in zip(blocks, ctx.kv, after):
            h, normed = add_norm(h, blk.cross(normed, kv=kv, mask=ctx.key_bias), blk.norm_self)
            h, normed = add_norm(h, blk.self_attn(normed, causal=True), blk.norm_mlp)
            h, normed = add_norm(h, blk.feed_forward(normed), norm)
        return self.action_out(normed).float()
