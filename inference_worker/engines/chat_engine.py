"""The chat engine on transformers: chat prompts -> completions or candidate scores.

Generation is continuous (decoder.py): prompts are prefilled in groups straight into free
slots of one pool of KV cache rows, and every step decodes one token for each running
sequence, each under its own max_tokens, temperature, top_p, seed and stop sequences; a
sequence leaves the pool the moment it is done. The engine core (inference_worker/core.py)
calls `admit` and `step` between its other work; `generate` runs a whole list of prompts
through the same pool (the batch-at-a-time handlers, tests). A prefill group's images go
through the vision tower in one call, queued before the text side is built. Candidate
scoring reuses a prompt pass: every candidate continuation of every prompt is scored in
one forward pass. Constrained answers (grammar.py): `grammar(constraint)` compiles a
request's constraint (off the model thread, cached) into its Sampling; the decoder masks
the constrained rows of each step.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any, Deque, List, Optional, Sequence, Tuple

from inference_worker.engines.completion import Completion, Scored
from inference_worker.engines.decoder import Decoder, Delta, Finished
from inference_worker.engines.grammar import Constraint, Grammars
from inference_worker.engines.inputs import InputBuilder
from inference_worker.engines.kv_cache import KVCache
from inference_worker.engines.options import EngineOptions
from inference_worker.engines.patch_embedding import use_linear_patch_embedding
from inference_worker.engines.pixels import ImagePolicy
from inference_worker.engines.prefill_graphs import PrefillGraphs
from inference_worker.engines.prompt import ChatPrompt
from inference_worker.engines.sampling import Sampling
from inference_worker.engines.text_stack import TextStack
from inference_worker.engines.vision_attention import use_packed_vision_attention
from inference_worker.engines.vision_encoder import VisionEncoder, has_deepstack
from inference_worker.engines.vision_fusion import fuse_vision_ops
from inference_worker.engines.vision_graphs import VisionGraphs
from inference_worker.models.loading import LoadedVLM
from inference_worker.timing import Stopwatch

log = logging.getLogger("vlmq.engine")

DEFAULT_MAX_SEQUENCES = 256


class ChatEngine:
    def __init__(
        self,
        vlm: LoadedVLM,
        options: Optional[EngineOptions] = None,
        max_sequences: int = DEFAULT_MAX_SEQUENCES,
    ) -> None:
        self.vlm = vlm
        self.options = options or EngineOptions()
        # the path it serves, for the worker's heartbeat (`vlmq inspect`); self_check.py
        # says why when it falls back
        self.path = "stock" if self.options == self.options.stock() else "fast"
        self.model = vlm.model
        self.tokenizer = vlm.tokenizer
        self.device = vlm.device
        ip = vlm.processor.image_processor
        self.policy = ImagePolicy.from_image_processor(ip, self.options.min_pixels, self.options.max_pixels)
        self.inputs = InputBuilder(self.model, vlm.processor, self.policy, vlm.device, vlm.dtype)
        on_gpu = vlm.device.type == "cuda"
        fuse = _auto(self.options.fuse, on_gpu) == "on"
        self.stack = TextStack(
            self.model,
            compile=fuse,
            rotary=self.options.rope,
            decode=self.options.decode_attention,
            swiglu=self.options.prefill_swiglu,
            split=self.options.decode_split,
        )
        use_graphs = self.options.decode == "graphs" or (self.options.decode == "auto" and on_gpu)
        if use_graphs and not on_gpu:
            raise ValueError("decode=graphs needs a CUDA device")
        if self.options.vision == "fast":
            use_packed_vision_attention(self.model)
            use_linear_patch_embedding(self.model)
        if fuse:
            fuse_vision_ops(self.model)
        self.vision = VisionEncoder(self.model)
        if self.options.vision_graphs == "on" and not on_gpu:
            raise ValueError("vision_graphs=on needs a CUDA device")
        self.vision_pass = VisionGraphs(self.vision, _auto(self.options.vision_graphs, on_gpu))
        # our prefill covers towers whose features enter the text model only as input
        # embeddings; Qwen3-VL's deepstack also adds them inside early layers
        deepstack = has_deepstack(self.model)
        if self.options.prefill == "stack" and deepstack:
            raise ValueError("option prefill=stack: this model's deepstack features need prefill=hf or auto")
        self.own_prefill = self.options.prefill != "hf" and not deepstack
        if self.options.prefill_graphs == "on" and not (on_gpu and self.own_prefill):
            raise ValueError("prefill_graphs=on needs a CUDA device and the engine's own prefill")
        self.prefill_pass = PrefillGraphs(
            self.stack,
            _auto(self.options.prefill_graphs, on_gpu) if self.own_prefill else "off",
            width_step=self.options.prefill_width_step,
            max_tokens=self.options.prefill_tokens,
        )
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(set(eos))
        slots, capacity = self._pool_size(max_sequences)
        self.decoder = Decoder(
            self.stack,
            self.tokenizer,
            slots,
            capacity,
            self.eos_ids,
            graphs=use_graphs,
            span_step=self.options.span_step,
            max_graphs=self.options.max_graphs,
            ignore_eos=self.options.ignore_eos,
            bucketed=self.options.decode == "eager-bucketed",
            ahead=self.options.decode_ahead,
        )
        self._grammars: Optional[Grammars] = None
        self._token_text: dict = {}
        self._warm = False

    # ------------------------------------------------------------------ constraints

    def grammars(self) -> Grammars:
        """The grammar compiler for this tokenizer (made on first use: ~2 s for a 150k vocab)."""
        if self._grammars is None:
            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self._grammars = Grammars(self.tokenizer, vocab, self.eos_ids, self.options.grammar_threads)
            self.decoder.grammars = self._grammars
        return self._grammars

    def grammar(self, constraint: Constraint) -> Any:
        """The compiled grammar of a constraint, for `Sampling.grammar`; raises the request's
        ProtocolError when it can't be compiled."""
        return self.grammars().compile(constraint)

    def check_sampling(self, sampling: Sampling) -> None:
        """Raise the ProtocolError a request's decoding settings fail with on this engine."""
        from schemas.errors import ErrorCode, ProtocolError

        if sampling.n > self.decoder.slots:
            raise ProtocolError(
                ErrorCode.INVALID,
                f"n={sampling.n}: this worker decodes at most {self.decoder.slots} rows at once",
            )

    def token_piece(self, token_id: int) -> Tuple[str, bytes]:
        """One token as (text, its bytes): a byte-level token that is part of a character has
        its real bytes, and U+FFFD as text."""
        piece = self._token_text.get(token_id)
        if piece is None:
            name = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if name and all(ch in _BYTE_OF for ch in name):
                raw = bytes(_BYTE_OF[ch] for ch in name)
            else:
                raw = self.tokenizer.decode([token_id]).encode()
            piece = self._token_text[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return piece

    def take_deltas(self) -> List[Delta]:
        """Streaming rows' new tokens since the last call (decoder.take_deltas)."""
        return self.decoder.take_deltas()

    def _pool_size(self, max_sequences: int) -> Tuple[int, int]:
        """(slots, columns per slot) of the decode pool, from the options and free memory."""
        import torch

        cfg = self.model.config.get_text_config()
        opts = self.options
        on_gpu = self.device.type == "cuda"
        capacity = opts.max_context or (8192 if on_gpu else 2048)
        capacity = min(capacity, int(getattr(cfg, "max_position_embeddings", capacity) or capacity))
        per_token = (
            2 * len(self.stack.layers) * self.stack.kv_heads * self.stack.head_dim * self.stack.dtype.itemsize
        )
        if opts.kv_slots:
            return opts.kv_slots, capacity
        if on_gpu:
            budget = opts.kv_memory * torch.cuda.mem_get_info(self.device)[0]
        else:
            budget = opts.kv_memory_mb * 2**20
        slots = min(int(budget // (capacity * per_token)), max_sequences)
        if slots < 1:
            raise ValueError(
                f"the decode pool does not fit: one sequence of max_context={capacity} tokens needs "
                f"{capacity * per_token / 2**20:.0f} MiB; lower max_context or raise kv_memory"
            )
        return slots, capacity

    def warmup(self) -> None:
        """One small request through every path, and the decode graphs of every batch size."""
        if self._warm:
            return
        import numpy as np

        from inference_worker.engines.prompt import user_prompt

        frame = np.zeros((64, 64, 3), dtype=np.uint8)
        for n in (1, 2):  # batch 1 and batch >1 compile separately (fused.py)
            self.generate([user_prompt(frame, "warm up")] * n, [Sampling(max_tokens=2)] * n)
        self.score([user_prompt("warm up")], [["a", "b c"]])
        # a constrained step: the grammar tables and the device mask kernel are made here
        # (without xgrammar, constrained requests are refused one by one, with a reply)
        from schemas.errors import ProtocolError

        try:
            json_row = Sampling(max_tokens=2, grammar=self.grammar(Constraint("json_object")))
        except ProtocolError as exc:
            log.warning("no constrained decoding on this worker: %s", exc.message)
        else:
            self.generate([user_prompt("warm up")], [json_row])
        self.decoder.capture_all(self.decoder.slots)
        self._warm = True

    def check(self, prompt: ChatPrompt, max_tokens: int = 0) -> ChatPrompt:
        """Raise the ProtocolError this prompt would fail with (one request, not its batch):
        placeholders that don't match its images, more than `max_tokens` prompt tokens, or
        a prompt that leaves no room to answer in a decode slot."""
        from schemas.errors import ErrorCode, ProtocolError

        prompt = self.inputs.check(prompt, max_tokens)
        if prompt.tokens >= self.decoder.capacity:
            raise ProtocolError(
                ErrorCode.INVALID,
                f"the prompt has {prompt.tokens} tokens; this worker's context is {self.decoder.capacity} "
                "(engine option max_context)",
            )
        return prompt

    # ------------------------------------------------------------------ continuous generation

    @property
    def free_slots(self) -> int:
        return self.decoder.free

    @property
    def running(self) -> int:
        return self.decoder.running

    def admit(
        self,
        keys: Sequence[Any],
        prompts: Sequence[ChatPrompt],
        samplings: Sequence[Sampling],
        sw: Optional[Stopwatch] = None,
    ) -> List[Finished]:
        """Prefill checked prompts into free decode slots; their sequences start decoding.
        Returns those already done after their first token. A group whose padding to the
        prompt pass's buckets would waste more than another pass costs runs in pieces
        (`PrefillGraphs.pieces`)."""
        sw = sw or Stopwatch()
        out: List[Finished] = []
        lo = 0
        for n in self.prefill_pass.pieces(len(prompts), max(p.tokens for p in prompts)):
            out += self._admit(keys[lo : lo + n], prompts[lo : lo + n], samplings[lo : lo + n], sw)
            lo += n
        return out

    def _admit(
        self, keys: Sequence[Any], prompts: Sequence[ChatPrompt], samplings: Sequence[Sampling], sw: Stopwatch
    ) -> List[Finished]:
        import torch
        from torch.profiler import record_function

        # the profiler's ranges (`vlmq worker --profile-dir`) name what the model thread did
        with torch.inference_mode(), record_function(f"vlmq.admit[{len(prompts)}]"):
            with sw("preprocess"), record_function("vlmq.preprocess"):
                batch = self._build(prompts)
            with sw("prefill"):
                with record_function("vlmq.prefill"):
                    first, width = self._prefill_into(self.decoder.reserve(Decoder.rows_of(samplings)), batch)
                with record_function("vlmq.join"):
                    return self.decoder.join(
                        keys, first, samplings, batch.prompt_tokens(), width, batch.next_positions
                    )

    def step(self) -> List[Finished]:
        """One decode step of every running sequence; returns those that finished."""
        import torch
        from torch.profiler import record_function

        with torch.inference_mode(), record_function(f"vlmq.step[{self.decoder.running}]"):
            return self.decoder.step()

    def abort(self, keys: Sequence[Any]) -> List[Any]:
        return self.decoder.abort(keys)

    def prefill_groups(
        self, prompts: Sequence[ChatPrompt], free: int, rows: Optional[Sequence[int]] = None
    ) -> List[int]:
        """How many of `prompts` (in order) to prefill in each step: each group fits the
        free slots (`rows[i]` slots for prompt i, default 1) and the step's prompt-token
        budget (at least one prompt a group)."""
        rows = rows or [1] * len(prompts)
        groups: List[int] = []
        i = 0
        while i < len(prompts) and free >= rows[i]:
            n, tokens, used = 0, 0, 0
            while i + n < len(prompts) and used + rows[i + n] <= free:
                t = prompts[i + n].tokens
                if n and tokens + t > self.options.prefill_tokens:
                    break
                tokens += t
                used += rows[i + n]
                n += 1
            groups.append(n)
            free -= used
            i += n
        return groups

    def generate(
        self, prompts: Sequence[ChatPrompt], samplings: Sequence[Sampling], sw: Optional[Stopwatch] = None
    ) -> List[Completion]:
        """Every prompt through the decode pool until all are done (prompts join as slots
        free up). For callers that have a whole batch at once; the pool must be idle."""
        sw = sw or Stopwatch()
        for p in prompts:
            self.check(p)
        keys = [_Key(i) for i in range(len(prompts))]
        todo: Deque[int] = deque(range(len(prompts)))
        out: List[Optional[Completion]] = [None] * len(prompts)

        def done(finished: List[Finished]) -> None:
            for key, completion in finished:
                out[key.index] = completion

        while todo or self.decoder.running:
            if todo and self.decoder.free >= samplings[todo[0]].n:
                waiting = [prompts[i] for i in todo]
                n = self.prefill_groups(waiting, self.decoder.free, [samplings[i].n for i in todo])[0]
                group = [todo.popleft() for _ in range(n)]
                done(
                    self.admit(
                        [keys[i] for i in group],
                        [prompts[i] for i in group],
                        [samplings[i] for i in group],
                        sw,
                    )
                )
                continue
            with sw("decode"):
                done(self.step())
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ prompt pass

    def _prefill_into(self, cache: KVCache, batch, padded: bool = True) -> Tuple[Any, int]:
        """The prompts' keys and values into cache rows [0, B); (logits of each last token,
        the column decoding starts at). `padded`: the prompt pass may pad the group
        (prefill_graphs), which moves that column past the batch's own width."""
        width = batch.length
        if self.own_prefill and padded:
            logits, width = self.prefill_pass(
                cache, self.embed(batch), batch.position_ids, batch.attention_mask
            )
        elif self.own_prefill:
            logits = self.stack.prefill(cache, self.embed(batch), batch.position_ids, batch.attention_mask)
        else:
            out = self.model(**batch.model_kwargs(), use_cache=True, logits_to_keep=1)
            cache.load_prefix(getattr(out, "cache", None) or out.past_key_values, batch.attention_mask)
            logits = out.logits[:, -1].float()
        return logits, width

    def _build(self, prompts: Sequence[ChatPrompt]):
        """Model inputs. With our prefill the vision tower is queued on the GPU first (its
        pass does not wait on the CPU), and the text side -- token rows, positions -- is
        built while it runs."""
        images = self.inputs.images(prompts)
        feats = None
        if images is not None and self.own_prefill:
            feats = self.vision_pass(images.pixel_values, images.grids, images.image_grid_thw)
        batch = self.inputs.build(prompts, images)
        batch.image_features = feats
        return batch

    def embed(self, batch) -> Any:
        """Input embeddings (B, S, hidden): token embeddings, image features in place of
        the image placeholders."""
        feats = batch.image_features
        if feats is None and batch.pixel_values is not None:
            feats = self.vision_pass(batch.pixel_values, batch.grids, batch.image_grid_thw)
        return self.stack.input_embeddings(batch.input_ids, feats, batch.image_index)

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
                first = torch.log_softmax(self._prefill_into(prefix, batch, padded=False)[0], dim=-1)
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
        self.decoder = None  # type: ignore[assignment]
        self.stack = None  # type: ignore[assignment]


def _auto(mode: str, on_gpu: bool) -> str:
    """An on/off option's mode (fuse, vision_graphs, prefill_graphs): auto is on on CUDA,
    off elsewhere."""
    return ("on" if on_gpu else "off") if mode == "auto" else mode


def _byte_decoder() -> dict:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's table), reversed."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_OF = _byte_decoder()


class _Key:
    """A sequence handle of `generate`: compared by identity, carries its prompt's index."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index
