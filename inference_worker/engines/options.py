"""Engine options: `vlmq worker --option KEY=VALUE` (repeatable) or VLMQ_ENGINE_<KEY>."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Dict, Mapping, Optional


@dataclass(frozen=True)
class EngineOptions:
    # Image size policy: image tokens drive cost. 0 = the checkpoint's image processor
    # setting (Qwen2-VL: 56*56 .. 28*28*1280 pixels; Qwen3-VL: 256*256 .. 4096*4096).
    min_pixels: int = 0
    max_pixels: int = 0
    # eager: plain PyTorch steps; graphs: one CUDA graph per decode step (CUDA only);
    # auto: graphs on CUDA, eager elsewhere; eager-bucketed: eager steps at the graphs'
    # padded shapes (to compare the two bit for bit).
    decode: str = "auto"
    # torch.compile the per-token ops of the decode step (fused.py): auto = on CUDA
    fuse: str = "auto"
    # The prompt pass: stack = the engine's own layer loop (text_stack.py), writing the
    # decode cache directly; hf = transformers' forward; auto = stack where the model
    # allows it (not Qwen3-VL, whose deepstack features enter inside the text layers;
    # stack is refused there).
    prefill: str = "auto"
    # fast: the vision tower's attention batched across images (vision_attention.py) and its
    # patch embedding as one GEMM (patch_embedding.py); stock: transformers' tower as it is
    vision: str = "fast"
    # The decode pool (decoder.py): `kv_slots` sequences decode at once, each with room for
    # `max_context` tokens (prompt + answer); 0 = sized from memory: on CUDA, `kv_memory`
    # of the free GPU memory once the model is loaded; on CPU, `kv_memory_mb`.
    max_context: int = 0  # 0 = 8192 on CUDA, 2048 on CPU (and never past the model's own)
    kv_slots: int = 0
    kv_memory: float = 0.5
    kv_memory_mb: int = 1024
    span_step: int = 256  # attention reads cache columns in multiples of this (a graph per span)
    max_graphs: int = 48  # captured decode-step shapes kept on the GPU
    prefill_tokens: int = 8192  # prompt tokens prefilled in one step (bounds a step's length)
    score_rows: int = 256  # candidate rows scored per forward pass (bounds cache memory)
    # CPU threads that fill the token masks of constrained rows (grammar.py); 1 = the
    # model thread alone (fastest measured on 2 cores; try more on a many-core GPU host)
    grammar_threads: int = 1
    # Benchmarks only: decode every request to its max_tokens even past end-of-sequence
    # (random weights end at arbitrary points; a benchmark must decode a fixed length).
    ignore_eos: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> EngineOptions:
        """From `--option` pairs, falling back to VLMQ_ENGINE_* variables. Keys that are not
        engine options are left to the other components that read `--option` (the VLA's)."""
        env = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        values: Dict[str, object] = {}
        for name, f in known.items():
            raw = env.get(f"VLMQ_ENGINE_{name.upper()}")
            if raw is not None:
                values[name] = _convert(name, raw, f.default)
        for key, raw in options.items():
            name = key.replace("-", "_")
            if name not in known:
                continue
            values[name] = _convert(name, raw, known[name].default)
        opts = cls(**values)  # type: ignore[arg-type]
        if opts.decode not in ("auto", "eager", "graphs", "eager-bucketed"):
            raise ValueError(f"option decode={opts.decode!r}: choose auto, eager, eager-bucketed or graphs")
        if opts.prefill not in ("auto", "stack", "hf"):
            raise ValueError(f"option prefill={opts.prefill!r}: choose auto, stack or hf")
        if opts.fuse not in ("auto", "on", "off"):
            raise ValueError(f"option fuse={opts.fuse!r}: choose auto, on or off")
        if opts.vision not in ("fast", "stock"):
            raise ValueError(f"option vision={opts.vision!r}: choose fast or stock")
        return opts

    def stock(self) -> EngineOptions:
        """Every optional fast path off: eager decode steps, no compiled or Triton kernels,
        transformers' prompt pass and vision tower (self_check.py falls back to this)."""
        return replace(self, decode="eager", fuse="off", prefill="hf", vision="stock")


def _convert(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            return str(raw).strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except ValueError:
        raise ValueError(f"engine option {name}={raw!r}: expected {type(default).__name__}") from None
