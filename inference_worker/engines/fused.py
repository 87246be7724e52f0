"""The small per-token ops of a decoder layer as single kernels (compiled on CUDA).

A decode step of a 2B model is ~1,100 tiny kernels when RMSNorm, the rotary embedding
and SwiGLU run op by op; launch gaps, not bandwidth, then set its time even inside a
CUDA graph. These functions keep transformers' arithmetic (float32 norm statistics,
weight applied in the input dtype) and are compiled with torch.compile on CUDA, which
fuses each into one kernel. On CPU, or if compiling fails, they run as written.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Tuple

log = logging.getLogger("vlmq.engine")


def rms_norm(x, weight, eps: float):
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * (x32.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return weight * x32.to(dtype)


def add_rms_norm(h, delta, weight, eps: float):
    """(h + delta, rms_norm(h + delta)): the residual add and the next norm in one pass."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def add_layer_norm(h, delta, weight, bias, eps: float):
    """(h + delta, layer_norm(h + delta)): a residual add and the LayerNorm after it."""
    import torch.nn.functional as F

    h = h + delta
    return h, F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def add_norm(h, delta, norm):
    """(h + delta, norm(h + delta)) for an nn.LayerNorm `norm`: one Triton kernel on CUDA
    while no gradient is recorded (the kernel has no backward), else the torch ops."""
    import torch

    from inference_worker.engines import triton_kernels

    if h.is_cuda and triton_kernels.available() and not torch.is_grad_enabled():
        return triton_kernels.add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps)
    return add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q, k, cos, sin):
    """q, k (B, heads, T, D); cos, sin (B, T, D): transformers' apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul(gate, up):
    import torch.nn.functional as F

    return F.silu(gate) * up


class Kernels:
    """The functions above, compiled or not; SwiGLU and the rotary embedding as Triton
    kernels where they can be (triton_kernels.py: the compiled ones run at ~1.6 TB/s and a
    tenth of the bandwidth on the prompt pass): `rotary` auto (Triton when compiling on
    CUDA with Triton), torch or triton (CUDA and Triton only). `decode`: sdpa (decode steps
    use the ops above and SDPA; `decode_rope_write` and `decode_attention` are None),
    triton (those two Triton kernels; CUDA and Triton only) or auto (as `rotary`).
    `swiglu`: kernel (the gate/up product, then `silu_mul`; `linear_swiglu` is None) or
    epilogue (triton_kernels.linear_swiglu, SwiGLU in the product's epilogue, for the
    prompt pass; CUDA and Triton only). `split`: columns of a row's cache one program of
    the Triton decode attention reads (0: all of them)."""

    def __init__(
        self,
        compile: bool,
        cuda: bool = False,
        rotary: str = "auto",
        decode: str = "auto",
        swiglu: str = "kernel",
        split: int = 0,
    ) -> None:
        from inference_worker.engines import triton_kernels

        on_triton = cuda and triton_kernels.available()
        self.rms_norm = _maybe_compiled(rms_norm, compile)
        self.add_rms_norm = _maybe_compiled(add_rms_norm, compile)
        if rotary == "auto":
            rotary = "triton" if compile and on_triton else "torch"
        if rotary == "triton":
            if not on_triton:
                raise ValueError("rope=triton needs a CUDA device and Triton")
            self.rope = triton_kernels.rope
        else:
            self.rope = _maybe_compiled(rope, compile)
        if decode == "auto":
            decode = "triton" if compile and on_triton else "sdpa"
        if decode == "triton" and not on_triton:
            raise ValueError("decode_attention=triton needs a CUDA device and Triton")
        self.decode_rope_write = triton_kernels.decode_rope_write if decode == "triton" else None
        if split < 0 or split % 64:
            raise ValueError(f"decode_split must be 0 or a positive multiple of 64, not {split}")
        self.decode_attention = (
            functools.partial(triton_kernels.decode_attention, chunk=split) if decode == "triton" else None
        )
        if swiglu == "epilogue" and not on_triton:
            raise ValueError("prefill_swiglu=epilogue needs a CUDA device and Triton")
        self.linear_swiglu = triton_kernels.linear_swiglu if swiglu == "epilogue" else None
        if compile and on_triton:
            self.silu_mul = triton_kernels.silu_mul
        else:
            self.silu_mul = _maybe_compiled(silu_mul, compile)


# Compiled variants one function may have: one per dtype, rank and grad mode it meets (the
# chat engine runs under inference_mode, the VLA's feature pass under no_grad, each in bf16
# and float32 at warm-up). Past torch's default of 8 a fullgraph compile fails outright,
# and a failed function would run op by op from then on.
RECOMPILE_LIMIT = 64


def _maybe_compiled(fn: Callable, compile: bool) -> Callable:
    from inference_worker.failures import is_fatal_device_error, is_out_of_memory

    if not compile:
        return fn
    import torch
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(cfg, name, RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)
    if getattr(cfg, "accumulated_recompile_limit", 4 * RECOMPILE_LIMIT) < 4 * RECOMPILE_LIMIT:
        cfg.accumulated_recompile_limit = 4 * RECOMPILE_LIMIT
    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    state = {"use": compiled}

    def call(*args: Any) -> Any:
        try:
            return state["use"](*args)
        except Exception as exc:  # no triton, an inductor bug: the plain ops are correct too
            # ... but not a device out of memory or broken: those are the batch's or the
            # process's, and the worker handles them (inference_worker/failures.py)
            if state["use"] is fn or is_out_of_memory(exc) or is_fatal_device_error(exc):
                raise
            log.error(
                "torch.compile of %s failed (%s: %s); it runs op by op from now on, slower",
                fn.__name__,
                type(exc).__name__,
                exc,
            )
            state["use"] = fn
            return fn(*args)

    return call


__all__ = ["Kernels", "Tuple", "add_layer_norm", "add_norm", "add_rms_norm", "rms_norm", "rope", "silu_mul"]
