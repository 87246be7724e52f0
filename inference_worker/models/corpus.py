"""The text a fresh tokenizer is trained on: fixed, in this file, so `--seed` reproduces it.

No corpus can be downloaded here, so the tokenizer learns its merges from the language
vlmq's own prompts speak (MineRL actions, RL-VLM-F questions, ALFWorld and Crafter
commands, JSON). It is byte-level, so any text still encodes; only the merges are ours.
"""

from __future__ import annotations

from typing import Iterator, List

_SENTENCES = [
    "You are a helpful assistant.",
    "You are an agent playing Minecraft. Look at the image and choose the next action.",
    "Answer with a JSON object with the keys forward, back, left, right, jump, sneak, sprint, "
    "attack, use, drop, inventory, hotbar.1 to hotbar.9, ESC, camera and reasoning.",
    '{"action": {"forward": 1, "back": 0, "left": 0, "right": 0, "jump": 0, "camera": [5.0, -10.0]}, '
    '"reasoning": "I see a dark opening in the cliff ahead. Moving forward to investigate."}',
    "Consider the following two images: Image 1 and Image 2.",
    "What is shown in Image 1? What is shown in Image 2?",
    "The goal is to move the cube into the hole. Is there any difference between Image 1 and Image 2 "
    "in terms of achieving the goal?",
    "Is the goal better achieved in Image 1 or Image 2? Reply a single line of 0 if the goal is better "
    "achieved in Image 1, or 1 if it is better achieved in Image 2. Reply -1 if the text is unsure or "
    "there is no difference.",
    "I am uncertain; I can't tell the difference, they look equal.",
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
    "a drawer 2, a fridge 1, a sinkbasin 1, a stoveburner 3, and a toaster 1.",
    "Your task is to: put a clean apple in the fridge.",
    "go to countertop 1. take apple 1 from countertop 1. clean apple 1 with sinkbasin 1. "
    "open fridge 1. put apple 1 in/on fridge 1. look. inventory. examine drawer 2.",
    "Crafter: noop, move_left, move_right, move_up, move_down, do, sleep, place_stone, place_table, "
    "place_furnace, place_plant, make_wood_pickaxe, make_stone_pickaxe, make_iron_pickaxe, "
    "make_wood_sword, make_stone_sword, make_iron_sword.",
    "You see grass, a tree to the north, water to the east and a cow nearby. Health 9, food 7, drink 6.",
    "Thinking step by step about what the picture shows, then answer concisely in 2 sentences.",
    "<think>The agent should move toward the tree and collect wood first.</think> move_up",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 -1 0.5 -10.0 180 90 45",
]


def sentences() -> List[str]:
    return list(_SENTENCES)


def corpus(repeat: int = 50) -> Iterator[str]:
    """The training text: every sentence, repeated so frequent pairs win the merges."""
    for _ in range(repeat):
        yield from _SENTENCES
