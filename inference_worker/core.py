"""The engine core: `add_request`, `abort`, `step` -- what the worker's model thread runs.

Each `step()` asks the scheduler what to run next (`schedule`: a control batch first,
then engine work, then other batches), runs it (`execute`), and returns what finished:
one `Output` per request, the moment that request is done -- a chat request the step its
last token came out, not when its batch-mates finish. Between steps it stops running
requests whose deadline passed (DEADLINE_EXCEEDED), which frees their decode slots.

Chat requests of stepped kinds are programs of engine ops (handlers/base.py); `prepare`
starts a program (builds and tokenizes the prompt) outside the model thread, and the core
feeds each op's answer back into its program as it comes out of the engine. Batch kinds
run `handler.run(requests)` on a whole batch.

Requests that stream also get their new tokens after every step (`PartialOutput`, taken
with `take_partials` after the step); requests that don't stream add nothing to a step.

Thread safety: `add_request`, `held` and `__len__` may be called from any thread
(the event loop); `step` and `take_partials` run on one thread at a time, and only `step`
touches the model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from inference_worker.handlers.base import Generate, Handler, HandlerOutput, HandlerResult
from inference_worker.handlers.chat_base import ChatHandler, advance
from inference_worker.scheduler import Batch, EngineState, Item, Plan, Policy, Scheduler
from inference_worker.timing import Stopwatch
from schemas.errors import ErrorCode, ProtocolError

log = logging.getLogger("vlmq.core")

SERVING_MODES = ("continuous", "batch")


@dataclass
class Output:
    """A request's answer: its result, or the ProtocolError it gets as an error reply."""

    item: Item
    result: HandlerResult
    timings: Dict[str, float] = field(default_factory=dict)
    batch_size: int = 0


@dataclass
class PartialOutput:
    """A streaming request's tokens decoded since its last partial (answer `index` of n)."""

    item: Item
    index: int
    token_ids: List[int]
    logprobs: Optional[List[Any]] = None


@dataclass
class StepInfo:
    """What a step ran, for observers."""

    plan: Plan
    started: float
    finished: float
    timings: Dict[str, float]


class EngineCore:
    def __init__(
        self,
        handlers: Dict[str, Handler],
        policy: Policy,
        run_batch: Callable[[Handler, List[Any]], HandlerOutput],
        serving: str = "continuous",
    ) -> None:
        if serving not in SERVING_MODES:
            raise ValueError(f"serving mode {serving!r}: choose {' or '.join(SERVING_MODES)}")
        self.handlers = handlers
        self.run_batch = run_batch
        stepped = [k for k, h in handlers.items() if serving == "continuous" and _steppable(h)]
        engines = {id(handlers[k].engine) for k in stepped}  # type: ignore[attr-defined]
        if len(engines) > 1:
            raise ValueError("the stepped kinds must share one chat engine")
        self.engine = handlers[stepped[0]].engine if stepped else None  # type: ignore[attr-defined]
        self.policy = Policy(**{**policy.__dict__, "stepped_kinds": tuple(stepped)})
        self.scheduler = Scheduler(self.policy)
        self.active: Dict[int, Item] = {}  # stepped requests admitted and not yet answered
        self._lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None  # the driver's wake-up, called on new work
        self.last_step: Optional[StepInfo] = None
        self._partials: List[PartialOutput] = []

    # ------------------------------------------------------------------ requests in

    def stepped(self, kind: str) -> bool:
        return kind in self.policy.stepped_kinds

    def prepare(self, item: Item) -> Optional[Output]:
        """Start a stepped request's program (prompt building, tokenizing): its first op goes
        into `item.op`. Returns the Output if the request is answered without the engine (a
        bad prompt). Runs off the model thread."""
        handler = self.handlers[item.request.kind]
        item.program = handler.program(item.request)  # type: ignore[attr-defined]
        answered: List[HandlerResult] = []
        advance(item.program, None, lambda op: setattr(item, "op", op), answered.append)
        return Output(item, answered[0]) if answered else None

    def add_request(self, item: Item) -> Optional[Item]:
        """Queue a request (stepped kinds: prepared); returns an older request of its session
        that it supersedes (latest_only), to be answered `superseded`."""
        item.queued_at = time.time()  # type: ignore[attr-defined]
        with self._lock:
            old = self.scheduler.add(item)
        self.wake()
        return old

    def waiting(self) -> int:
        """Requests not yet admitted to the model."""
        with self._lock:
            return self.scheduler.waiting()

    def answered(self, kind: str, sessions: Sequence[str]) -> None:
        """A batch of `kind` ran (regrouping: expect its quick returners back)."""
        with self._lock:
            self.scheduler.answered(kind, sessions)

    def replied(self, items: Sequence[Item]) -> None:
        """These requests' replies are written."""
        by_kind: Dict[str, List[str]] = {}
        for i in items:
            if not self.stepped(i.request.kind) and self.handlers[i.request.kind].blocking:
                by_kind.setdefault(i.request.kind, []).append(i.request.session_id)
        with self._lock:
            for kind, sessions in by_kind.items():
                self.scheduler.replied(kind, sessions)

    def held(self) -> List[Item]:
        """Every request the core holds (waiting, in the engine, or in a batch being run)."""
        with self._lock:
            return self.scheduler.items() + list(self.active.values()) + list(self._running_batch)

    def __len__(self) -> int:
        with self._lock:
            return len(self.scheduler) + len(self.active) + len(self._running_batch)

    _running_batch: Sequence[Item] = ()

    # ------------------------------------------------------------------ stepping

    def step(self, flush: bool = False) -> Tuple[List[Output], Plan]:
        """`schedule` then `execute`: one step; returns its answered requests and the plan it
        ran (plan.idle: nothing to run until plan.ready_at)."""
        outputs, plan = self.schedule(flush)
        return outputs + self.execute(plan), plan

    def schedule(self, flush: bool = False) -> Tuple[List[Output], Plan]:
        """Decide the next step (`flush`: nothing waits for a batch to fill). Returns the
        requests answered without running (stopped, withdrawn, expired) and the plan; a
        driver may act between the two halves (a suspect's run is counted in Redis)."""
        outputs = self._stop_requests(time.time())
        engine = EngineState()
        if self.engine is not None:
            engine = EngineState(self.engine.free_slots, self.engine.running)
        with self._lock:
            plan = self.scheduler.schedule(time.monotonic(), time.time(), engine, flush)
            if plan.batch is not None:
                self._running_batch = plan.batch.items
        for i in plan.expired:
            deadline = i.request.deadline or 0.0
            late = time.time() - deadline
            err = ProtocolError(
                ErrorCode.EXPIRED,
                f"deadline passed {late * 1000:.0f} ms before the model could run it",
                {"deadline": deadline, "late_ms": round(late * 1000.0, 1)},
            )
            outputs.append(Output(i, err))
        return outputs, plan

    def execute(self, plan: Plan) -> List[Output]:
        """Run a plan of `schedule`; returns the requests it answered."""
        if plan.idle:
            return []
        started = time.time()
        sw = Stopwatch()
        if plan.batch is not None:
            try:
                outputs = self._run_batch(plan.batch, started, sw)
            finally:
                with self._lock:
                    self._running_batch = ()
        else:
            outputs = self._run_engine(plan, started, sw)
        self.last_step = StepInfo(plan, started, time.time(), sw.timings)
        return outputs

    def _run_batch(self, batch: Batch, started: float, sw: Stopwatch) -> List[Output]:
        handler = self.handlers[batch.kind]
        with sw("batch"):
            output = self.run_batch(handler, batch.requests)
        sw.timings.update(output.timings)
        out = []
        for item, result in zip(batch.items, output.results):
            timings = dict(output.timings)
            timings.update(_queue_timings(item, started))
            out.append(Output(item, result, timings, len(batch.items)))
        return out

    def _run_engine(self, plan: Plan, started: float, sw: Stopwatch) -> List[Output]:
        engine = self.engine
        outputs: List[Output] = []
        for item in plan.score + plan.prefill:
            if id(item) not in self.active:
                item.admitted_at = started  # type: ignore[attr-defined]
                self.active[id(item)] = item
        answers: List[Tuple[Item, Any, int]] = []  # (request, its op's answer, rows it ran with)
        if plan.score:
            try:
                scored = engine.score(
                    [i.op.prompt for i in plan.score], [i.op.candidates for i in plan.score], sw
                )
            except Exception as exc:
                outputs += self._failed(plan.score, exc)
            else:
                answers += [(i, a, len(plan.score)) for i, a in zip(plan.score, scored)]
        if plan.prefill:
            ops = [i.op for i in plan.prefill]
            try:
                done = engine.admit(plan.prefill, [o.prompt for o in ops], [o.sampling for o in ops], sw)
            except Exception as exc:
                engine.abort(plan.prefill)
                outputs += self._failed(plan.prefill, exc)
            else:
                answers += [(i, a, len(plan.prefill)) for i, a in done]
        for item in plan.score + plan.prefill:  # the group's stage times, as each request's own
            stages = item.__dict__.setdefault("stages", {})
            for stage in ("preprocess", "prefill", "score"):
                if stage in sw.timings:
                    stages[stage] = stages.get(stage, 0.0) + sw.timings[stage]
        if plan.decode and engine.running:
            rows = engine.running
            with sw("decode"):
                try:
                    answers += [(i, a, rows) for i, a in engine.step()]
                except Exception as exc:
                    outputs += self._failed(engine.abort(list(self._in_engine())), exc)
        for key, index, tokens, logprobs in engine.take_deltas():
            self._partials.append(PartialOutput(key, index, tokens, logprobs))
        for item, answer, rows in answers:
            outputs += self._advance(item, answer, rows)
        return outputs

    def take_partials(self) -> List[PartialOutput]:
        """The partials of the steps since the last call (the thread that steps calls it)."""
        out, self._partials = self._partials, []
        return out

    def _advance(self, item: Item, answer: Any, rows: int) -> List[Output]:
        done: List[HandlerResult] = []

        def next_op(op: Any) -> None:
            item.op = op
            with self._lock:
                self.scheduler.followup(item)

        t0 = time.perf_counter()
        advance(item.program, answer, next_op, done.append)
        stages = item.__dict__.setdefault("stages", {})
        stages["postprocess"] = stages.get("postprocess", 0.0) + (time.perf_counter() - t0) * 1000.0
        return [self._finish(item, done[0], rows)] if done else []

    def _finish(self, item: Item, result: HandlerResult, rows: int = 1) -> Output:
        self.active.pop(id(item), None)
        with self._lock:
            self.scheduler.finished(item)
        now = time.time()
        admitted = getattr(item, "admitted_at", now)
        timings = dict(getattr(item, "stages", {}))
        timings.update(_queue_timings(item, admitted))
        timings["model_ms"] = (now - admitted) * 1000.0
        if isinstance(item.op, Generate):
            # from the end of its prompt pass to its last token, other steps included
            timings["decode"] = max(
                0.0, timings["model_ms"] - sum(timings.get(k, 0.0) for k in ("preprocess", "prefill"))
            )
        return Output(item, result, timings, rows)

    def _in_engine(self) -> List[Item]:
        waiting = {id(i) for i in self.scheduler.followups}
        return [i for i in self.active.values() if id(i) not in waiting]

    def _failed(self, items: Sequence[Item], exc: Exception) -> List[Output]:
        """Engine work that raised: these requests get an internal error (the worker's
        failure policy decides whether the worker can go on; failures.py)."""
        if _fatal(exc):
            raise exc
        log.exception("engine work of %d request(s) failed", len(items))
        err = ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return [self._finish(i, err) for i in items]

    def _stop_requests(self, wall: float) -> List[Output]:
        """Requests in the engine past their deadline are stopped (their slots freed)."""
        with self._lock:
            stop: List[Tuple[Item, ProtocolError]] = []
            for i in self.active.values():
                if i.request.deadline is not None and i.request.deadline < wall:
                    late = (wall - i.request.deadline) * 1000.0
                    err = ProtocolError(
                        ErrorCode.DEADLINE_EXCEEDED,
                        f"deadline passed {late:.0f} ms into generation; stopped",
                        {"deadline": i.request.deadline, "late_ms": round(late, 1)},
                    )
                    stop.append((i, err))
            for i, _ in stop:
                if i in self.scheduler.followups:
                    self.scheduler.followups.remove(i)
        if not stop:
            return []
        if self.engine is not None:
            self.engine.abort([i for i, _ in stop])
        return [self._finish(i, err) for i, err in stop]


def _steppable(handler: Handler) -> bool:
    return isinstance(handler, ChatHandler) and hasattr(getattr(handler, "engine", None), "admit")


def _fatal(exc: Exception) -> bool:
    from inference_worker.failures import is_fatal_device_error

    return is_fatal_device_error(exc)


def _queue_timings(item: Item, started: float) -> Dict[str, float]:
    """`queue_ms`: read from Redis -> its batch or prompt pass starts; `intake_ms`, the part
    of it before the request reached the scheduler (decoding, validation, prompt building)."""
    queued = getattr(item, "queued_at", started)
    return {
        "queue_ms": (started - item.delivery.received_at) * 1000.0,
        "intake_ms": (min(queued, started) - item.delivery.received_at) * 1000.0,
    }
