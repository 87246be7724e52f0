"""At worker start: does the engine's fast path answer what the model's stock forward answers?

The engine patches transformers internals (engines/vision_attention.py, patch_embedding.py,
fused_linear.py, vision_fusion.py) and runs its own decoder loop; a transformers release
that moves one of them could change answers without an error. So before serving, one
prompt (a frame and a question) runs twice:

1. the reference: the stock forward of the model just loaded, before the engine touches
   it (parity.reference_trace, greedy, a few tokens). It is the same weights in the same
   memory: no second copy of the model (a 2B model in bf16 would need another ~4.5 GB);
2. the engine, built with the options asked for: its greedy tokens, and its
   log-probabilities teacher-forced on the reference's tokens (parity.engine_trace).

fp32: the greedy tokens must be equal, unless the reference's two best tokens at the
first difference are within `TIE_FP32` (a tie: both picks are right and the sequences may
part there), and every step's log-probabilities over the reference's top 5 within
`TOL_FP32`. bf16/fp16: argmax ties are expected (random weights give flat logits, and
rounding moves near-equal logits), so tokens are not compared; every step where the
argmax differs must be a near-tie in vLLM's sense (each pick in the other's top 5) and the
top-5 log-probabilities within `--option self_check_tol` (0.5 by default).

On disagreement the worker logs a warning and serves with every optional fast path off
(EngineOptions.stock(), on a freshly loaded model), after checking that path the same
way; if the stock path disagrees too, or with `--strict` (VLMQ_STRICT), it refuses to
start. `--option self_check=0` skips the check.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from inference_worker.engines.options import EngineOptions
from inference_worker.engines.parity import TopKReport, Trace, compare_topk, engine_trace, reference_trace
from inference_worker.engines.prompt import ChatPrompt, user_prompt
from inference_worker.engines.sampling import Sampling
from inference_worker.models.errors import ModelLoadError

log = logging.getLogger("vlmq.self_check")

TOKENS = 8
TOP_K = 5
TOL_FP32 = 1e-3
TIE_FP32 = 1e-4
TOL_HALF = 0.5


def check_prompt() -> ChatPrompt:
    """A frame with structure (gradients and a square, not noise) and a short question."""
    import numpy as np

    y, x = np.mgrid[0:112, 0:112]
    frame = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    frame[40:72, 40:72] = (220, 30, 30)
    return user_prompt(frame, "What is in the middle of this picture? Answer in a few words.")


@dataclass
class Verdict:
    ok: bool
    reason: str  # one line: what disagreed, or what was compared
    report: TopKReport


def reference(vlm: Any, prompt: Optional[ChatPrompt] = None) -> Trace:
    """The stock forward's answer; call before any engine is built on `vlm.model`."""
    return reference_trace(vlm, prompt or check_prompt(), max_tokens=TOKENS)


def compare(
    engine: Any, ref: Trace, prompt: Optional[ChatPrompt] = None, tol: Optional[float] = None
) -> Verdict:
    """The engine against the reference trace of the same prompt."""
    import torch

    prompt = prompt or check_prompt()
    report = compare_topk(ref, engine_trace(engine, prompt, ref.tokens), k=TOP_K)
    fp32 = engine.vlm.dtype == torch.float32
    tol = tol if tol is not None else (TOL_FP32 if fp32 else TOL_HALF)
    where = f"{report.positions} steps, top-{TOP_K} log-prob max |diff| {report.max_abs_diff:.3g} (tolerance {tol:g})"
    if fp32:
        ours = engine.generate([prompt], [Sampling(max_tokens=TOKENS)])[0].token_ids
        n = min(len(ours), len(ref.tokens))
        first = next((i for i in range(n) if ours[i] != ref.tokens[i]), None)
        if first is not None and not _tie(ref, first, TIE_FP32):
            return Verdict(
                False,
                f"greedy token {first} is {ours[first]}, the stock forward's {ref.tokens[first]}; {where}",
                report,
            )
        if first is None and len(ours) < len(ref.tokens) and ours and ours[-1] not in engine.eos_ids:
            return Verdict(
                False, f"the engine stopped after {len(ours)} tokens, the stock forward did not", report
            )
    elif not report.close:
        return Verdict(
            False,
            f"argmax differs beyond a near-tie at step {report.first_disagreement}; {where}",
            report,
        )
    if report.max_abs_diff > tol:
        return Verdict(False, where, report)
    return Verdict(True, f"{where}; argmax agreement {report.argmax_agreement:.2f}", report)


def _tie(ref: Trace, step: int, eps: float) -> bool:
    top2 = ref.logprobs[step].topk(2).values
    return float(top2[0] - top2[1]) < eps


def checked_engine(
    vlm: Any,
    options: EngineOptions,
    reload: Callable[[], Any],
    strict: bool = False,
    tol: Optional[float] = None,
    max_sequences: int = 256,
) -> Tuple[Any, Any]:
    """(engine, the LoadedVLM it serves): the engine with `options` if it passes the check;
    else, unless strict, one with every fast path off on a model loaded anew by `reload()`
    (the first one is patched by then). Raises ModelLoadError when nothing passes."""
    from inference_worker.engines.chat_engine import ChatEngine

    ref = reference(vlm)
    engine = ChatEngine(vlm, options, max_sequences=max_sequences)
    verdict = compare(engine, ref, tol=tol)
    if verdict.ok:
        log.info("self-check passed: the engine answers as the stock forward (%s)", verdict.reason)
        return engine, vlm
    if strict:
        raise ModelLoadError(
            f"self-check failed (--strict): the engine's fast path disagrees with the stock forward: {verdict.reason}"
        )
    log.warning(
        "self-check failed: the engine's fast path disagrees with the stock forward (%s); "
        "serving on the stock path (decode=eager, fuse=off, prefill=hf, vision=stock), slower",
        verdict.reason,
    )
    del engine, vlm
    _free_memory()
    vlm = reload()
    engine = ChatEngine(vlm, options.stock(), max_sequences=max_sequences)
    engine.path = "stock (self-check failed)"
    fallback = compare(engine, ref, tol=tol)
    if not fallback.ok:
        raise ModelLoadError(f"self-check failed on the stock path too: {fallback.reason}")
    log.info("self-check of the stock path passed (%s)", fallback.reason)
    return engine, vlm


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
