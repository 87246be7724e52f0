"""The batching chat engine on transformers: one batch of chat prompts -> completions or scores.

One batch, one pass: prompts are templated and left-padded together, all their images go
through the vision tower in one call, one prefill fills the KV cache, and decode steps
run for the whole batch until every row is done, each row under its own max_tokens,
temperature, top_p, seed and stop sequences. Candidate scoring reuses the prefill cache:
every candidate continuation of every prompt is scored in one forward pass.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

from inference_worker.engines.completion import Completion, Scored
from inference_worker.engines.inputs import InputBuilder
from inference_worker.engines.kv_cache import KVCache
from inference_worker.engines.options import EngineOptions
from inference_worker.engines.patch_embedding import use_linear_patch_embedding
from inference_worker.engines.pixels import ImagePolicy
from inference_worker.engines.prompt import ChatPrompt
from inference_worker.engines.sampling import Sampling, TokenSelector
from inference_worker.engines.steps import EagerSteps, GraphSteps
from inference_worker.engines.text import cut_at_stop, find_stop, strip_think
from inference_worker.engines.text_stack import TextStack
from inference_worker.engines.vision_attention import use_packed_vision_attention
from inference_worker.engines.vision_encoder import VisionEncoder, has_deepstack
from inference_worker.engines.vision_fusion import fuse_vision_ops
from inference_worker.handlers.base import Stopwatch
from inference_worker.models.loading import LoadedVLM

CHECK_EVERY = 4  # decode steps between checks that every row is done


class ChatEngine:
    def __init__(self, vlm: LoadedVLM, options: Optional[EngineOptions] = None) -> None:
        import torch

        self.vlm = vlm
        self.options = options or EngineOptions()
        self.model = vlm.model
        self.tokenizer = vlm.tokenizer
        self.device = vlm.device
        ip = vlm.processor.image_processor
        self.policy = ImagePolicy.from_image_processor(ip, self.options.min_pixels, self.options.max_pixels)
        self.inputs = InputBuilder(self.model, vlm.processor, self.policy, vlm.device, vlm.dtype)
        on_gpu = vlm.device.type == "cuda"
        fuse = self.options.fuse == "on" or (self.options.fuse == "auto" and on_gpu)
        self.stack = TextStack(self.model, compile=fuse)
        use_graphs = self.options.decode == "graphs" or (self.options.decode == "auto" and on_gpu)
        if use_graphs and vlm.device.type != "cuda":
            raise ValueError("decode=graphs needs a CUDA device")
        self.steps = (
            GraphSteps(self.stack, self.options.capacity_step, self.options.max_graphs)
            if use_graphs
            else EagerSteps(self.stack)
        )
        if self.options.vision == "fast":
            use_packed_vision_attention(self.model)
            use_linear_patch_embedding(self.model)
        if fuse:
            fuse_vision_ops(self.model)
        self.vision = VisionEncoder(self.model)
        # our prefill covers towers whose features enter the text model only as input
        # embeddings; Qwen3-VL's deepstack also adds them inside early layers
        deepstack = has_deepstack(self.model)
        if self.options.prefill == "stack" and deepstack:
            raise ValueError("option prefill=stack: this model's deepstack features need prefill=hf or auto")
        self.own_prefill = self.options.prefill != "hf" and not deepstack
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        self.eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        self._warm = False

    def warmup(self) -> None:
        """One small request through every path (and the first CUDA graph), once."""
        if self._warm:
            return
        import numpy as np

        from inference_worker.engines.prompt import user_prompt

        frame = np.zeros((64, 64, 3), dtype=np.uint8)
        for n in (1, 2):  # batch 1 and batch >1 compile separately (fused.py)
            self.generate([user_prompt(frame, "warm up")] * n, [Sampling(max_tokens=2)] * n)
        self.score([user_prompt("warm up")], [["a", "b c"]])
        self._warm = True

    def check(self, prompt: ChatPrompt) -> ChatPrompt:
        """Raise the ProtocolError this prompt would fail with (one request, not its batch)."""
        return self.inputs.check(prompt)

    # ------------------------------------------------------------------ generation

    def generate(
        self, prompts: Sequence[ChatPrompt], samplings: Sequence[Sampling], sw: Optional[Stopwatch] = None
    ) -> List[Completion]:
        import torch

        sw = sw or Stopwatch()
        with torch.inference_mode():
            with sw("preprocess"):
                batch = self._build(prompts)
            max_new = max(s.max_tokens for s in samplings)
            with sw("prefill"):
                cache, first = self._prefill(batch, extra=max_new)
            with sw("decode"):
                tokens = self._decode(cache, batch, first, samplings, max_new)
        with sw("detokenize"):
            return [self._finish(t, s, n) for t, s, n in zip(tokens, samplings, batch.prompt_tokens())]

    def _prefill(self, batch, extra: int) -> Tuple[KVCache, Any]:
        cache = self.steps.open(batch.batch, batch.length + extra)
        first = self._prefill_into(cache, batch)
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)  # stage timings measure the GPU, not the launches
        return cache, first

    def _prefill_into(self, cache: KVCache, batch) -> Any:
        """The prompts' keys and values into cache rows [0, B); logits of each last token."""
        if self.own_prefill:
            return self.stack.prefill(cache, self.embed(batch), batch.position_ids, batch.attention_mask)
        out = self.model(**batch.model_kwargs(), use_cache=True, logits_to_keep=1)
        cache.load_prefix(getattr(out, "cache", None) or out.past_key_values, batch.attention_mask)
        return out.logits[:, -1].float()

    def _build(self, prompts: Sequence[ChatPrompt]):
        """Model inputs. With our prefill the vision tower is queued on the GPU first (its
        pass does not wait on the CPU), and the text side -- chat template, tokens,
        positions, ~0.3 ms a prompt -- is built while it runs."""
        images = self.inputs.images(prompts)
        feats = None
        if images is not None and self.own_prefill:
            feats = self.vision(images.pixel_values, images.grids, images.image_grid_thw)
        batch = self.inputs.build(prompts, images)
        batch.image_features = feats
        return batch

    def embed(self, batch) -> Any:
        """Input embeddings (B, S, hidden): token embeddings, image features in place of
        the image placeholders."""
        feats = batch.image_features
        if feats is None and batch.pixel_values is not None:
            feats = self.vision(batch.pixel_values, batch.grids, batch.image_grid_thw)
        return self.stack.input_embeddings(batch.input_ids, feats, batch.image_index)

    def _decode(
        self, cache: KVCache, batch, first, samplings: Sequence[Sampling], max_new: int
    ) -> List[List[int]]:
        import torch

        select = TokenSelector(samplings, self.device)
        limits = torch.tensor([s.max_tokens for s in samplings], device=self.device)
        stop_rows = [i for i, s in enumerate(samplings) if s.stop]
        ended = torch.zeros(batch.batch, dtype=torch.bool, device=self.device)
        tok = select(first)
        generated = [tok]
        for n in range(1, max_new + 1):
            if not self.options.ignore_eos:
                ended |= torch.isin(tok, self.eos)
            ended |= limits <= n
            if stop_rows:
                ended |= self._stopped(generated, stop_rows, samplings)
            # asking the GPU whether all rows are done waits for it: do it every few steps
            # (rows that are done meanwhile run on and are cut in _finish)
            if n == max_new or ((stop_rows or n % CHECK_EVERY == 0) and bool(ended.all())):
                break
            logits = self.steps.step(cache, tok, batch.next_positions + (n - 1), batch.length + n - 1)
            tok = select(logits)
            generated.append(tok)
        return torch.stack(generated, dim=1).tolist()

    def _stopped(self, generated: List[Any], rows: List[int], samplings: Sequence[Sampling]) -> Any:
        import torch

        so_far = torch.stack(generated, dim=1)[rows].tolist()
        hit = torch.zeros(len(samplings), dtype=torch.bool)
        for r, toks in zip(rows, so_far):
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            hit[r] = find_stop(text, samplings[r].stop) is not None
        return hit.to(self.device)

    def _finish(self, tokens: List[int], s: Sampling, prompt_tokens: int) -> Completion:
        tokens = tokens[: s.max_tokens]
        reason = "length"
        if not self.options.ignore_eos:
            ends = [i for i, t in enumerate(tokens) if t in self.eos_ids]
            if ends:
                tokens, reason = tokens[: ends[0] + 1], "stop"
        raw = self.tokenizer.decode(tokens, skip_special_tokens=True)
        text, stopped = cut_at_stop(raw, s.stop)
        if stopped:
            reason = "stop"
            tokens = tokens[: self._tokens_until_stop(tokens, s.stop)]
        return Completion(strip_think(text), raw, prompt_tokens, len(tokens), reason, tokens)

    def _tokens_until_stop(self, tokens: List[int], stops: Sequence[str]) -> int:
        for k in range(1, len(tokens) + 1):
            if find_stop(self.tokenizer.decode(tokens[:k], skip_special_tokens=True), stops) is not None:
                return k
        return len(tokens)

    # ------------------------------------------------------------------ scoring

    def score(
        self,
        prompts: Sequence[ChatPrompt],
        candidates: Sequence[Sequence[str]],
        sw: Optional[Stopwatch] = None,
    ) -> List[Scored]:
        """Summed log-probability of each candidate as the start of the assistant's answer.

        Tokens are scored in context ("-1" is two tokens under Qwen's digit splitting, so a
        first-token comparison would be wrong)."""
        import torch

        sw = sw or Stopwatch()
        with torch.inference_mode():
            with sw("preprocess"):
                batch = self._build(prompts)
                ids = [
                    [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in cs]
                    for cs in candidates
                ]
            with sw("prefill"):
                prefix = self.stack.new_cache(batch.batch, batch.length)
                first = torch.log_softmax(self._prefill_into(prefix, batch), dim=-1)
            with sw("score"):
                rows = [(r, c) for r in range(len(ids)) for c in ids[r]]
                totals: List[float] = []
                for lo in range(0, len(rows), self.options.score_rows):
                    totals += self._score_rows(prefix, batch, first, rows[lo : lo + self.options.score_rows])
        out: List[Scored] = []
        k = 0
        for cs, n in zip(ids, batch.prompt_tokens()):
            out.append(Scored(totals[k : k + len(cs)], n))
            k += len(cs)
        return out

    def _score_rows(self, prefix: KVCache, batch, first, rows: List[Tuple[int, List[int]]]) -> List[float]:
        import torch

        prompt_rows = [r for r, _ in rows]
        scores = [first[r, c[0]].item() if c else -math.inf for r, c in rows]
        longest = max((len(c) for _, c in rows), default=0)
        if longest <= 1:
            return scores
        # feed c[0..L-2] after each prompt; the logits at feed position j score token c[j+1]
        feed = torch.zeros((len(rows), longest - 1), dtype=torch.long)
        for i, (_, c) in enumerate(rows):
            feed[i, : max(0, len(c) - 1)] = torch.tensor(c[:-1], dtype=torch.long)
        feed = feed.to(self.device)
        order = sorted(range(len(rows)), key=lambda i: prompt_rows[i])
        counts = [prompt_rows.count(r) for r in range(prefix.batch)]
        cache = prefix.repeat_rows(counts, longest - 1)  # rows in prompt order, each once per candidate
        feed = feed[order]
        pos = batch.next_positions[[prompt_rows[i] for i in order]][:, None] + torch.arange(
            longest - 1, device=self.device
        )
        start = torch.tensor(batch.length, device=self.device)
        logp = torch.log_softmax(self.stack.forward(cache, feed, pos, start), dim=-1).cpu()
        for j, i in enumerate(order):
            c = rows[i][1]
            scores[i] += sum(logp[j, t, c[t + 1]].item() for t in range(len(c) - 1))
        return scores

    def close(self) -> None:
        self.steps = None  # type: ignore[assignment]
        self.stack = None  # type: ignore[assignment]
