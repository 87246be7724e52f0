"""The local action queue: one item per future timestep, refilled by chunks that overlap.

A chunk answers an observation taken at timestep t0: row i is the action for t0 + i.
Rows for timesteps already executed are dropped (they arrived too late), rows for
timesteps still queued are merged with what is there, the rest extend the queue.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Optional, Sequence, Tuple

from env_agents.control.merge import MergeFn


class ActionQueue:
    def __init__(self, merge: MergeFn) -> None:
        self.merge = merge
        self._items: Deque[Tuple[int, Any]] = collections.deque()
        self.next_step = 0  # the timestep the next popped action is for
        self.dropped = 0  # rows that came back after their timestep had passed
        self.merged = 0  # rows merged into an already queued action

    def __len__(self) -> int:
        return len(self._items)

    def clear(self, next_step: int = 0) -> None:
        self._items.clear()
        self.next_step = next_step

    def add_chunk(self, t0: int, rows: Sequence[Any]) -> int:
        """Merge a chunk whose first row is for timestep t0; returns the rows kept."""
        skip = max(0, self.next_step - t0)
        self.dropped += min(skip, len(rows))
        rows = rows[skip:]
        start = max(t0, self.next_step)
        items = list(self._items)
        queued = {t: i for i, (t, _) in enumerate(items)}
        for k, row in enumerate(rows):
            t = start + k
            i = queued.get(t)
            if i is not None:
                items[i] = (t, self.merge(items[i][1], row))
                self.merged += 1
            else:
                items.append((t, row))
        items.sort(key=lambda it: it[0])
        self._items = collections.deque(items)
        return len(rows)

    def pop(self) -> Optional[Any]:
        """The action for `next_step`, or None when the queue has none (starvation)."""
        while self._items and self._items[0][0] < self.next_step:
            self._items.popleft()
        if not self._items or self._items[0][0] != self.next_step:
            return None
        _, item = self._items.popleft()
        self.next_step += 1
        return item

    def pending(self) -> Sequence[Any]:
        return [item for _, item in self._items]
