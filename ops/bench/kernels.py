"""GPU kernels: the Triton elementwise kernels of the prompt pass vs the same functions under torch.compile.

Shapes of the chat benchmark's batch on the 2B Qwen2-VL: --frames 224-px frames (256
patches each, 16 heads of 80 in the vision tower, MLP 5120) and as many prompts of
--prompt-tokens tokens (language MLP 8960), bfloat16. The baseline of each op's record is
the reference function compiled for these exact shapes (torch.compile(dynamic=False)), the
strongest compiled version; `<op>_vs_dynamic_compile` compares with torch.compile(dynamic=
True), what fused.py and vision_fusion.py ran before the kernels. One run times the mean of
--iters calls of each of the three after a warm-up; --repeats runs, interleaved, give the
median with min/max. Records are milliseconds per call: a ratio below 1 means the kernel is
faster. CUDA only.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

from ops.bench.records import machine_description, record, write_results


def add_args(p) -> None:
    p.set_defaults(out="benchmarks/results/gpu_kernels.json")
    p.add_argument("--frames", type=int, default=128, help="frames / prompts in the batch (%(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=194, help="tokens per prompt (%(default)s)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per op and run (%(default)s)")
    p.add_argument(
        "--repeats", type=int, default=3, help="runs, interleaved; the median counts (%(default)s)"
    )


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


def _fresh(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The same function on a copy of its code: torch.compile caches compiled graphs on the
    code object, so two compilations of one function (static and dynamic) would share them."""
    import types

    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def run(args) -> int:
    import torch
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from inference_worker.engines import triton_kernels as tk
    from inference_worker.engines.fused import silu_mul

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
            static = torch.compile(_fresh(reference), dynamic=False, fullgraph=True)
            dynamic = torch.compile(_fresh(reference), dynamic=True, fullgraph=True)
            times: Dict[str, List[float]] = {"kernel": [], "static": [], "dynamic": []}
            for _ in range(args.repeats):
                for name, fn in (("kernel", kernel), ("static", static), ("dynamic", dynamic)):
                    times[name].append(_ms(fn, *inputs, iters=args.iters))
            recs.append(record(metric, times["kernel"], "ms", times["static"], machine=where))
            recs.append(
                record(f"{metric}_vs_dynamic_compile", times["kernel"], "ms", times["dynamic"], machine=where)
            )
    write_results(args.out, recs)
    for r in recs:
        print(f"{r.metric:58s} {r.value:>8} ms ({r.min}-{r.max})  baseline {r.baseline} ms, ratio {r.ratio}")
    return 0
