"""What runs next: dynamic batches per kind, bounded by size and by wait, earliest deadline first.

A kind is ready when it holds `max_batch` requests or its oldest request has waited
`max_wait_ms`. Among ready kinds the one whose oldest request came first goes next (no
kind starves); within it the requests with the earliest deadlines are taken (requests
without a deadline come after, in arrival order). Expired requests are handed back to be
answered `expired` without reaching the model. Batches are plain data.
With `regroup_ms` > 0, a partial batch also waits for the closed-loop sessions of the
kind's last batch to come back (regroup.py).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from broker.consumer import Delivery
from inference_worker.regroup import Regrouper
from schemas.messages import Request


@dataclass(eq=False)  # items are compared by identity: two requests are never the same item
class Item:
    delivery: Delivery
    request: Request
    arrived: float = field(default_factory=time.monotonic)
    seq: int = 0
    # delivered again after its worker died: it may be what killed it, so it runs in a
    # batch of its own (a poison request then takes no batch-mates down with it)
    suspect: bool = False

    @property
    def order(self) -> Tuple[float, int]:
        return (self.request.deadline if self.request.deadline is not None else math.inf, self.seq)


@dataclass
class Batch:
    kind: str
    items: List[Item]
    expired: List[Item] = field(default_factory=list)

    @property
    def requests(self) -> List[Request]:
        return [i.request for i in self.items]


class Scheduler:
    def __init__(
        self, batch_limit: Callable[[str], int], max_wait_ms: float, regroup_ms: float = 0.0
    ) -> None:
        self.batch_limit = batch_limit
        self.max_wait = max_wait_ms / 1000.0
        self.regroup = Regrouper(regroup_ms / 1000.0) if regroup_ms > 0 else None
        self.queues: Dict[str, List[Item]] = {}
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._latest: Dict[Tuple[str, str], Item] = {}  # (session, kind) -> newest latest_only item

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def items(self) -> List[Item]:
        return [i for q in self.queues.values() for i in q]

    def add(self, item: Item) -> Optional[Item]:
        """Queue an item; returns an older item it supersedes (latest_only), if any."""
        item.seq = next(self._seq)
        req = item.request
        superseded = None
        if req.latest_only:
            key = (req.session_id, req.kind)
            old = self._latest.get(key)
            if old is not None and old in self.queues.get(req.kind, ()):
                if old.request.step <= req.step:
                    self.queues[req.kind].remove(old)
                    superseded = old
                else:  # an out-of-order older observation: it loses
                    self._changed.set()
                    return item
            self._latest[key] = item
        self.queues.setdefault(req.kind, []).append(item)
        if self.regroup is not None:
            self.regroup.arrived(req.kind, req.session_id, item.arrived)
        self._changed.set()
        return superseded

    def answered(self, kind: str, sessions: Iterable[str], now: Optional[float] = None) -> None:
        """A batch of `kind` finished (its replies are being written)."""
        if self.regroup is not None:
            self.regroup.answered(kind, sessions, time.monotonic() if now is None else now)

    def replied(self, kind: str, sessions: Iterable[str], now: Optional[float] = None) -> None:
        """The replies of that batch are written."""
        if self.regroup is not None:
            self.regroup.replied(kind, sessions, time.monotonic() if now is None else now)
            self._changed.set()

    def _ready_at(self, kind: str, now: float) -> float:
        q = self.queues[kind]
        if len(q) >= self.batch_limit(kind):
            return now
        ready = min(i.arrived for i in q) + self.max_wait
        hold = self.regroup.hold_until(kind, now) if self.regroup is not None else None
        return ready if hold is None else max(ready, hold)

    def take(
        self, now: Optional[float] = None, wall: Optional[float] = None
    ) -> Tuple[Optional[Batch], float]:
        """A batch if one is ready, else None and the time (monotonic) one will be."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        expired: List[Item] = []
        for kind, q in self.queues.items():
            keep: List[Item] = []
            late: List[Item] = []
            for i in q:
                (late if i.request.expired(wall) else keep).append(i)
            if late:
                expired += late
                self.queues[kind] = keep
        for i in expired:  # else _latest would keep the frame of every session that expired
            key = (i.request.session_id, i.request.kind)
            if self._latest.get(key) is i:
                del self._latest[key]
        candidates = [k for k, q in self.queues.items() if q]
        if not candidates:
            return (Batch("", [], expired) if expired else None), math.inf
        ready = [k for k in candidates if self._ready_at(k, now) <= now]
        if not ready:
            if expired:
                return Batch("", [], expired), now
            return None, min(self._ready_at(k, now) for k in candidates)
        kind = min(ready, key=lambda k: min(i.seq for i in self.queues[k]))
        q = sorted(self.queues[kind], key=lambda i: i.order)
        suspects = [i for i in q if i.suspect]
        if suspects:
            chosen = suspects[:1]
            rest = [i for i in q if i is not chosen[0]]
        else:
            chosen, rest = q[: self.batch_limit(kind)], q[self.batch_limit(kind) :]
        self.queues[kind] = sorted(rest, key=lambda i: i.seq)
        for i in chosen:
            if i.request.latest_only:
                self._latest.pop((i.request.session_id, kind), None)
        return Batch(kind, chosen, expired), now

    async def next_batch(self, flush: Callable[[], bool] = lambda: False) -> Optional[Batch]:
        """Wait for a batch. When flush() is true (shutting down), don't wait for stragglers;
        return None once nothing is left."""
        while True:
            self._changed.clear()
            batch, ready_at = self.take()
            if batch is not None:
                return batch
            if flush():
                if not len(self):
                    return None
                batch, _ = self.take(now=math.inf)
                if batch is not None:
                    return batch
            if math.isinf(ready_at):
                await self._changed.wait()
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, ready_at - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    def wake(self) -> None:
        self._changed.set()
