"""Per-session frame-feature cache: encode only the newest frame, reuse t-2 and t-4.

Alignment with `step` (the env step index a request's frame was observed at): the
context of a request at step t is, for each offset o in (-4, -2, 0) (num_frames,
frame_skip), the cached frame of the newest step <= t + o; where no cached step is that
old (the episode's first steps, or frames lost to eviction), the oldest cached step <= t
stands in, which at an episode start is what training does (frames before the first are
the first). So a session that sends a request every step, or at least every
`frame_skip` steps, gets exactly the frames the model was trained on; one that sends
less often gets its nearest older frames (a gap), and the result says so
(`cache_hit` is True only when every slot holds the exact step, clamped at step 0 as in
training). Frames newer than t
are never used. A request whose step is already cached (a retry, a redelivery) encodes
nothing. `reset` (episode start) drops the session's frames first; a changed instruction
too, since features are computed with the instruction.

Bounds: per session, the frames that a later request can still need (every step
>= newest - (num_frames-1)*frame_skip, and one older); at most `max_sessions`
sessions (least recently used evicted) and none idle longer than `ttl_s`.
The cache stores whatever value it is given (feature tensors, or frames when the worker
runs with the cache off and re-encodes everything).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Generic, List, Optional, Tuple, TypeVar

V = TypeVar("V")


@dataclass
class _Session(Generic[V]):
    instruction: str
    frames: Dict[int, V] = field(default_factory=dict)
    touched: float = 0.0


@dataclass
class Slot:
    step: int  # the step whose frame fills the slot
    target: int  # the step the slot asks for
    exact: bool


class FeatureCache(Generic[V]):
    def __init__(
        self,
        num_frames: int = 3,
        frame_skip: int = 2,
        max_sessions: int = 1024,
        ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.offsets = [-(num_frames - 1 - i) * frame_skip for i in range(num_frames)]
        self.span = (num_frames - 1) * frame_skip
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: OrderedDict[str, _Session[V]] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "evicted": 0, "expired": 0, "resets": 0}

    def __len__(self) -> int:
        return len(self._sessions)

    def frames(self, session: str) -> List[int]:
        s = self._sessions.get(session)
        return sorted(s.frames) if s else []

    def reset(self, session: str) -> None:
        if self._sessions.pop(session, None) is not None:
            self.stats["resets"] += 1

    def _expire(self, now: float) -> None:
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if now - s.touched <= self.ttl_s:
                break
            del self._sessions[sid]
            self.stats["expired"] += 1

    def _session(self, session: str, instruction: str) -> _Session[V]:
        now = self.clock()
        self._expire(now)
        s = self._sessions.get(session)
        if s is None or s.instruction != instruction:
            s = _Session(instruction)
            self._sessions[session] = s
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
                self.stats["evicted"] += 1
        self._sessions.move_to_end(session)
        s.touched = now
        return s

    def get(self, session: str, step: int, instruction: str) -> Optional[V]:
        """The cached value of this exact step, if any (and the instruction matches)."""
        s = self._sessions.get(session)
        if s is None or s.instruction != instruction:
            return None
        return s.frames.get(step)

    def put(self, session: str, step: int, instruction: str, value: V) -> None:
        s = self._session(session, instruction)
        s.frames[step] = value
        newest = max(s.frames)
        low = newest - self.span
        older = [k for k in s.frames if k < low]
        keep_one = max(older) if older else None
        for k in older:
            if k != keep_one:
                del s.frames[k]

    def context(self, session: str, step: int, instruction: str, current: V) -> Tuple[List[V], List[Slot]]:
        """Values for every frame slot, oldest first (the last is `current`, frame t)."""
        s = self._session(session, instruction)
        earlier = sorted(k for k in s.frames if k < step)
        values: List[V] = []
        slots: List[Slot] = []
        for off in self.offsets:
            target = step + off
            if off == 0:
                values.append(current)
                slots.append(Slot(step, step, True))
                continue
            le = [k for k in earlier if k <= target]
            if le:
                k = le[-1]
            elif earlier:
                k = earlier[0]
            else:
                values.append(current)
                slots.append(Slot(step, target, step == 0 and target < 0))
                continue
            values.append(s.frames[k])
            slots.append(Slot(k, target, k == max(target, 0)))
        exact = all(sl.exact for sl in slots)
        self.stats["hits" if exact else "misses"] += 1
        return values, slots
