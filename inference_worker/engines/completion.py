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
