"""The MineRL action dict from a model's answer, with fallbacks that never fail the request.

Rules (the MineRL policy server's; docs/MODELS.md):
- The answer should hold a JSON object, either {"action": {...}, "reasoning": "..."} or the
  action keys at top level; fenced, embedded in prose, or Python-style quoting all work.
- Every key of the full action is present in the result: forward, back, left, right, jump,
  sneak, sprint, attack, use, drop, inventory, hotbar.1-9, ESC (0/1) and camera [pitch, yaw].
  Missing keys take their default (0, camera [0, 0]); unknown keys are ignored.
- Buttons accept 0/1, booleans, numbers (>= 0.5 is pressed) and yes/no words; "hotbar": N
  selects hotbar.N. Camera accepts [pitch, yaw] or {"pitch", "yaw"}; each angle is clamped
  to [-180, 180] degrees; a value that is not a finite number becomes 0.
- No object at all: the default action (all zero), parse_ok False, and the model's text
  kept as the reasoning. The request still gets a normal reply.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List

from inference_worker.engines.text import strip_think, think_content
from inference_worker.parsing.json_object import find_json_object

BUTTONS = (
    "forward",
    "back",
    "left",
    "right",
    "jump",
    "sneak",
    "sprint",
    "attack",
    "use",
    "drop",
    "inventory",
    *(f"hotbar.{i}" for i in range(1, 10)),
    "ESC",
)
CAMERA_LIMIT = 180.0
_TRUE = {"1", "true", "yes", "y", "on", "pressed", "press"}
_FALSE = {"0", "false", "no", "n", "off", "released", "none", ""}
_REASONING_KEYS = ("reasoning", "reason", "thought", "thoughts", "explanation", "rationale")


def default_action() -> Dict[str, Any]:
    """The no-op action: nothing pressed, camera still."""
    action: Dict[str, Any] = {k: 0 for k in BUTTONS}
    action["camera"] = [0.0, 0.0]
    return action


@dataclass
class ParsedAction:
    action: Dict[str, Any]
    reasoning: str
    ok: bool  # False: no usable object; `action` is the default
    problems: List[str] = field(default_factory=list)


def _button(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not finite")
        return 1 if value >= 0.5 else 0
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return 1 if value.strip().lower() in _TRUE else 0
    raise ValueError(f"{value!r} is not 0/1")


def _angle(value: Any, limit: float) -> float:
    x = float(value)  # raises on junk
    if not math.isfinite(x):
        raise ValueError(f"{value!r} is not finite")
    return max(-limit, min(limit, x))


def _camera(value: Any, limit: float) -> List[float]:
    if isinstance(value, dict):
        value = [value.get("pitch", 0.0), value.get("yaw", 0.0)]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [_angle(value[0], limit), _angle(value[1], limit)]
    raise ValueError(f"camera must be [pitch, yaw], got {value!r}")


def parse_minerl_action(text: str, camera_limit: float = CAMERA_LIMIT) -> ParsedAction:
    answer = strip_think(text)
    obj, around = find_json_object(answer)
    if obj is None:
        reasoning = answer or think_content(text)
        return ParsedAction(default_action(), reasoning, False, ["no JSON object in the answer"])
    source = obj.get("action") if isinstance(obj.get("action"), dict) else obj
    keys = {str(k).lower(): v for k, v in source.items()}
    action = default_action()
    problems: List[str] = []
    for name in BUTTONS:
        if name.lower() in keys:
            try:
                action[name] = _button(keys[name.lower()])
            except (ValueError, TypeError) as exc:
                problems.append(f"{name}: {exc}; using 0")
    if "hotbar" in keys:
        try:
            slot = int(keys["hotbar"])
            if 1 <= slot <= 9:
                action[f"hotbar.{slot}"] = 1
            else:
                problems.append(f"hotbar: slot {slot} is not 1-9")
        except (ValueError, TypeError):
            problems.append(f"hotbar: {keys['hotbar']!r} is not a slot number")
    if "camera" in keys:
        try:
            action["camera"] = _camera(keys["camera"], camera_limit)
        except (ValueError, TypeError) as exc:
            problems.append(f"camera: {exc}; using [0, 0]")
    reasoning = next((str(obj[k]) for k in _REASONING_KEYS if obj.get(k)), "")
    reasoning = reasoning or around or think_content(text)
    return ParsedAction(action, reasoning, True, problems)


# ----------------------------------------------------------------------------- the grammar

# The action as a JSON schema: what parse_minerl_action's output (action and reasoning)
# always satisfies, and what the gateway documents.
ACTION_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "properties": {
        "action": {
            "type": "object",
            "properties": {
                **{b: {"type": "integer", "enum": [0, 1]} for b in BUTTONS},
                "camera": {
                    "type": "array",
                    "items": {"type": "number", "minimum": -CAMERA_LIMIT, "maximum": CAMERA_LIMIT},
                    "minItems": 2,
                    "maxItems": 2,
                },
            },
            "required": [*BUTTONS, "camera"],
            "additionalProperties": False,
        },
        "reasoning": {"type": "string"},
    },
    "required": ["action", "reasoning"],
    "additionalProperties": False,
}

# An angle in [-180, 180] with at most two decimals (7 bytes at most: "-179.99").
_ANGLE = r"-?(180(\.00?)?|(1[0-7][0-9]|[1-9]?[0-9])(\.[0-9][0-9]?)?)"
# Reasoning: printable ASCII without quote or backslash, so one character is one byte.
_REASONING_CHAR = r"[ !#-\[\]-~]"


def action_pattern(reasoning_chars: int) -> str:
    """The regular expression the constrained decoder holds an answer to: one JSON object,
    keys in the prompt's order, laid out as the prompt shows it. Every answer it allows
    parses (parse_ok) to an action valid under ACTION_SCHEMA, and is at most
    `pattern_bytes(reasoning_chars)` bytes long, so that many tokens always finish it."""
    keys = ", ".join(f'"{re.escape(b)}": [01]' for b in BUTTONS)
    return (
        r'\{"action": \{' + keys + rf', "camera": \[{_ANGLE}, {_ANGLE}\]\}}, "reasoning": "'
        rf'{_REASONING_CHAR}{{0,{reasoning_chars}}}"\}}'
    )


def pattern_bytes(reasoning_chars: int) -> int:
    """The longest answer `action_pattern` allows, in bytes."""
    longest = {**default_action(), "camera": ["-179.99", "-179.99"]}
    body = '{"action": {' + ", ".join(f'"{k}": {v if k != "camera" else ""}' for k, v in longest.items())
    return len(body) + len("[-179.99, -179.99]}") + len(', "reasoning": ""}') + reasoning_chars
