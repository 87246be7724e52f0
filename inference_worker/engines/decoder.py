"""Continuous decoding: sequences join and leave a running decode between steps.

The KV cache is a pool of `slots` rows of `capacity` columns each, allocated once
(kv_cache.py). A running sequence owns one slot; sequences occupy slots [0, n), and a
step feeds every one of them its last token, each at its own cache column and rope
position, and picks each one's next token under its own sampling settings. A sequence
leaves the moment it is done (end of sequence, a stop string, its own max_tokens, the end
of its slot, an abort) and the last sequences move into the freed slots, so the running
set stays dense. New sequences are prefilled straight into the free slots after it
(`reserve`, then `join`) between any two steps.

On CUDA a step is one graph replay per (batch bucket, span bucket): rows past n in the
bucket are free slots whose results are ignored, and attention reads only the first
`span` columns (rounded up to `span_step`), so a 4,096-token sequence slows the steps it
runs in, not the memory layout of the others. Eager steps run exactly n rows and span.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from inference_worker.engines.completion import Completion
from inference_worker.engines.cuda_graphs import Graph, GraphCache
from inference_worker.engines.kv_cache import KVCache
from inference_worker.engines.sampling import Sampling, new_generator, select_tokens
from inference_worker.engines.text import cut_at_stop, find_stop, strip_think
from inference_worker.engines.text_stack import TextStack

# Batch sizes the decode graphs are captured at: a step of n rows replays the smallest
# bucket >= n (every multiple of 8 would be ~30 graphs for 256 slots; these keep padding
# under ~25% past 16 rows).
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket(n: int) -> int:
    for b in BUCKETS:
        if b >= n:
            return b
    return -(-n // 64) * 64


@dataclass(eq=False)
class Running:
    """One sequence in the decode pool."""

    key: Any  # the caller's handle
    sampling: Sampling
    prompt_tokens: int
    col: int  # the cache column the next fed token is written to
    generator: Optional[Any]
    tokens: List[int] = field(default_factory=list)


Finished = Tuple[Any, Completion]


class Decoder:
    def __init__(
        self,
        stack: TextStack,
        tokenizer: Any,
        slots: int,
        capacity: int,
        eos_ids: Sequence[int],
        graphs: bool,
        span_step: int = 256,
        max_graphs: int = 48,
        ignore_eos: bool = False,
        bucketed: bool = False,
    ) -> None:
        import torch

        self.stack = stack
        self.tokenizer = tokenizer
        self.slots = slots
        self.capacity = capacity
        self.eos = frozenset(eos_ids)
        self.ignore_eos = ignore_eos
        self.span_step = span_step
        dev = stack.device
        self.cache: KVCache = stack.new_cache(slots, capacity)
        self.tok = torch.zeros(slots, dtype=torch.long, device=dev)  # each slot's token to feed next
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)  # its rope position
        self.col = torch.zeros(slots, dtype=torch.long, device=dev)  # the column it is written to
        self.rows = torch.arange(slots, device=dev)
        self.seqs: List[Running] = []  # seqs[i] owns slot i
        self.graphs: Optional[GraphCache] = GraphCache(max_graphs) if graphs else None
        # eager steps at the graphs' padded shapes: the same kernels on the same shapes as a
        # replay, which is what a bitwise graph-vs-eager check compares
        self.bucketed = graphs or bucketed
        self.steps = 0

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> int:
        return len(self.seqs)

    @property
    def free(self) -> int:
        return self.slots - len(self.seqs)

    def keys(self) -> List[Any]:
        return [s.key for s in self.seqs]

    # ------------------------------------------------------------------ joining

    def reserve(self, n: int) -> KVCache:
        """The free slots the next `n` sequences will own, to prefill their prompts into."""
        if n > self.free:
            raise ValueError(f"{n} sequences do not fit the {self.free} free decode slots")
        lo = len(self.seqs)
        return self.cache.slice(lo, lo + n)

    def join(
        self,
        keys: Sequence[Any],
        first_logits: Any,
        samplings: Sequence[Sampling],
        prompt_tokens: Sequence[int],
        width: int,
        next_positions: Any,
    ) -> List[Finished]:
        """Sequences whose prompts were prefilled into `reserve(len(keys))` (a left-padded group
        of `width` columns) start decoding; `first_logits` (n, vocab) give their first tokens.
        Returns those already finished by that token."""
        lo, n = len(self.seqs), len(keys)
        gens = [new_generator(s, self.stack.device) for s in samplings]
        first = select_tokens(first_logits, samplings, gens)
        self.tok[lo : lo + n] = first
        self.pos[lo : lo + n] = next_positions
        self.col[lo : lo + n] = width
        for key, s, p, g, t in zip(keys, samplings, prompt_tokens, gens, first.tolist()):
            self.seqs.append(Running(key, s, int(p), width, g, [t]))
        return self._collect(range(lo, lo + n))

    # ------------------------------------------------------------------ stepping

    def step(self) -> List[Finished]:
        """One token for every running sequence; returns those that finished."""
        n = len(self.seqs)
        if not n:
            return []
        span = max(s.col for s in self.seqs) + 1
        logits = self._forward(n, span)
        seqs = self.seqs
        if all(s.sampling.greedy for s in seqs):
            toks = logits.argmax(dim=-1)
        else:
            toks = select_tokens(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        self.tok[:n] = toks
        self.pos[:n] += 1
        self.col[:n] += 1
        for s, t in zip(seqs, toks.tolist()):  # the one GPU->CPU sync of a step
            s.col += 1
            s.tokens.append(t)
        self.steps += 1
        return self._collect(range(n))

    def _forward(self, n: int, span: int) -> Any:
        b, s = n, span
        if self.bucketed:
            b = min(bucket(n), self.slots)
            s = min(-(-span // self.span_step) * self.span_step, self.capacity)
        if self.graphs is None:
            return self.stack.decode(
                self.cache.rows(b), self.tok[:b], self.pos[:b], self.col[:b], self.rows[:b], s
            )[:n]
        return self.graphs.get((b, s), self._capture(b, s)).replay()[:n]

    def _capture(self, b: int, span: int) -> Callable[[Any], Graph]:
        cache, tok, pos, col, rows = (
            self.cache.rows(b),
            self.tok[:b],
            self.pos[:b],
            self.col[:b],
            self.rows[:b],
        )
        return lambda pool: Graph(lambda: self.stack.decode(cache, tok, pos, col, rows, span), pool)

    def capture_all(self, max_rows: int) -> int:
        """Capture the step graphs of every batch bucket up to `max_rows` at the first span
        bucket, so the first steps at a new size don't pay a capture. Only while idle: a
        capture's warm-up runs write the cache columns of rows [0, bucket)."""
        if self.graphs is None or self.seqs:
            return 0
        made = 0
        for b in BUCKETS:
            if b > min(max_rows, self.slots):
                break
            key = (b, min(self.span_step, self.capacity))
            if key not in self.graphs:
                self.graphs.get(key, self._capture(*key))
                made += 1
        self.cache.mask.zero_()
        self.col.zero_()
        return made

    # ------------------------------------------------------------------ leaving

    def abort(self, keys: Sequence[Any]) -> List[Any]:
        """Stop these sequences now (their slots are freed); returns the keys that were running."""
        drop = {id(k) for k in keys}
        gone = [i for i, s in enumerate(self.seqs) if id(s.key) in drop]
        found = [self.seqs[i].key for i in gone]
        self._remove(gone)
        return found

    def _collect(self, indices: Sequence[int]) -> List[Finished]:
        done: List[Tuple[int, str]] = []
        for i in indices:
            reason = self._stop_reason(self.seqs[i])
            if reason is not None:
                done.append((i, reason))
        out = [(self.seqs[i].key, self._completion(self.seqs[i], reason)) for i, reason in done]
        self._remove([i for i, _ in done])
        return out

    def _stop_reason(self, s: Running) -> Optional[str]:
        last = s.tokens[-1]
        if not self.ignore_eos and last in self.eos:
            return "stop"
        if s.sampling.stop and find_stop(self._decode(s.tokens), s.sampling.stop) is not None:
            return "stop"
        if len(s.tokens) >= s.sampling.max_tokens or s.col >= self.capacity:
            return "length"
        return None

    def _remove(self, indices: Sequence[int]) -> None:
        """Free these slots; the last sequences move into the freed slots below the new end."""
        if not indices:
            return
        import torch

        gone = set(indices)
        keep = len(self.seqs) - len(gone)
        holes = [i for i in sorted(gone) if i < keep]
        tail = [i for i in range(keep, len(self.seqs)) if i not in gone]
        if holes:
            span = max(self.seqs[i].col for i in tail) + 1
            dst = torch.tensor(holes, device=self.rows.device)
            src = torch.tensor(tail, device=self.rows.device)
            self.cache.move_rows(dst, src, min(span, self.capacity))
            for x in (self.tok, self.pos, self.col):
                x[dst] = x[src]
            for h, t in zip(holes, tail):
                self.seqs[h] = self.seqs[t]
        del self.seqs[keep:]
        # a freed slot may still be replayed as graph padding: keep its column in range
        self.col[keep : keep + len(gone)] = 0

    # ------------------------------------------------------------------ results

    def _decode(self, tokens: List[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _completion(self, s: Running, reason: str) -> Completion:
        tokens = s.tokens
        raw = self._decode(tokens)
        text, stopped = cut_at_stop(raw, s.sampling.stop)
        if stopped:
            tokens = tokens[: self._tokens_until_stop(tokens, s.sampling.stop)]
        return Completion(strip_think(text), raw, s.prompt_tokens, len(tokens), reason, tokens)

    def _tokens_until_stop(self, tokens: List[int], stops: Sequence[str]) -> int:
        for k in range(1, len(tokens) + 1):
            if find_stop(self._decode(tokens[:k]), stops) is not None:
                return k
        return len(tokens)

    def stats(self) -> Dict[str, int]:
        return {
            "slots": self.slots,
            "capacity": self.capacity,
            "running": len(self.seqs),
            "graphs": len(self.graphs) if self.graphs is not None else 0,
        }
