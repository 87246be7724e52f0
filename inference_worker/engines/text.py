"""Post-processing of generated text: stop sequences and `<think>` reasoning."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple


def find_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest stop sequence begins, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    """Text before the first stop sequence (OpenAI semantics: the stop is not included)."""
    i = find_stop(text, stops)
    return (text, False) if i is None else (text[:i], True)


def stop_in_tail(tokens: List[int], stops: Sequence[str], decode: Callable[[List[int]], str]) -> bool:
    """Whether the text of `tokens` holds a stop sequence, for a check made after every
    token. A stop that is new then ends in the newest token and starts at most 4 bytes (one
    character) per character of it earlier; every token but a skipped special one is at
    least one byte, so the last `4 x longest + 8` tokens hold it. Decoding only those keeps
    a decode step's cost flat in the answer's length (decoding every answer whole took ~3 ms
    a step for 128 rows of 256 tokens); a hit is confirmed on the whole text."""
    tail = tokens[-(4 * max(len(s) for s in stops) + 8) :]
    if find_stop(decode(tail), stops) is None:
        return False
    return len(tail) == len(tokens) or find_stop(decode(tokens), stops) is not None


def tokens_until_stop(tokens: List[int], stops: Sequence[str], decode: Callable[[List[int]], str]) -> int:
    """The fewest leading tokens whose text holds a stop, for tokens whose text does (a
    longer prefix holds it too, so a binary search finds it)."""
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if find_stop(decode(tokens[:mid]), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return hi


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
