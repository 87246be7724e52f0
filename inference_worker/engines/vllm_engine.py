"""The optional vLLM engine (`vlmq worker --backend vllm`): the chat engine's interface on vLLM.

vLLM is imported only when this backend is chosen. The engine is built offline from the
local folder (`LLM(model=DIR)`, nothing fetched); prompts are rendered with the folder's
chat template and vLLM expands the image placeholders itself. Candidate scoring asks
for prompt log-probabilities of prompt + candidate (vLLM's prefix cache shares the
prompt), summed over the candidate's tokens. Options: --option vllm_gpu_memory_utilization=,
vllm_max_model_len=, vllm_enforce_eager=, vllm_tensor_parallel_size=, plus the engine
options max_pixels, min_pixels, ignore_eos.

Not verified on this project's machines: no vLLM is installed on the CPU machines, and
the GPU machine's image has none and its wheel is over the transfer limit
(docs/MODELS.md). tests/test_models_vllm.py runs where vllm is importable.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from inference_worker.engines.completion import Completion, Scored
from inference_worker.engines.options import EngineOptions
from inference_worker.engines.prompt import ChatPrompt
from inference_worker.engines.sampling import Sampling
from inference_worker.engines.text import strip_think
from inference_worker.models.errors import ModelLoadError
from inference_worker.timing import Stopwatch
from schemas.errors import ErrorCode, ProtocolError

IMAGE_PLACEHOLDER = "<|image_pad|>"


class VLLMChatEngine:
    def __init__(self, llm: Any, tokenizer: Any, chat_template: str, options: EngineOptions) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.options = options

    @classmethod
    def from_settings(cls, settings: Any) -> VLLMChatEngine:
        from inference_worker.models.loading import _chat_template, check_folder, read_arch

        read_arch(settings.model_path or "")
        check_folder(settings.model_path)
        try:
            from vllm import LLM
        except ImportError:
            raise ModelLoadError("--backend vllm needs vLLM: pip install vllm (CUDA machines)") from None
        from transformers import AutoTokenizer

        opts: Dict[str, str] = dict(settings.options)
        engine_opts = EngineOptions.parse(opts)
        mm_kwargs: Dict[str, Any] = {}
        if engine_opts.max_pixels:
            mm_kwargs["max_pixels"] = engine_opts.max_pixels
        if engine_opts.min_pixels:
            mm_kwargs["min_pixels"] = engine_opts.min_pixels
        kwargs: Dict[str, Any] = dict(
            model=settings.model_path,
            dtype="auto" if settings.dtype == "auto" else settings.dtype,
            gpu_memory_utilization=float(opts.get("vllm_gpu_memory_utilization", 0.85)),
            enforce_eager=opts.get("vllm_enforce_eager", "0").lower() in ("1", "true", "yes"),
            tensor_parallel_size=int(opts.get("vllm_tensor_parallel_size", 1)),
            limit_mm_per_prompt={"image": int(opts.get("vllm_images_per_prompt", 4))},
            seed=0,
        )
        if "vllm_max_model_len" in opts:
            kwargs["max_model_len"] = int(opts["vllm_max_model_len"])
        if mm_kwargs:
            kwargs["mm_processor_kwargs"] = mm_kwargs
        if settings.quantize:
            kwargs["quantization"] = "bitsandbytes"
        try:
            llm = LLM(**kwargs)
        except Exception as exc:
            raise ModelLoadError(f"vLLM could not load {settings.model_path!r}: {exc}") from exc
        tokenizer = AutoTokenizer.from_pretrained(settings.model_path, local_files_only=True)
        return cls(llm, tokenizer, _chat_template(settings.model_path, tokenizer), engine_opts)

    # ------------------------------------------------------------------ prompts

    def _render(self, prompt: ChatPrompt) -> str:
        if prompt.rendered is None:
            prompt.rendered = self.tokenizer.apply_chat_template(
                prompt.messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        return prompt.rendered

    def check(self, prompt: ChatPrompt) -> ChatPrompt:
        n = self._render(prompt).count(IMAGE_PLACEHOLDER)
        if n != len(prompt.images):
            raise ProtocolError(
                ErrorCode.INVALID,
                f"the prompt has {n} image placeholder(s) but {len(prompt.images)} image(s)",
            )
        return prompt

    def _input(self, prompt: ChatPrompt, suffix: str = "") -> Dict[str, Any]:
        from PIL import Image

        item: Dict[str, Any] = {"prompt": self._render(prompt) + suffix}
        if prompt.images:
            item["multi_modal_data"] = {"image": [Image.fromarray(i) for i in prompt.images]}
        return item

    # ------------------------------------------------------------------ generation and scoring

    def warmup(self) -> None:
        from inference_worker.engines.prompt import user_prompt

        self.generate([user_prompt("warm up")], [Sampling(max_tokens=2)])

    def generate(
        self, prompts: Sequence[ChatPrompt], samplings: Sequence[Sampling], sw: Optional[Stopwatch] = None
    ) -> List[Completion]:
        from vllm import SamplingParams

        sw = sw or Stopwatch()
        with sw("preprocess"):
            inputs = [self._input(p) for p in prompts]
            params = [
                SamplingParams(
                    max_tokens=s.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    stop=list(s.stop) or None,
                    seed=s.seed,
                    ignore_eos=self.options.ignore_eos,
                )
                for s in samplings
            ]
        with sw("generate"):
            outs = self.llm.generate(inputs, params, use_tqdm=False)
        done = []
        for out in outs:
            c = out.outputs[0]
            reason = "length" if c.finish_reason == "length" else "stop"
            raw = c.text
            done.append(
                Completion(
                    strip_think(raw),
                    raw,
                    len(out.prompt_token_ids),
                    len(c.token_ids),
                    reason,
                    list(c.token_ids),
                )
            )
        return done

    def score(
        self,
        prompts: Sequence[ChatPrompt],
        candidates: Sequence[Sequence[str]],
        sw: Optional[Stopwatch] = None,
    ) -> List[Scored]:
        from vllm import SamplingParams

        sw = sw or Stopwatch()
        with sw("preprocess"):
            inputs, lengths, bases = [], [], []
            for p, cands in zip(prompts, candidates):
                text = self._render(p)
                base = len(self.tokenizer(text)["input_ids"])
                bases.append(base)
                for cand in cands:
                    inputs.append(self._input(p, cand))
                    lengths.append(len(self.tokenizer(text + cand)["input_ids"]) - base)
        with sw("score"):
            outs = self.llm.generate(inputs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        # image placeholders expand inside vLLM, before the candidate: its tokens are the last ones
        totals = []
        for out, n in zip(outs, lengths):
            ids, logps = out.prompt_token_ids, out.prompt_logprobs
            totals.append(sum(logps[j][ids[j]].logprob for j in range(len(ids) - n, len(ids))))
        result, k = [], 0
        for base, cands in zip(bases, candidates):
            result.append(Scored(totals[k : k + len(cands)], base))
            k += len(cands)
        return result

    def close(self) -> None:
        self.llm = None
