"""Parse rules, table-tested: the MineRL action dict and the RL-VLM-F preference label."""

from __future__ import annotations

import pytest

from inference_worker.engines.text import cut_at_stop, strip_think
from inference_worker.parsing.json_object import find_json_object
from inference_worker.parsing.minerl_action import BUTTONS, default_action, parse_minerl_action
from inference_worker.parsing.preference_label import parse_preference

SEED_RESPONSE = """{
    "action": {"forward": 1, "back": 0, "left": 0, "right": 0, "jump": 0, "sneak": 0, "sprint": 0,
               "attack": 0, "use": 0, "drop": 0, "inventory": 0, "camera": [5.0, -10.0],
               "hotbar.1": 0, "hotbar.2": 0, "ESC": 0},
    "reasoning": "I see a dark opening in the cliff ahead. Moving forward to investigate if it's a cave entrance."
}"""


@pytest.mark.parametrize(
    "text, label, rule",
    [
        ("1", 1, "digit"),
        ("0", 0, "digit"),
        ("-1", -1, "minus_one"),
        ("The goal is better achieved in Image 2, so: 1", 2 - 1, "digit"),
        ("Answer: 0\n", 0, "digit"),
        ("-1 (the text is unsure)", -1, "minus_one"),
        ("I reply -1 because 1 and 0 both fit", -1, "minus_one"),  # -1 is searched first
        ("−1", -1, "minus_one"),  # a typographic minus
        ("10", -1, "default"),  # not a word-bounded 0 or 1
        ("Image 1 shows more progress", 1, "digit"),  # the rules read the first 0/1 word
        ("I can't tell the difference.", -1, "uncertain"),
        ("They look equal.", -1, "uncertain"),
        ("Uncertain.", -1, "uncertain"),
        ("", -1, "default"),
        ("no idea", -1, "default"),
        ("<think>maybe 0, maybe -1</think>\n1", 1, "digit"),  # reasoning is stripped first
    ],
)
def test_preference_label_rules(text, label, rule):
    assert parse_preference(text) == (label, rule)


def test_minerl_seed_response_parses_to_the_full_action():
    parsed = parse_minerl_action(SEED_RESPONSE)
    assert parsed.ok and not parsed.problems
    assert set(parsed.action) == set(BUTTONS) | {"camera"}
    assert parsed.action["forward"] == 1 and parsed.action["camera"] == [5.0, -10.0]
    assert parsed.action["hotbar.9"] == 0  # missing keys take their default
    assert parsed.reasoning.startswith("I see a dark opening")


@pytest.mark.parametrize(
    "text, expect, ok",
    [
        (
            '```json\n{"forward": true, "jump": "yes", "camera": [200, -500]}\n```',
            {"forward": 1, "jump": 1, "camera": [180.0, -180.0]},
            True,
        ),
        (
            "I will attack. {'attack': 1, 'camera': {'pitch': -3, 'yaw': 7}} Done.",
            {"attack": 1, "camera": [-3.0, 7.0]},
            True,
        ),
        (
            '{"action": {"sneak": 0.7, "use": 0.2, "hotbar": 3}, "reason": "r"}',
            {"sneak": 1, "use": 0, "hotbar.3": 1},
            True,
        ),
        ('{"action": {"forward": "maybe", "camera": "left"}}', {"forward": 0, "camera": [0.0, 0.0]}, True),
        ('{"camera": [NaN, 1]}', {"camera": [0.0, 0.0]}, True),
        ('<think>I should go left</think>{"left": 1}', {"left": 1}, True),
        ("go forward and jump", {}, False),
        ("{not json at all", {}, False),
        ("", {}, False),
        ("[1, 2, 3]", {}, False),
    ],
)
def test_minerl_fallbacks(text, expect, ok):
    parsed = parse_minerl_action(text)
    assert parsed.ok is ok
    want = default_action()
    want.update(expect)
    assert parsed.action == want
    if not ok:
        assert parsed.action == default_action()
        assert parsed.reasoning == strip_think(text)  # the model's words are kept


def test_minerl_reasoning_sources():
    assert parse_minerl_action('Because a cave. {"forward": 1}').reasoning == "Because a cave."
    assert parse_minerl_action('<think>cave ahead</think>{"forward": 1}').reasoning == "cave ahead"
    assert parse_minerl_action('{"forward": 1, "thought": "t"}').reasoning == "t"


def test_json_object_finder_skips_braces_in_strings():
    obj, rest = find_json_object('note "{" then {"a": "}", "b": {"c": 1}} end')
    assert obj == {"a": "}", "b": {"c": 1}} and rest == 'note "{" then end'


@pytest.mark.parametrize(
    "text, want",
    [
        ("<think>plan</think>\n\nmove_left", "move_left"),
        ("</think>answer", "answer"),  # the template opened the thought
        ("<think>never closed", ""),
        ("plain", "plain"),
    ],
)
def test_think_stripping(text, want):
    assert strip_think(text) == want


def test_stop_sequences_cut_before_the_stop():
    assert cut_at_stop("go north.\nObservation: x", ["\nObservation", "END"]) == ("go north.", True)
    assert cut_at_stop("go north", ["END"]) == ("go north", False)
