"""Constrained decoding: grammars compiled for the engine's tokenizer, one token mask per row.

A request may constrain its answer (schemas' `Constraint`): a JSON schema, any JSON object,
a regular expression, one of a list of strings, or an EBNF grammar. The grammar is compiled
once per distinct constraint (cached; compiling runs off the model thread, when the
request's program starts) with xgrammar, and every constrained row of a decode step gets a
matcher whose state advances with each token the row takes.

Why xgrammar (llguidance was the other candidate): at batch 128 under the MineRL action
grammar with a 151,936-token Qwen-sized vocabulary, filling the masks of a step took
0.6 ms (median, one CPU thread) with xgrammar against 7.7 ms with llguidance's parallel
filler on the same 2-core machine (`vlmq bench structured --parts mask` measures it); a
2B decode step at batch 128 is a few ms on an H100. xgrammar pays at compile time instead
(40-60 ms for a small schema, cached by constraint), off the model thread.

On the device the mask is applied to the step's logits after the decode graph's replay
and before token choice: the bitmask is filled on the CPU while the GPU runs the step,
copied over once (pinned memory, non-blocking), and applied in place by xgrammar's kernel
to the constrained rows only. Rows without a constraint cost nothing. A matcher takes a
row's token while the GPU runs the next step (decoder.py, `Decoder.step`), not between the
steps, where the GPU would wait on it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from inference_worker.engines.upload import constant
from schemas.errors import ErrorCode, ProtocolError

log = logging.getLogger("vlmq.grammar")

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Constraint:
    """What a row's answer must match. `spec`: the JSON schema as JSON text (json_schema), the
    pattern (regex), the choices as a JSON list (choice), the EBNF text (grammar), "" for
    json_object."""

    kind: str
    spec: str = ""
    or_text: bool = False  # json_schema: or plain text that does not start with "{"

    @classmethod
    def of(cls, c: Any) -> Optional[Constraint]:
        """From a request's `constraint` field (schemas.messages.Constraint), or None."""
        if c is None or c.type == "text":
            return None
        if c.type == "json_schema":
            return cls("json_schema", json.dumps(c.json_schema, sort_keys=True), c.or_text)
        if c.type == "regex":
            return cls("regex", c.pattern or "")
        if c.type == "choice":
            return cls("choice", json.dumps(list(c.choices or ())))
        if c.type == "grammar":
            return cls("grammar", c.grammar or "")
        return cls("json_object")


def _escape_ebnf(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # an EBNF string literal is a JSON string


class Grammars:
    """The compiler of one engine's constraints (thread-safe: programs start on the prep
    thread, matchers are made and advanced on the model thread)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], threads: int = 1) -> None:
        """`vocab_size`: the model's logit width, which may exceed the tokenizer's ids (padding
        rows of the embedding, never valid under a grammar)."""
        try:
            import xgrammar as xgr
        except ImportError:  # pragma: no cover - the worker extra installs it
            raise ProtocolError(
                ErrorCode.INVALID,
                "constrained decoding needs xgrammar on the worker (pip install 'vlmq[worker]')",
            ) from None
        self.xgr = xgr
        # xgrammar learns only the tokenizer's own ids: given the padded width, it keeps the
        # padding ids in a list that `accept_token` scans, ~25 us a token for 151k padding
        # ids over a 744-token tokenizer (~0.5 us without). The padding columns are masked
        # here instead (`BitMask.apply`).
        own = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        self.tokens = min(vocab_size, own)
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.tokens, stop_token_ids=list(stop_ids)
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=4, cache_limit_bytes=512 * 2**20)
        self._lock = threading.Lock()
        self.threads = threads
        self._batch = xgr.BatchGrammarMatcher(threads) if threads > 1 else None

    def compile(self, c: Constraint) -> Any:
        """The compiled grammar of a constraint; a constraint that can't be one is the
        request's own `invalid` error."""
        try:
            with self._lock:
                if c.kind == "json_object":  # any object (xgrammar's builtin JSON also allows arrays)
                    return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                if c.kind == "json_schema" and c.or_text:
                    xgr = self.xgr
                    g = xgr.Grammar.union(
                        xgr.Grammar.from_json_schema(c.spec, any_whitespace=False, strict_mode=True),
                        xgr.Grammar.from_regex(r"[^{\s][\s\S]*"),
                    )
                    return self.compiler.compile_grammar(g)
                if c.kind == "json_schema":
                    return self.compiler.compile_json_schema(c.spec, any_whitespace=False, strict_mode=True)
                if c.kind == "regex":
                    return self.compiler.compile_regex(c.spec)
                if c.kind == "choice":
                    choices = json.loads(c.spec)
                    if not choices:
                        raise ValueError("choice needs at least one string")
                    ebnf = "root ::= " + " | ".join(_escape_ebnf(s) for s in choices)
                    return self.compiler.compile_grammar(ebnf)
                if c.kind == "grammar":
                    return self.compiler.compile_grammar(c.spec)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(
                ErrorCode.INVALID, f"constraint {c.kind}: cannot compile it: {_first_line(exc)}"
            ) from None
        raise ProtocolError(ErrorCode.INVALID, f"constraint type {c.kind!r} is not one of {KINDS}")

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    # ------------------------------------------------------------------ per step

    def new_bitmask(self, rows: int, device: Any) -> BitMask:
        return BitMask(self, rows, device)


class BitMask:
    """The token bitmask of the decode pool's rows: filled on the host, applied on the device."""

    def __init__(self, grammars: Grammars, rows: int, device: Any) -> None:
        import torch

        self.g = grammars
        shape = grammars.xgr.get_bitmask_shape(rows, grammars.tokens)
        on_gpu = getattr(device, "type", str(device)) == "cuda"
        self.host = torch.full(shape, -1, dtype=torch.int32, pin_memory=on_gpu)
        self.device_mask = torch.empty(shape, dtype=torch.int32, device=device) if on_gpu else self.host

    def apply(self, logits: Any, rows: List[int], matchers: List[Any]) -> None:
        """Mask `logits` (n, vocab) in place: row rows[k] may only take tokens matchers[k] allows."""
        g = self.g
        if g._batch is not None and len(rows) > 8:
            g._batch.batch_fill_next_token_bitmask(matchers, self.host, rows)
        else:
            for r, m in zip(rows, matchers):
                m.fill_next_token_bitmask(self.host, r)
        n = logits.shape[0]
        mask = self.device_mask
        if mask is not self.host:
            mask[:n].copy_(self.host[:n], non_blocking=True)
        g.xgr.apply_token_bitmask_inplace(logits, mask[:n], vocab_size=g.tokens, indices=rows)
        if g.tokens < logits.shape[1]:  # the model's padding ids: never a grammar's token
            logits[constant(rows, logits.device), g.tokens :] = float("-inf")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
