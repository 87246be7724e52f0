"""What the engine core runs next, as plain data in and out (no torch, no Redis, no clock).

Requests wait here per kind. Two ways of running a kind:
- **batch** kinds (the VLA's action_chunk, the synthetic backend, every kind with
  `--serving batch`): the handler runs a whole batch at once. A batch closes at
  `max_batch` requests or `max_wait_ms` after its first request; within it the earliest
  deadlines go first (requests without one after, in arrival order).
- **stepped** kinds (the chat kinds on the hf engine): each request is a small program of
  engine ops (`Generate`, `Score`: handlers/base.py). Generate ops join the running decode
  in prefill groups -- a group goes once `prefill_min` ops wait or the oldest has waited
  `max_wait_ms`, up to the free decode slots and `prefill_tokens` prompt tokens -- and
  every engine step decodes one token for every running sequence. Score ops run as one
  batch, taking turns with decode steps.

Latency classes: kinds in `control_kinds` (by default action_chunk) are control traffic.
Between any two steps a ready control batch runs first, so control never waits behind a
long decode -- at most one step (one decode step, one prefill group, one score batch).
Then engine work, then other batch kinds, oldest request first.

Expired requests are handed back to be answered `expired` without reaching the model;
`latest_only` supersedes an older waiting request of the session; a `suspect` (delivered
again after its worker died) runs alone: in a batch of its own, or, for a stepped kind,
once the engine is idle and with nothing else admitted until it is done. With
`regroup_ms` > 0, a partial batch of a batch kind also waits for the closed-loop sessions
of the kind's last batch to come back (regroup.py).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

from broker.consumer import Delivery
from inference_worker.regroup import Regrouper
from schemas.messages import Request


@dataclass(eq=False)  # items are compared by identity: two requests are never the same item
class Item:
    delivery: Delivery
    request: Request
    arrived: float = field(default_factory=time.monotonic)
    seq: int = 0
    # delivered again after its worker died: it may be what killed it, so it runs alone
    # (a poison request then takes no batch-mates down with it)
    suspect: bool = False
    # stepped kinds: the request's program (a generator of engine ops) and the op it waits on
    program: Any = None
    op: Any = None

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


@dataclass(frozen=True)
class EngineState:
    """What the scheduler needs to know of the chat engine."""

    free_slots: int = 0
    running: int = 0


@dataclass
class Plan:
    """One step of the engine core: exactly one of a batch or engine work (or nothing)."""

    expired: List[Item] = field(default_factory=list)
    batch: Optional[Batch] = None
    score: List[Item] = field(default_factory=list)  # stepped items whose op is a Score
    prefill: List[Item] = field(default_factory=list)  # stepped items whose op is a Generate
    decode: bool = False  # one decode step for the running sequences (after the prefill)
    ready_at: float = math.inf  # nothing to run: when something will be (monotonic)
    alone: Optional[Item] = None  # a suspect this step starts running alone

    @property
    def engine_work(self) -> bool:
        return bool(self.score or self.prefill or self.decode)

    @property
    def idle(self) -> bool:
        return self.batch is None and not self.engine_work


@dataclass(frozen=True)
class Policy:
    batch_limit: Callable[[str], int]
    max_wait_ms: float = 2.0
    control_kinds: Collection[str] = ("action_chunk",)
    stepped_kinds: Collection[str] = ()
    prefill_min: int = 32  # a prefill group goes once this many Generate ops wait ...
    prefill_tokens: int = 8192  # ... or the oldest waited max_wait_ms; at most this many prompt tokens
    regroup_ms: float = 0.0


class Scheduler:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.max_wait = policy.max_wait_ms / 1000.0
        self.regroup = Regrouper(policy.regroup_ms / 1000.0) if policy.regroup_ms > 0 else None
        self.queues: Dict[str, List[Item]] = {}  # waiting requests, by kind
        self.followups: List[Item] = []  # admitted stepped requests whose next op waits
        self._seq = itertools.count()
        self._latest: Dict[Tuple[str, str], Item] = {}  # (session, kind) -> newest latest_only item
        self._suspect: Optional[Item] = None  # a stepped suspect that is running
        self._decoded_last = False

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values()) + len(self.followups)

    def items(self) -> List[Item]:
        return [i for q in self.queues.values() for i in q] + list(self.followups)

    def waiting(self) -> int:
        """Requests not yet admitted."""
        return sum(len(q) for q in self.queues.values())

    # ------------------------------------------------------------------ requests in and out

    def add(self, item: Item) -> Optional[Item]:
        """Queue a request; returns an older request it supersedes (latest_only), if any."""
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
                    return item
            self._latest[key] = item
        self.queues.setdefault(req.kind, []).append(item)
        if self.regroup is not None:
            self.regroup.arrived(req.kind, req.session_id, item.arrived)
        return superseded

    def remove(self, item: Item) -> bool:
        """Take a waiting request out (aborted); False if it is not waiting here."""
        q = self.queues.get(item.request.kind, [])
        if item in q:
            q.remove(item)
            self._forget_latest([item])
            return True
        if item in self.followups:
            self.followups.remove(item)
            return True
        return False

    def followup(self, item: Item) -> None:
        """An admitted stepped request has its next op (`item.op`) ready."""
        self.followups.append(item)

    def finished(self, item: Item) -> None:
        """An admitted stepped request is done (answered or aborted)."""
        if self._suspect is item:
            self._suspect = None

    def answered(self, kind: str, sessions, now: Optional[float] = None) -> None:
        """A batch of `kind` finished (its replies are being written)."""
        if self.regroup is not None:
            self.regroup.answered(kind, sessions, time.monotonic() if now is None else now)

    def replied(self, kind: str, sessions, now: Optional[float] = None) -> None:
        """The replies of that batch are written."""
        if self.regroup is not None:
            self.regroup.replied(kind, sessions, time.monotonic() if now is None else now)

    # ------------------------------------------------------------------ deciding

    def schedule(
        self, now: float, wall: float, engine: EngineState = EngineState(), flush: bool = False
    ) -> Plan:
        """The next step. `flush` (shutting down): nothing waits for a batch to fill."""
        expired = self._expire(wall)
        plan = self._batch(now, control=True, flush=flush) or self._engine(now, engine, flush)
        plan = plan or self._batch(now, control=False, flush=flush)
        if plan is None:
            plan = Plan(ready_at=self._ready_at(now, engine))
        plan.expired = expired
        return plan

    def _expire(self, wall: float) -> List[Item]:
        expired: List[Item] = []
        for kind, q in self.queues.items():
            late = [i for i in q if i.request.expired(wall)]
            if late:
                expired += late
                self.queues[kind] = [i for i in q if not i.request.expired(wall)]
        self._forget_latest(expired)  # else _latest would keep the frame of every session that expired
        return expired

    def _forget_latest(self, items: List[Item]) -> None:
        for i in items:
            key = (i.request.session_id, i.request.kind)
            if self._latest.get(key) is i:
                del self._latest[key]

    def _batch_kinds(self, control: bool) -> List[str]:
        p = self.policy
        return [
            k
            for k, q in self.queues.items()
            if q and k not in p.stepped_kinds and (k in p.control_kinds) == control
        ]

    def _batch_ready_at(self, kind: str, now: float) -> float:
        q = self.queues[kind]
        if len(q) >= self.policy.batch_limit(kind) or any(i.suspect for i in q):
            return now
        ready = min(i.arrived for i in q) + self.max_wait
        hold = self.regroup.hold_until(kind, now) if self.regroup is not None else None
        return ready if hold is None else max(ready, hold)

    def _batch(self, now: float, control: bool, flush: bool) -> Optional[Plan]:
        ready = [k for k in self._batch_kinds(control) if flush or self._batch_ready_at(k, now) <= now]
        if not ready:
            return None
        kind = min(ready, key=lambda k: min(i.seq for i in self.queues[k]))
        q = sorted(self.queues[kind], key=lambda i: i.order)
        suspects = [i for i in q if i.suspect]
        chosen = suspects[:1] if suspects else q[: self.policy.batch_limit(kind)]
        taken = set(map(id, chosen))
        self.queues[kind] = sorted((i for i in q if id(i) not in taken), key=lambda i: i.seq)
        for i in chosen:
            if i.request.latest_only:
                self._latest.pop((i.request.session_id, kind), None)
        return Plan(batch=Batch(kind, chosen), alone=chosen[0] if suspects else None)

    def _stepped_waiting(self) -> List[Item]:
        waiting = [i for k in self.policy.stepped_kinds for i in self.queues.get(k, ())]
        return sorted(waiting, key=lambda i: i.order)

    def _take(self, items: List[Item]) -> None:
        for i in items:
            if i in self.followups:
                self.followups.remove(i)
            else:
                self.queues[i.request.kind].remove(i)
                if i.request.latest_only:
                    self._latest.pop((i.request.session_id, i.request.kind), None)

    def _engine(self, now: float, engine: EngineState, flush: bool) -> Optional[Plan]:
        if not self.policy.stepped_kinds:
            return None
        waiting = self._stepped_waiting()
        suspect = next((i for i in waiting if i.suspect), None)
        if self._suspect is not None or suspect is not None:
            waiting = []  # nothing new joins while a suspect runs or waits to run alone
        alone = None
        if suspect is not None and self._suspect is None and not engine.running and not self.followups:
            self._suspect = alone = suspect
            waiting = [suspect]
        candidates = self.followups + waiting  # admitted requests' next ops go first
        scores = [i for i in candidates if _is_score(i.op)]
        if scores and (not engine.running or self._decoded_last):
            scores = scores[: max(self.policy.batch_limit(scores[0].request.kind), 1)]
            self._take(scores)
            self._decoded_last = False
            return Plan(score=scores, alone=alone if alone in scores else None)
        gens = [i for i in candidates if not _is_score(i.op)]
        prefill: List[Item] = []
        if gens and engine.free_slots > 0 and (flush or self._prefill_due(gens, now, engine)):
            tokens, slots = 0, engine.free_slots
            for i in gens:
                t, rows = _prompt_tokens(i.op), _rows(i.op)  # n answers take n slots
                if rows > slots or (prefill and tokens + t > self.policy.prefill_tokens):
                    break
                prefill.append(i)
                tokens += t
                slots -= rows
            self._take(prefill)
        if not prefill and not engine.running:
            return None
        self._decoded_last = True
        return Plan(prefill=prefill, decode=True, alone=alone if alone in prefill else None)

    def _prefill_due(self, gens: List[Item], now: float, engine: EngineState) -> bool:
        if len(gens) >= min(self.policy.prefill_min, engine.free_slots) or self._suspect in gens:
            return True
        return min(i.arrived for i in gens) + self.max_wait <= now

    def _ready_at(self, now: float, engine: EngineState) -> float:
        times = [self._batch_ready_at(k, now) for k in self._batch_kinds(True) + self._batch_kinds(False)]
        gens = [i for i in self.followups + self._stepped_waiting() if not _is_score(i.op)]
        if gens and engine.free_slots > 0:
            times.append(min(i.arrived for i in gens) + self.max_wait)
        return min(times, default=math.inf)


def _is_score(op: Any) -> bool:
    return getattr(op, "candidates", None) is not None


def _rows(op: Any) -> int:
    return getattr(getattr(op, "sampling", None), "n", 1) or 1


def _prompt_tokens(op: Any) -> int:
    prompt = getattr(op, "prompt", None)
    return getattr(prompt, "tokens", 0) or 1
