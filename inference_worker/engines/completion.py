"""What an engine returns for one generated answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class Completion:
    text: str  # after the stop sequence cut and with <think>…</think> removed
    raw_text: str  # everything decoded, special tokens skipped
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length"
    token_ids: List[int] = field(default_factory=list)


@dataclass
class Scored:
    scores: List[float]  # summed log-probability of each candidate, in order
    prompt_tokens: int

    @property
    def best(self) -> int:
        return max(range(len(self.scores)), key=lambda i: self.scores[i])
