"""Post-processing of generated text: stop sequences and `<think>` reasoning."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest stop sequence begins, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    """Text before the first stop sequence (OpenAI semantics: the stop is not included)."""
    i = find_stop(text, stops)
    return (text, False) if i is None else (text[:i], True)


def strip_think(text: str) -> str:
    """Drop Qwen3-style reasoning: everything up to the last `</think>`; an unclosed `<think>`
    (the budget ran out mid-thought) drops everything from it on."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def think_content(text: str) -> str:
    """The reasoning inside `<think>…</think>`, if any."""
    if "<think>" not in text and "</think>" not in text:
        return ""
    inner = text.split("<think>", 1)[-1]
    return inner.split("</think>", 1)[0].strip()
