"""GPU kernels: the Triton elementwise kernels of the prompt pass vs the torch.compile'd functions they replaced.

Shapes of the chat benchmark's batch on the 2B Qwen2-VL: --frames 224-px frames (256
patches each, 16 heads of 80 in the vision tower, MLP 5120) and as many prompts of
--prompt-tokens tokens (language MLP 8960), bfloat16. Each op is timed as the mean of
--iters calls after a warm-up; the baseline is the same function compiled with
torch.compile(dynamic=True), as fused.py and vision_fusion.py run it. Records are
milliseconds per call, so a ratio below 1 means the kernel is faster. CUDA only.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ops.bench.records import machine_description, record, write_results


def add_args(p) -> None:
    p.set_defaults(out="benchmarks/results/gpu_kernels.json")
    p.add_argument("--frames", type=int, default=128, help="frames / prompts in the batch (%(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=194, help="tokens per prompt (%(default)s)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per op (%(default)s)")


def _ms(fn: Callable[..., Any], *args: Any, iters: int) -> float:
    import torch

    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1000


def run(args) -> int:
    import torch
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from inference_worker.engines import triton_kernels as tk
    from inference_worker.engines.fused import _maybe_compiled, silu_mul

    if not torch.cuda.is_available() or not tk.available():
        raise SystemExit("vlmq bench kernels needs a CUDA device and triton")
    bf = torch.bfloat16
    patches, tokens = args.frames * 256, args.frames * args.prompt_tokens
    rotary = getattr(modeling_qwen2_vl.apply_rotary_pos_emb_vision, "original", None)
    rotary = rotary or modeling_qwen2_vl.apply_rotary_pos_emb_vision
    x = torch.randn(patches, 5120, device="cuda", dtype=bf)
    gate, up = torch.randn(tokens, 2 * 8960, device="cuda", dtype=bf).chunk(2, dim=-1)
    q, k, _ = torch.randn(patches, 3, 16, 80, device="cuda", dtype=bf).permute(1, 0, 2, 3).unbind(0)
    emb = torch.randn(patches, 80, device="cuda")
    cos, sin = emb.cos(), emb.sin()
    cases = [
        (f"quick_gelu_ms_{patches}x5120", tk.quick_gelu, lambda v: v * torch.sigmoid(1.702 * v), (x,)),
        (f"silu_mul_ms_{tokens}x8960", tk.silu_mul, silu_mul, (gate, up)),
        (f"rotary_vision_ms_{patches}x16x80", tk.rotary_vision, rotary, (q, k, cos, sin)),
    ]
    where = f"{torch.cuda.get_device_name()}; bfloat16; {machine_description()}"
    recs = []
    with torch.inference_mode():
        for metric, kernel, reference, inputs in cases:
            compiled = _maybe_compiled(reference, True)
            base = _ms(compiled, *inputs, iters=args.iters)
            recs.append(record(metric, _ms(kernel, *inputs, iters=args.iters), "ms", base, machine=where))
    write_results(args.out, recs)
    for r in recs:
        print(f"{r.metric:40s} {r.value:>8} ms  (compiled {r.baseline} ms, ratio {r.ratio})")
    return 0
