"""The action vector: one row of an action chunk, what the VLA emits and the env side reads.

Torch-free (env processes import it). The converter, the VLA model and the env side all
read the layout from here; env_agents/recording/actions.py maps MiniWorld's discrete
actions onto it.

Layout of a row (float32, ``ACTION_DIM`` = 2 + 3 + len(KEY_VOCAB) = 21):

    index 0, 1        MOUSE_X, MOUSE_Y   cursor position, normalised to [-1, 1] over the canvas
                                         (-1 = left/top edge, +1 = right/bottom edge)
    index 2, 3, 4     BUTTONS            left, right, middle mouse button
    index 5 ..        KEYS               one channel per virtual-key code in KEY_VOCAB

Binary channels (buttons, keys) are +1 when pressed and -1 when not, so that every channel
has the scale of the flow-matching noise; a model's output channel counts as pressed when
it is > 0 (``PRESSED_THRESHOLD``).

API:
    ACTION_DIM, MOUSE_X, MOUSE_Y, BUTTON_SLICE, KEY_SLICE, BUTTONS, KEY_VOCAB, VK,
    PRESSED, RELEASED, PRESSED_THRESHOLD
    channel_names() -> list of ACTION_DIM names ("mouse_x", "btn_left", "key_UP", ...)
    key_channel(vk) -> channel index or None (key outside the vocabulary)
    button_channels(buttons) -> channel indices of a bitmask / name / list of names
    normalise_mouse(x, y, width, height) -> (nx, ny) in [-1, 1]
    idle_vector(mouse=(0.0, 0.0)) -> a row with nothing pressed
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

# Windows virtual-key codes (what the capture format's events write as `vk`).
VK: Dict[str, int] = {
    "W": 0x57,
    "A": 0x41,
    "S": 0x53,
    "D": 0x44,
    "LEFT": 0x25,
    "UP": 0x26,
    "RIGHT": 0x27,
    "DOWN": 0x28,
    "SPACE": 0x20,
    "SHIFT": 0x10,
    "CONTROL": 0x11,
    "E": 0x45,
    "Q": 0x51,
    "F": 0x46,
    "RETURN": 0x0D,
    "ESCAPE": 0x1B,
}
KEY_VOCAB: Tuple[int, ...] = tuple(VK.values())
_KEY_NAMES = {code: name for name, code in VK.items()}

BUTTONS: Tuple[str, ...] = ("left", "right", "middle")
BUTTON_BITS = {"left": 1, "right": 2, "middle": 4}  # the Windows MK_* style bitmask

MOUSE_X, MOUSE_Y = 0, 1
BUTTON_SLICE = slice(2, 2 + len(BUTTONS))
KEY_SLICE = slice(BUTTON_SLICE.stop, BUTTON_SLICE.stop + len(KEY_VOCAB))
ACTION_DIM = KEY_SLICE.stop
PRESSED_THRESHOLD = 0.0
PRESSED, RELEASED = 1.0, -1.0

_KEY_CHANNEL = {vk: KEY_SLICE.start + i for i, vk in enumerate(KEY_VOCAB)}


def channel_names() -> List[str]:
    return (
        ["mouse_x", "mouse_y"] + [f"btn_{b}" for b in BUTTONS] + [f"key_{_KEY_NAMES[vk]}" for vk in KEY_VOCAB]
    )


def key_channel(vk: int) -> Optional[int]:
    return _KEY_CHANNEL.get(int(vk))


def button_channels(buttons: Union[int, str, Iterable[str], None]) -> List[int]:
    """Channels of a mouseclick's `buttons`: a bitmask (1 left, 2 right, 4 middle), a name,
    or a list of names; missing means the left button."""
    if buttons is None:
        names: Sequence[str] = ("left",)
    elif isinstance(buttons, (int, np.integer)):
        names = [b for b in BUTTONS if int(buttons) & BUTTON_BITS[b]]
    elif isinstance(buttons, str):
        names = [buttons.lower()]
    else:
        names = [str(b).lower() for b in buttons]
    return [BUTTON_SLICE.start + BUTTONS.index(n) for n in names if n in BUTTONS]


def normalise_mouse(x: float, y: float, width: int, height: int) -> Tuple[float, float]:
    """Pixel (0..width-1, 0..height-1) -> [-1, 1]; positions off the canvas are clipped."""
    nx = 2.0 * float(x) / max(width - 1, 1) - 1.0
    ny = 2.0 * float(y) / max(height - 1, 1) - 1.0
    return float(np.clip(nx, -1.0, 1.0)), float(np.clip(ny, -1.0, 1.0))


def idle_vector(mouse: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    row = np.full(ACTION_DIM, RELEASED, np.float32)
    row[MOUSE_X], row[MOUSE_Y] = mouse
    return row
