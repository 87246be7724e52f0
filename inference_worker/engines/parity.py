"""The engine's fast path against the model's stock forward, token by token.

The engine patches the model it serves (vision attention routed to a registered function,
the patch embedding as a GEMM, q/k/v and gate/up rebound as slices of fused weights, the
vision rotary and activations swapped on CUDA) and runs its own decoder loop. A reference
must therefore be a model the engine never touched: loaded separately from the same
folder, or the same model before the engine is built (self_check.py). Its inputs come
from the stock processor, not the engine's input builder.

- `reference_trace`: greedy decoding (or teacher forcing on given tokens) with the stock
  forward (transformers' own generate and cache); the log-probabilities of every step.
- `engine_trace`: the engine's prefill and decode steps (CUDA graphs where the engine uses
  them) teacher-forced on the same tokens; the log-probabilities of every step.
- `compare_topk`: how close the two are, as vLLM compares backends: the largest gap in
  log-probability over the reference's top-k tokens, how often the argmax agrees, and
  whether every disagreement is a near-tie (each side's pick is in the other's top k).

They run on any device and dtype: on CPU in fp32 the tests expect the same argmax at every
position; in bf16 a random-weight model's logits are flat enough that argmax ties are
expected, and the top-k criterion is what holds.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

from inference_worker.engines.prompt import ChatPrompt

# modeling modules whose module-level functions vision_fusion.fuse_vision_ops may swap
MODELING = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
)


@contextmanager
def stock_modeling() -> Iterator[None]:
    """transformers' own module-level functions while inside (fuse_vision_ops swaps the
    vision rotary embedding module-wide, for every model of that architecture)."""
    from inference_worker.engines.vision_fusion import ROTARY

    swapped = []
    for name in MODELING:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        fn = getattr(mod, ROTARY, None)
        original = getattr(fn, "original", None)
        if original is not None:
            swapped.append((mod, fn))
            setattr(mod, ROTARY, original)
    try:
        yield
    finally:
        for mod, fn in swapped:
            setattr(mod, ROTARY, fn)


@dataclass
class Trace:
    tokens: List[int]
    logprobs: Any  # (len(tokens), vocab) float32 on the CPU; row t is the step that chose tokens[t]


def stock_inputs(vlm: Any, prompt: ChatPrompt) -> Dict[str, Any]:
    """Model inputs from the stock processor (chat template, placeholders, pixels)."""
    proc = vlm.processor
    text = proc.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    kw = proc(text=[text], images=list(prompt.images) or None, return_tensors="pt")
    out: Dict[str, Any] = {}
    for name, value in kw.items():
        value = value.to(vlm.device)
        out[name] = value.to(vlm.dtype) if name == "pixel_values" else value
    return out


def _extend(kw: Dict[str, Any], tokens: Sequence[int]) -> Dict[str, Any]:
    import torch

    if not tokens:
        return kw
    ids = kw["input_ids"]
    new = torch.tensor([list(tokens)], dtype=ids.dtype, device=ids.device)
    out = dict(kw)
    out["input_ids"] = torch.cat([ids, new], 1)
    out["attention_mask"] = torch.cat([kw["attention_mask"], torch.ones_like(new)], 1)
    if "mm_token_type_ids" in kw:
        mm = kw["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(new).to(mm.dtype)], 1)
    return out


def reference_trace(
    vlm: Any, prompt: ChatPrompt, tokens: Optional[Sequence[int]] = None, max_tokens: int = 8
) -> Trace:
    """The stock forward of `vlm.model` (which must not be an engine's model): greedy for up
    to `max_tokens` steps, stopping at end of sequence as the engine does (transformers'
    generate with a plain greedy config, none of the checkpoint's sampling settings or
    repetition penalties), or teacher-forced on `tokens` (one forward over all of them)."""
    import torch
    from transformers import GenerationConfig

    kw = stock_inputs(vlm, prompt)
    length = kw["input_ids"].shape[1]
    with torch.inference_mode(), stock_modeling():
        if tokens is not None:
            logits = vlm.model(**_extend(kw, tokens[:-1])).logits[0, length - 1 :]
            return Trace(list(tokens), torch.log_softmax(logits.float(), -1).cpu())
        greedy = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=vlm.model.generation_config.eos_token_id,
            pad_token_id=vlm.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        out = vlm.model.generate(**kw, generation_config=greedy)
    rows = torch.stack([x[0].float() for x in out.logits])
    return Trace(out.sequences[0, length:].tolist(), torch.log_softmax(rows, -1).cpu())


def engine_trace(engine: Any, prompt: ChatPrompt, tokens: Sequence[int]) -> Trace:
    """The engine's prompt pass and decode steps (graph replays where the engine uses them),
    fed `tokens` in turn, as a decode step feeds each sequence its last pick: the
    log-probabilities each step gives. Needs an idle decode pool (slot 0)."""
    import torch

    d = engine.decoder
    if d.running:
        raise RuntimeError("engine_trace needs an idle decode pool")
    with torch.inference_mode():
        engine.check(prompt)
        batch = engine._build([prompt])
        first, width = engine._prefill_into(d.reserve(1), batch)
        rows = [first[0].float()]
        d.tok[0], d.pos[0], d.col[0] = tokens[0], batch.next_positions[0], width
        for n in range(1, len(tokens)):
            # a graph replay returns its static output buffer, which the next replay overwrites:
            # keep a copy (float32 logits would make `.float()` a view)
            rows.append(d._forward(1, width + n)[0].to(torch.float32, copy=True))
            d.tok[0] = tokens[n]
            d.pos[0] += 1
            d.col[0] += 1
        d.col[0] = 0
        d.cache.mask[0].zero_()
        logprobs = torch.log_softmax(torch.stack(rows), -1).cpu()
    return Trace(list(tokens), logprobs)


@dataclass
class TopKReport:
    positions: int
    k: int
    max_abs_diff: float  # the largest |ours - reference| log-prob over the reference's top k
    argmax_agreement: float  # share of positions where both pick the same token
    close: bool  # every disagreement is a near-tie: each pick is in the other's top k
    first_disagreement: Optional[int]  # position of the first different argmax, if any

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def compare_topk(reference: Trace, ours: Trace, k: int = 5) -> TopKReport:
    """Teacher-forced closeness of two traces over the same tokens."""
    if reference.tokens != ours.tokens:
        raise ValueError("compare traces of the same tokens (teacher-force one on the other's)")
    ref, out = reference.logprobs, ours.logprobs
    ref_top = ref.topk(k, dim=-1).indices
    our_top = out.topk(k, dim=-1).indices
    diff = (out.gather(1, ref_top) - ref.gather(1, ref_top)).abs().max().item()
    ref_pick, our_pick = ref_top[:, 0], our_top[:, 0]
    same = ref_pick == our_pick
    close = True
    for t in (~same).nonzero().flatten().tolist():
        if int(our_pick[t]) not in ref_top[t].tolist() or int(ref_pick[t]) not in our_top[t].tolist():
            close = False
    differ = (~same).nonzero().flatten().tolist()
    return TopKReport(
        positions=len(reference.tokens),
        k=k,
        max_abs_diff=float(diff),
        argmax_agreement=float(same.float().mean()),
        close=close,
        first_disagreement=differ[0] if differ else None,
    )
