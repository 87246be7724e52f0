"""Per-request decoding settings, and picking each row's next token under its own settings.

One decode step mixes greedy and sampled requests: greedy rows take the argmax; each
sampled row applies its temperature and top-p and draws from its own seeded generator,
so a request's tokens do not depend on what else is decoding with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: Sequence[str] = field(default_factory=tuple)
    seed: Optional[int] = None
    # a compiled grammar (grammar.py) the answer must match; None: free text
    grammar: Optional[Any] = field(default=None, compare=False)
    logprobs: bool = False  # the log-probability of each chosen token ...
    top_logprobs: int = 0  # ... and of this many most likely tokens at each position
    n: int = 1  # answers of one prompt, each in its own decode row (one prefill)
    stream: bool = False  # hand out each step's new tokens (Decoder.take_deltas)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def of(cls, req: Any, **override: Any) -> Sampling:
        """From a request carrying schemas' SamplingMixin fields."""
        values = dict(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=tuple(req.stop),
            seed=req.seed,
            logprobs=bool(getattr(req, "logprobs", False)),
            top_logprobs=int(getattr(req, "top_logprobs", 0) or 0),
            n=int(getattr(req, "n", 1) or 1),
            stream=bool(getattr(req, "stream", False)),
        )
        values.update(override)
        return cls(**values)


def new_generator(sampling: Sampling, device: Any, index: int = 0) -> Optional[Any]:
    """The seeded generator of a sampled request (None for greedy): a request's draws
    depend on its seed alone, not on its batch-mates. Answer `index` of n draws from
    seed + index."""
    if sampling.greedy:
        return None
    import torch

    g = torch.Generator(device=device)
    seed = sampling.seed
    g.manual_seed(seed + index if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def select_tokens(logits: Any, samplings: Sequence[Sampling], generators: Sequence[Optional[Any]]) -> Any:
    """logits (B, vocab) float -> token ids (B,): argmax for greedy rows; each sampled row
    draws under its temperature and top-p from its own generator."""
    import torch

    tokens = logits.argmax(dim=-1)
    for i, s in enumerate(samplings):
        if s.greedy:
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop = sorted_p.cumsum(0) - sorted_p >= s.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return tokens
