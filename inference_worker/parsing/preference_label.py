"""The RL-VLM-F preference label from a model's answer (RL-VLM-F's `gemini_query_2`).

In this order, on the answer with any <think>…</think> removed:
1. an explicit "-1" anywhere -> -1 (searched first, so the 1 of "-1" is never read as 1);
2. the first "0" or "1" standing as a word -> that label;
3. uncertainty words ("uncertain", "can't tell", "equal", ...) -> -1;
4. nothing usable -> -1 (no preference; RL-VLM-F drops -1 labels from training).
"""

from __future__ import annotations

import re
from typing import Tuple

from inference_worker.engines.text import strip_think

_MINUS_ONE = re.compile(r"[-−]\s?1\b")
_DIGIT = re.compile(r"\b([01])\b")
_UNCERTAIN = re.compile(
    r"uncertain|unsure|not sure|can['’]?t tell|cannot tell|can not tell|hard to tell|"
    r"\bequal|no difference|same|\btie\b|neither|indistinguishable|unclear",
    re.IGNORECASE,
)


def parse_preference(text: str) -> Tuple[int, str]:
    """(label, rule that decided it): rule is minus_one, digit, uncertain or default."""
    answer = strip_think(text)
    if _MINUS_ONE.search(answer):
        return -1, "minus_one"
    m = _DIGIT.search(answer)
    if m:
        return int(m.group(1)), "digit"
    if _UNCERTAIN.search(answer):
        return -1, "uncertain"
    return -1, "default"
