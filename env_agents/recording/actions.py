"""MiniWorld's discrete actions as rows of the action vector (schemas/actions.py).

Torch-free (env processes import it). MiniWorld's actions are keys (``MINIWORLD_KEYS``):
turn left = LEFT arrow, turn right = RIGHT, move forward = UP, move back = DOWN,
pick up = E, drop = Q, toggle = F, done = ENTER. The recorder presses these keys, so a
VLA trained on its recordings answers in them.

API:
    MINIWORLD_KEYS
    action_to_vector(action, mouse=(0.0, 0.0)) -> the row of a MiniWorld action id
    vector_to_action(row, n_actions) -> a MiniWorld action id < n_actions (always one:
        the action whose key channel is strongest, pressed or not)
    chunk_to_actions(chunk, n_actions) -> one MiniWorld action id per row
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from schemas.actions import ACTION_DIM, PRESSED, VK, idle_vector, key_channel

# MiniWorld action id -> the key that performs it (miniworld.MiniWorldEnv.Actions order).
MINIWORLD_KEYS: Tuple[int, ...] = (
    VK["LEFT"],  # 0 turn_left
    VK["RIGHT"],  # 1 turn_right
    VK["UP"],  # 2 move_forward
    VK["DOWN"],  # 3 move_back
    VK["E"],  # 4 pickup
    VK["Q"],  # 5 drop
    VK["F"],  # 6 toggle
    VK["RETURN"],  # 7 done
)
_CHANNELS = [key_channel(vk) for vk in MINIWORLD_KEYS]


def action_to_vector(action: int, mouse: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    if not 0 <= int(action) < len(MINIWORLD_KEYS):
        raise ValueError(f"MiniWorld action {action} is out of range 0..{len(MINIWORLD_KEYS) - 1}")
    row = idle_vector(mouse)
    row[_CHANNELS[int(action)]] = PRESSED
    return row


def vector_to_action(row: Sequence[float], n_actions: int) -> int:
    """The MiniWorld action (< n_actions) whose key channel is strongest in this row."""
    row = np.asarray(row, np.float32)
    if row.shape != (ACTION_DIM,):
        raise ValueError(f"an action row has {ACTION_DIM} channels, got shape {row.shape}")
    n = max(1, min(int(n_actions), len(MINIWORLD_KEYS)))
    return int(np.argmax(row[_CHANNELS[:n]]))


def chunk_to_actions(chunk: np.ndarray, n_actions: int) -> List[int]:
    return [vector_to_action(r, n_actions) for r in np.asarray(chunk, np.float32)]
