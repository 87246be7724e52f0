"""Named merge functions: how an action already queued for a timestep and the new chunk's
action for that same timestep become one (LeRobot's `aggregate_fn_name`).

Numeric merges apply to action vectors (action_chunk); for discrete items (a text
command, a MineRL dict) only the non-numeric ones make sense, and `check_merge` says so
before a run starts rather than in the middle of one.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np

MergeFn = Callable[[Any, Any], Any]


def _blend(old_weight: float) -> MergeFn:
    def merge(old: Any, new: Any) -> Any:
        return old_weight * np.asarray(old, np.float32) + (1.0 - old_weight) * np.asarray(new, np.float32)

    return merge


MERGES: Dict[str, MergeFn] = {
    "replace": lambda old, new: new,  # the newest chunk wins: it saw the newest frame
    "keep": lambda old, new: old,  # the queued action stays; new rows only extend the queue
    "weighted_average": _blend(0.3),  # lean on the new chunk, smooth the switch
    "average": _blend(0.5),
    "conservative": _blend(0.7),  # lean on the old chunk
}
NUMERIC = frozenset({"weighted_average", "average", "conservative"})


def get_merge(name: str) -> MergeFn:
    try:
        return MERGES[name]
    except KeyError:
        raise ValueError(f"unknown merge {name!r}; choose from {', '.join(MERGES)}") from None


def check_merge(name: str, kind: str) -> None:
    get_merge(name)
    if name in NUMERIC and kind != "action_chunk":
        raise ValueError(
            f"merge {name!r} averages action vectors; {kind} actions are discrete: use replace or keep"
        )
