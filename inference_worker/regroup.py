"""Which answered sessions a partial batch should wait for (the scheduler's regrouping).

Closed-loop clients send their next request as soon as a reply arrives. Sessions
answered while others waited come back a few ms after the next batch has started, and
from then on a kind's sessions run in two half-size batches that alternate for good;
for a model whose step time hardly depends on batch size (decoding) that costs much of
its throughput (docs/BENCHMARKS.md). So after a batch, a kind whose queue is not
full waits for the sessions of that batch to come back, at most `window` from when their
replies were written.

Only sessions that have come back within `window` before are waited for: each session's
return gap (reply written -> next request queued) is tracked, so an agent that sends at
its own pace (queue-threshold control, an env step between requests) never holds a
batch back, and a single session never waits on itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, Optional, Set, Tuple

SMOOTHING = 0.3  # weight of the newest return gap


class Regrouper:
    def __init__(self, window_s: float, max_sessions: int = 10_000) -> None:
        self.window = window_s
        self.max_sessions = max_sessions
        self._gaps: OrderedDict[str, float] = OrderedDict()  # session -> smoothed return gap (s)
        self._replied: OrderedDict[str, float] = OrderedDict()  # session -> when its reply was written
        self._awaited: Dict[str, Tuple[Set[str], float]] = {}  # kind -> (sessions, wait until)

    def answered(self, kind: str, sessions: Iterable[str], now: float) -> None:
        """A batch of `kind` finished: expect its quick returners back."""
        quick = {s for s in sessions if self._gaps.get(s, math.inf) <= self.window}
        self._awaited[kind] = (quick, now + self.window)

    def replied(self, kind: str, sessions: Iterable[str], now: float) -> None:
        """Their replies are written: the window starts now."""
        for s in sessions:
            self._replied[s] = now
            self._replied.move_to_end(s)
        _trim(self._replied, self.max_sessions)
        awaited = self._awaited.get(kind)
        if awaited is not None:
            self._awaited[kind] = (awaited[0], max(awaited[1], now + self.window))

    def arrived(self, kind: str, session: str, now: float) -> None:
        sent = self._replied.pop(session, None)
        if sent is not None:
            gap = max(0.0, now - sent)
            old = self._gaps.get(session)
            self._gaps[session] = gap if old is None else old + SMOOTHING * (gap - old)
            self._gaps.move_to_end(session)
            _trim(self._gaps, self.max_sessions)
        awaited = self._awaited.get(kind)
        if awaited is not None:
            awaited[0].discard(session)

    def hold_until(self, kind: str, now: float) -> Optional[float]:
        """Until when a partial batch of `kind` should wait; None: don't wait."""
        awaited = self._awaited.get(kind)
        if awaited is None:
            return None
        sessions, until = awaited
        if not sessions or now >= until:
            del self._awaited[kind]
            return None
        return until


def _trim(d: OrderedDict, limit: int) -> None:
    while len(d) > limit:
        d.popitem(last=False)
