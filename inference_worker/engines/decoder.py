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

Steps run ahead of the host by one (`step`): step k+1 is launched before the host reads
step k's tokens, which reach it through an asynchronous copy, so the host's per-step
work (stop checks, grammars, replies, the scheduler) overlaps the GPU's instead of
leaving it idle between steps. A sequence is found done one step late; the token that
step gave it is dropped. A prompt group's first tokens are read the same way: `join`
queues their choice and copy, and the next `step` reads them after launching, so the host
never waits for a prompt pass (and the GPU never waits for the host after one).

Per-row extras, each paid for only by the rows that ask: a grammar (its token mask is
applied to the step's logits after the forward, before token choice; a row whose grammar
is finished ends with "stop"), log-probabilities of the chosen and the most likely tokens,
`n` answers of one prompt (the prompt is prefilled once and its cache row copied into n
slots), and streaming (each step's new tokens are handed out by `take_deltas`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple

from inference_worker.engines.completion import Completion, TokenLogprob
from inference_worker.engines.cuda_graphs import Graph, GraphCache
from inference_worker.engines.kv_cache import KVCache
from inference_worker.engines.sampling import Sampling, new_generator, select_tokens
from inference_worker.engines.text import cut_at_stop, stop_in_tail, strip_think, tokens_until_stop
from inference_worker.engines.text_stack import TextStack
from inference_worker.engines.upload import constant

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
    index: int = 0  # which of the request's n answers
    matcher: Optional[Any] = None  # the grammar state of a constrained row
    broken: bool = False  # its grammar refused a token (cannot happen under the mask)
    logprobs: Optional[List[TokenLogprob]] = None
    sent: int = 0  # tokens already handed out as deltas (streaming)
    left: bool = False  # it left the pool (a step still in flight drops its token)


@dataclass(eq=False)
class _Flight:
    """A launched step whose tokens the host has not read yet."""

    seqs: List[Running]  # row i of the step belongs to seqs[i]
    toks: Any  # its tokens, on their way to the host
    lp: Optional[Any]  # (rows, chosen logprobs, (top values, top indices) or None), likewise
    copied: Optional[Any]  # the CUDA event after the copies (None on a CPU)


Finished = Tuple[Any, Any]  # (key, Completion; a list of n Completions when n > 1)
# a streaming row's new tokens: (key, answer index, token ids, their logprobs or None)
Delta = Tuple[Any, int, List[int], Optional[List[TokenLogprob]]]


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
        ahead: bool = True,
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
        self.grammars: Optional[Any] = None  # grammar.Grammars, set by the engine
        self._bitmask: Optional[Any] = None
        self._groups: Dict[int, List[Optional[Completion]]] = {}  # n > 1: answers so far, by id(key)
        self.ahead = ahead
        self._flight: Optional[_Flight] = None
        self._joined: List[_Flight] = []  # prompt groups' first tokens not read yet (ahead)
        self._deltas: List[Delta] = []

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
        """Sequences whose prompts were prefilled into the first len(keys) slots of
        `reserve(rows(samplings))` (a left-padded group of `width` columns) start decoding;
        `first_logits` (len(keys), vocab) give their first tokens. A prompt of n > 1 answers
        has its cache row copied into n - 1 more slots. Returns those already finished by
        their first token; with `ahead`, none: the next `step` reads the first tokens."""
        import torch

        lo, b = len(self.seqs), len(keys)
        extra = [(k, j) for k, s in enumerate(samplings) for j in range(1, s.n)]
        if extra:
            dev = self.rows.device
            src = constant([lo + k for k, _ in extra], dev)
            self.cache.move_rows(torch.arange(lo + b, lo + b + len(extra), device=dev), src, width)
            again = constant([k for k, _ in extra], first_logits.device)
            first_logits = torch.cat([first_logits, first_logits.index_select(0, again)])
            next_positions = torch.cat(
                [next_positions, next_positions.index_select(0, again.to(next_positions.device))]
            )
        new: List[Running] = []
        for k, j in [(k, 0) for k in range(b)] + extra:
            s = samplings[k]
            g = new_generator(s, self.stack.device, j)
            m = (
                self.grammars.matcher(s.grammar)
                if s.grammar is not None and self.grammars is not None
                else None
            )
            new.append(Running(keys[k], s, int(prompt_tokens[k]), width, g, [], j, m))
            if s.n > 1 and j == 0:
                self._groups[id(keys[k])] = [None] * s.n
        n = len(new)
        first, lp = self._choose(first_logits, new)
        self.tok[lo : lo + n] = first
        self.pos[lo : lo + n] = next_positions
        self.col[lo : lo + n] = width
        self.seqs += new
        if self.ahead:  # read with the next step's news: the host does not wait for the prompt pass
            self._joined.append(_Flight(new, *self._send(first, lp)))
            return []
        self._took(new, first.tolist(), _lists(lp))
        return self._finish(self._check(new))

    @staticmethod
    def rows_of(samplings: Sequence[Sampling]) -> int:
        """Decode slots these requests take (n each)."""
        return sum(s.n for s in samplings)

    # ------------------------------------------------------------------ stepping

    def step(self) -> List[Finished]:
        """One decode step of every running sequence; returns the sequences that finished.

        With `ahead` (the default), a call launches this step's forward pass first and only
        then reads the tokens the previous call chose: the GPU runs step k+1 while the CPU
        takes step k's tokens (stop checks, grammars, replies), so the host's per-step work
        is off the GPU's critical path. The price: what a call returns is the previous
        step's news, and a sequence that ends at step k has computed one more token, which
        is dropped. A call where some row has no column left for that extra token reads
        first and launches after (`_needs_reading_first`)."""
        flight, self._flight = self._flight, None
        joined, self._joined = self._joined, []
        out: List[Finished] = []
        if flight is not None and (not self.ahead or self._needs_reading_first(flight)):
            out = self._land(flight, self._read(flight))
            flight = None
        if not self.seqs:
            for j in joined:  # every row of it was aborted
                out += self._land(j, self._read(j))
            return out
        n = len(self.seqs)
        span = max(s.col for s in self.seqs) + 1
        logits = self._forward(n, span)  # on CUDA: queued, the CPU goes on meanwhile
        launched = list(self.seqs)
        for s in launched:
            s.col += 1
        done: List[Tuple[Running, str]] = []
        ahead = {id(s) for s in launched}
        if flight is not None:
            done = self._take(flight, self._read(flight), ahead)
        for j in joined:  # first tokens, before any of the step just launched
            done += self._take(j, self._read(j), ahead)
        # rows that ended at the step just read get no mask (a finished grammar allows nothing)
        gone = {id(s) for s, _ in done}
        toks, lp = self._choose(logits, launched, skip={i for i, s in enumerate(launched) if id(s) in gone})
        self.tok[:n] = toks
        self.pos[:n] += 1
        self.col[:n] += 1
        self._flight = _Flight(launched, *self._send(toks, lp))
        self.steps += 1
        out += self._finish(done)
        if not self.ahead:  # read the step just launched now, not at the next call
            flight, self._flight = self._flight, None
            out += self._land(flight, self._read(flight))
        return out

    def _needs_reading_first(self, flight: _Flight) -> bool:
        """Whether a row's next column is past the end of its slot (it ends at the step in
        flight; launching first would write past the cache), or every row ends there for
        certain (a step launched first would be wasted)."""
        if any(s.col >= self.capacity for s in self.seqs):
            return True
        flying = {id(s) for s in flight.seqs}
        return all(id(s) in flying and len(s.tokens) + 1 >= s.sampling.max_tokens for s in self.seqs)

    def _send(self, toks: Any, lp: Optional[Any]) -> Tuple[Any, Optional[Any], Optional[Any]]:
        """Start copying a step's tokens (and logprobs) to the host; (tokens, logprobs, the
        CUDA event that marks them copied, or None on a CPU)."""
        if toks.device.type != "cuda":
            return toks, lp, None
        import torch

        toks = toks.to("cpu", non_blocking=True)
        if lp is not None:
            rows, chosen, top = lp
            chosen = chosen.to("cpu", non_blocking=True)
            if top is not None:
                top = tuple(x.to("cpu", non_blocking=True) for x in top)
            lp = rows, chosen, top
        event = torch.cuda.Event()
        event.record()
        return toks, lp, event

    @staticmethod
    def _read(flight: _Flight) -> List[int]:
        if flight.copied is not None:
            flight.copied.synchronize()  # this step's copy, not the work queued after it
        return flight.toks.tolist()

    def _land(self, flight: _Flight, toks: List[int]) -> List[Finished]:
        return self._finish(self._take(flight, toks))

    def _take(
        self, flight: _Flight, toks: List[int], ahead: Collection[int] = ()
    ) -> List[Tuple[Running, str]]:
        """A step's tokens into its rows still running; the rows it finished, with their
        reasons. `ahead`: ids of the rows a later step was launched for already."""
        alive = [k for k, s in enumerate(flight.seqs) if not s.left]
        seqs = [flight.seqs[k] for k in alive]
        self._took(seqs, [toks[k] for k in alive], _keep_rows(_lists(flight.lp), alive))
        return self._check(seqs, ahead)

    def _check(self, seqs: Sequence[Running], ahead: Collection[int] = ()) -> List[Tuple[Running, str]]:
        """The rows that are done, with their reasons; the others' new tokens go out as
        deltas if they stream."""
        done: List[Tuple[Running, str]] = []
        for s in seqs:
            reason = self._stop_reason(s, 1 if id(s) in ahead else 0)
            if reason is not None:
                done.append((s, reason))
            elif s.sampling.stream:
                self._deltas.append(
                    (s.key, s.index, s.tokens[s.sent :], s.logprobs[s.sent :] if s.logprobs else None)
                )
                s.sent = len(s.tokens)
        return done

    def _choose(
        self, logits: Any, seqs: Sequence[Running], skip: Collection[int] = ()
    ) -> Tuple[Any, Optional[Any]]:
        """Each row's next token (logits row i belongs to seqs[i]), under its grammar, and
        the log-probabilities the rows that asked for them get. Rows without a grammar or
        logprobs cost nothing: with none of either and every row greedy, this is an argmax."""
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None and i not in skip]
        if constrained:
            self._mask().apply(logits, constrained, [seqs[i].matcher for i in constrained])
        if all(s.sampling.greedy for s in seqs):
            toks = logits.argmax(dim=-1)
        else:
            toks = select_tokens(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        wanted = [i for i, s in enumerate(seqs) if s.sampling.logprobs]
        return toks, (self._logprobs(logits, toks, wanted, seqs) if wanted else None)

    def _mask(self) -> Any:
        if self._bitmask is None:
            self._bitmask = self.grammars.new_bitmask(self.slots, self.stack.device)  # type: ignore[union-attr]
        return self._bitmask

    @staticmethod
    def _logprobs(logits: Any, toks: Any, rows: List[int], seqs: Sequence[Running]) -> Any:
        """(rows, the chosen token's logprob per row, torch.topk of the largest
        top_logprobs asked or None) of the rows asking, on the device: read back in
        `_took`, after the tokens."""
        import torch

        idx = constant(rows, logits.device)
        lp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
        chosen = lp.gather(1, toks.index_select(0, idx)[:, None])[:, 0]
        k = max(seqs[i].sampling.top_logprobs for i in rows)
        top = lp.topk(k, dim=-1) if k else None
        return rows, chosen, ((top.values, top.indices) if top is not None else None)

    def _took(self, seqs: Sequence[Running], toks: List[int], lp: Optional[_Logprobs]) -> None:
        """The rows took these tokens, their grammars too, and their logprobs are kept
        (`lp`: the rows of `seqs` that asked, their chosen tokens' logprobs, top values and
        ids)."""
        for s, t in zip(seqs, toks):
            s.tokens.append(t)
            if s.matcher is not None and not s.broken and not s.matcher.accept_token(t):
                s.broken = True  # cannot happen under the mask
        if lp is None:
            return
        rows, chosen, top_v, top_i = lp
        for k, i in enumerate(rows):
            s = seqs[i]
            want = s.sampling.top_logprobs
            best = (
                [(t, v) for t, v in zip(top_i[k][:want], top_v[k][:want]) if v != float("-inf")]
                if want
                else []
            )
            if s.logprobs is None:
                s.logprobs = []
            s.logprobs.append((toks[i], chosen[k], best))

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
        found = list({id(self.seqs[i].key): self.seqs[i].key for i in gone}.values())
        for k in drop:
            self._groups.pop(k, None)
        self._remove(gone)
        return found

    def _finish(self, done: Sequence[Tuple[Running, str]]) -> List[Finished]:
        """The completions of these rows (a request of n answers once all n are done); their
        slots are freed."""
        out: List[Finished] = []
        for s, reason in done:
            c = self._completion(s, reason)
            group = self._groups.get(id(s.key)) if s.sampling.n > 1 else None
            if group is None:
                out.append((s.key, c))
                continue
            group[s.index] = c
            if all(x is not None for x in group):
                del self._groups[id(s.key)]
                out.append((s.key, group))
        if done:
            slot = {id(s): i for i, s in enumerate(self.seqs)}
            self._remove([slot[id(s)] for s, _ in done])
        return out

    def take_deltas(self) -> List[Delta]:
        """The streaming rows' tokens since the last call (rows that finished are not in it:
        their completion carries everything)."""
        out, self._deltas = self._deltas, []
        return out

    def _stop_reason(self, s: Running, ahead: int = 0) -> Optional[str]:
        """Why the row is done after its last token, or None. `ahead`: columns written for
        it past that token (a step in flight)."""
        if s.matcher is not None and (s.broken or s.matcher.is_terminated()):
            return "stop"  # whatever ignore_eos says
        if not self.ignore_eos and s.tokens[-1] in self.eos:
            return "stop"
        if s.sampling.stop and stop_in_tail(s.tokens, s.sampling.stop, self._decode):
            return "stop"
        if len(s.tokens) < s.sampling.max_tokens and s.col - ahead < self.capacity:
            return None
        return "length"

    def _remove(self, indices: Sequence[int]) -> None:
        """Free these slots; the last sequences move into the freed slots below the new end."""
        if not indices:
            return

        gone = set(indices)
        for i in gone:
            self.seqs[i].left = True
        keep = len(self.seqs) - len(gone)
        holes = [i for i in sorted(gone) if i < keep]
        tail = [i for i in range(keep, len(self.seqs)) if i not in gone]
        if holes:
            span = max(self.seqs[i].col for i in tail) + 1
            dst = constant(holes, self.rows.device)
            src = constant(tail, self.rows.device)
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
            tokens = tokens[: tokens_until_stop(tokens, s.sampling.stop, self._decode)]
            reason = "stop"
        logprobs = s.logprobs[: len(tokens)] if s.logprobs is not None else None
        return Completion(strip_think(text), raw, s.prompt_tokens, len(tokens), reason, tokens, logprobs)

    def stats(self) -> Dict[str, int]:
        return {
            "slots": self.slots,
            "capacity": self.capacity,
            "running": len(self.seqs),
            "graphs": len(self.graphs) if self.graphs is not None else 0,
        }


_Logprobs = Tuple[List[int], List[float], List[List[float]], List[List[int]]]


def _lists(lp: Optional[Any]) -> Optional[_Logprobs]:
    """A step's logprobs (`Decoder._logprobs`, on the device or copied) as host lists."""
    if lp is None:
        return None
    rows, chosen, top = lp
    top_v, top_i = (top[0].tolist(), top[1].tolist()) if top is not None else ([[] for _ in rows],) * 2
    return rows, chosen.tolist(), top_v, top_i


def _keep_rows(lp: Optional[_Logprobs], alive: List[int]) -> Optional[_Logprobs]:
    """`lp` of the rows `alive` (indices into the step's rows), renumbered within them."""
    if lp is None:
        return None
    where = {k: j for j, k in enumerate(alive)}
    picks = [(where[r], c, v, i) for r, c, v, i in zip(*lp) if r in where]
    if not picks:
        return None
    rows, chosen, top_v, top_i = (list(x) for x in zip(*picks))
    return rows, chosen, top_v, top_i
