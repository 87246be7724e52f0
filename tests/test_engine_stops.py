"""Stop sequences checked on the tail of an answer (engines/text.py), against the whole-text
check they replace, with the tiny checkpoint's real byte-level tokenizer: multi-byte
characters split over several tokens, stops that span tokens, and the cost of a step."""

from __future__ import annotations

import random

import pytest

from inference_worker.engines.text import find_stop, stop_in_tail, tokens_until_stop

TEXTS = [
    "go north. then look around\n\nUser: what now? 北に行く 🙂 done",
    "🙂🙂🙂 abc 北北北 x\n\nUser",
    "open the door\nclose it\n\n<END> fin",
]
STOPS = [
    ["\n\nUser"],
    ["北北"],
    ["🙂 d", "<END>"],
    ["look", "zzz"],
    ["x"],
    ["🙂🙂🙂 abc 北北北"],
    ["\nUs"],
    ["b 北"],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2_vl):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2_vl)


def first_stop_step(tokens, stops, check) -> int:
    """The number of tokens after which `check` first says stop (0: never)."""
    for k in range(1, len(tokens) + 1):
        if check(tokens[:k], stops):
            return k
    return 0


def test_the_tail_check_stops_where_the_whole_text_check_does(tokenizer):
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(0)
    texts = TEXTS + ["".join(rng.choice("ab 北🙂\nUser") for _ in range(120)) for _ in range(4)]
    cases = 0
    for text in texts:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        # a multi-byte character is split over byte tokens, whose lone text is U+FFFD
        assert len(tokens) > len(text) // 4
        for stops in STOPS:
            whole = first_stop_step(tokens, stops, lambda t, s: find_stop(decode(t), s) is not None)
            tail = first_stop_step(tokens, stops, lambda t, s: stop_in_tail(t, s, decode))
            assert tail == whole, (text, stops)
            if whole:
                cases += 1
                assert tokens_until_stop(tokens[:whole], stops, decode) == whole
                assert tokens_until_stop(tokens, stops, decode) == whole
    assert cases >= 10


def test_a_step_decodes_a_bounded_tail_not_the_whole_answer(tokenizer):
    seen = []

    def decode(ids):
        seen.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=True)

    tokens = tokenizer("walk " * 200, add_special_tokens=False)["input_ids"]
    for k in range(1, len(tokens) + 1):
        assert not stop_in_tail(tokens[:k], ["\n\nUser"], decode)
    assert len(tokens) >= 200 and max(seen) == 4 * len("\n\nUser") + 8
