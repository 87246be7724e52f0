"""Engine options: `vlmq worker --option KEY=VALUE` (repeatable) or VLMQ_ENGINE_<KEY>; the
self-check's and vLLM's options, VLMQ_<KEY>. Read by the rules of schemas/settings.py; the
worker checks every key at start (inference_worker/settings.py `check_options`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional

from schemas import settings as tree


@dataclass(frozen=True)
class EngineOptions:
    # Image size policy: image tokens drive cost. 0 = the checkpoint's image processor
    # setting (Qwen2-VL: 56*56 .. 28*28*1280 pixels; Qwen3-VL: 256*256 .. 4096*4096).
    min_pixels: int = 0
    max_pixels: int = 0
    # eager: plain PyTorch steps; graphs: one CUDA graph per decode step (CUDA only);
    # auto: graphs on CUDA, eager elsewhere; eager-bucketed: eager steps at the graphs'
    # padded shapes (to compare the two bit for bit).
    decode: str = tree.setting("auto", choices=("auto", "eager", "eager-bucketed", "graphs"))
    # torch.compile the per-token ops of the decode step (fused.py): auto = on CUDA
    fuse: str = tree.setting("auto", choices=("auto", "on", "off"))
    # the language model's rotary embedding: torch (fused.py's ops, compiled when `fuse` is on),
    # triton (triton_kernels.py, CUDA only) or auto (triton where `fuse` is on, on CUDA with
    # Triton installed; torch elsewhere)
    rope: str = tree.setting("auto", choices=("auto", "torch", "triton"))
    # A decode step's attention: triton = per layer one kernel that rotates q and k and
    # writes k and v into the cache, and one that attends over each row's allowed columns
    # (triton_kernels.py, CUDA only); sdpa = the rope kernels, two cache writes and SDPA
    # under an additive mask; auto = triton where `fuse` is on, on CUDA with Triton
    decode_attention: str = tree.setting("auto", choices=("auto", "sdpa", "triton"))
    # ... with triton: the cache columns one program of the attention reads, a multiple of
    # 64 (split-K; a second kernel merges the pieces); 0 = a row's columns all in one program
    decode_split: int = tree.setting(0, minimum=0, multiple_of=64)
    # The prompt pass's SwiGLU: kernel = the gate/up product (cuBLAS), then one SwiGLU
    # kernel; epilogue = SwiGLU in the product's epilogue, the product never written
    # (triton_kernels.linear_swiglu; CUDA with Triton only, Hopper in half precision, else
    # it falls back to kernel's ops)
    prefill_swiglu: str = tree.setting("kernel", choices=("kernel", "epilogue"))
    # The prompt pass: stack = the engine's own layer loop (text_stack.py), writing the
    # decode cache directly; hf = transformers' forward; auto = stack where the model
    # allows it (not Qwen3-VL, whose deepstack features enter inside the text layers;
    # stack is refused there).
    prefill: str = tree.setting("auto", choices=("auto", "stack", "hf"))
    # fast: the vision tower's attention batched across images (vision_attention.py) and its
    # patch embedding as one GEMM (patch_embedding.py); stock: transformers' tower as it is
    vision: str = tree.setting("fast", choices=("fast", "stock"))
    # on: a prompt group's frames of one size padded to a bucket of frames and the vision tower
    # replayed as a CUDA graph per bucket (vision_graphs.py; CUDA only); padded: the same
    # padded shapes, eager; off: the tower eager at the group's own size; auto: on on CUDA
    vision_graphs: str = tree.setting("auto", choices=("auto", "off", "on", "padded"))
    # on: a prompt group's text layers run at a padded (rows bucket, width bucket) shape,
    # replayed as a CUDA graph per shape (prefill_graphs.py; CUDA only, our prefill only);
    # padded: the same padded shapes, eager; off: the group's own shape, eager; auto: on
    # on CUDA with our prefill
    prefill_graphs: str = tree.setting("auto", choices=("auto", "off", "on", "padded"))
    # ... the padded width: a group's longest prompt rounded up to a multiple of this; a
    # smaller step pads less and captures a graph for more widths
    prefill_width_step: int = tree.setting(16, minimum=1)
    # The decode pool (decoder.py): `kv_slots` sequences decode at once, each with room for
    # `max_context` tokens (prompt + answer); 0 = sized from memory: on CUDA, `kv_memory`
    # of the free GPU memory once the model is loaded; on CPU, `kv_memory_mb`.
    max_context: int = 0  # 0 = 8192 on CUDA, 2048 on CPU (and never past the model's own)
    kv_slots: int = 0
    kv_memory: float = 0.5
    kv_memory_mb: int = 1024
    # on: each decode step is launched before the host reads the previous step's tokens, so
    # the host's per-step work overlaps the GPU's (decoder.py `step`); off: launch, read, repeat
    decode_ahead: bool = True
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

    ENV_PREFIX = "ENGINE_"  # VLMQ_ENGINE_<KEY>

    @classmethod
    def parse(cls, options: Mapping[str, str], environ: Optional[Mapping[str, str]] = None) -> EngineOptions:
        """From `--option` pairs, falling back to VLMQ_ENGINE_* variables. Keys that are not
        engine options are left to the other components that read `--option` (the VLA's);
        the worker refuses keys that no component reads at start (inference_worker/settings.py)."""
        return tree.load(cls, environ, pairs=options, strict=False)

    def stock(self) -> EngineOptions:
        """Every optional fast path off: eager decode steps, no compiled or Triton kernels,
        transformers' prompt pass and vision tower (self_check.py falls back to this)."""
        return replace(
            self,
            decode="eager",
            fuse="off",
            prefill="hf",
            vision="stock",
            vision_graphs="off",
            prefill_graphs="off",
            rope="torch",
            decode_attention="sdpa",
            prefill_swiglu="kernel",
        )


@dataclass(frozen=True)
class SelfCheckOptions:
    """The hf engine's start-up check against the model's stock forward (engines/self_check.py)."""

    self_check: bool = True
    self_check_tol: Optional[float] = None  # None: the check's own tolerance


@dataclass(frozen=True)
class VLLMOptions:
    """`--backend vllm` (engines/vllm_engine.py); None = the engine's own default."""

    vllm_gpu_memory_utilization: Optional[float] = None  # 0.85 on CUDA; on CPU the share of RAM, 0.1
    vllm_max_model_len: Optional[int] = None
    vllm_kv_cache_mib: Optional[int] = None  # 256 on CPU, vLLM's own sizing on CUDA
    vllm_enforce_eager: bool = False
    vllm_tensor_parallel_size: int = 1
    vllm_images_per_prompt: int = 4
