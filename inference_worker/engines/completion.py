"""What an engine returns for one generated answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

# one generated position: (chosen token id, its log-probability, [(token id, log-probability)
# of the most likely tokens there, best first])
TokenLogprob = Tuple[int, float, List[Tuple[int, float]]]


@dataclass
class Completion:
    text: str  # after the stop sequence cut and with <think>…</think> removed
    raw_text: str  # everything decoded, special tokens skipped
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence, a stop sequence, a finished grammar) or "length"
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[TokenLogprob]] = None  # per token, when the request asked for them


@dataclass
class Scored:
    scores: List[float]  # summed log-probability of each candidate, in order
    prompt_tokens: int

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=lambda i: self.scores[i])
