"""Finding the JSON object in a model's answer (fenced, embedded in prose, or Python-style)."""

from __future__ import annotations

import ast
import json
from typing import Any, Optional, Tuple

MAX_STARTS = 64  # "{" positions tried; bounds the work on long, brace-heavy answers


def _balanced_end(text: str, start: int) -> int:
    """Index after the "}" closing the "{" at `start` (quoted strings respected), or -1."""
    depth, quote, escaped = 0, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _load(candidate: str) -> Optional[Any]:
    try:
        return json.loads(candidate)
    except (ValueError, RecursionError):
        pass
    try:  # single quotes, True/False/None: literals only, never code
        return ast.literal_eval(candidate)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def find_json_object(text: str) -> Tuple[Optional[dict], str]:
    """The first dict in `text`, and the text around it (what the model said besides it)."""
    whole = _load(text.strip())
    if isinstance(whole, dict):
        return whole, ""
    starts = [i for i, ch in enumerate(text) if ch == "{"][:MAX_STARTS]
    for start in starts:
        end = _balanced_end(text, start)
        obj = _load(text[start:end]) if end > 0 else None
        if isinstance(obj, dict):
            rest = (text[:start] + " " + text[end:]).replace("```json", " ").replace("```", " ")
            return obj, " ".join(rest.split())
    return None, text.strip()
