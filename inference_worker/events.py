"""Hooks the worker calls as work moves; metrics and logs subscribe without touching the loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence

from broker.replies import Settlement
from inference_worker.scheduler import Batch, Item

if TYPE_CHECKING:
    from inference_worker.core import StepInfo
    from inference_worker.settings import WorkerSettings


class WorkerObserver:
    def on_admitted(self, kind: str, item: Item) -> None:
        """A valid request entered the scheduler."""

    def on_batch(self, batch: Batch, timings: Dict[str, float], started: float, finished: float) -> None:
        """The model ran a batch; timings are ms per stage, started/finished wall clock."""

    def on_engine_step(self, info: StepInfo) -> None:
        """The chat engine ran a step (a prefill group and a decode step, or a score batch)."""

    def on_step(self, info: StepInfo) -> None:
        """The engine core ran a step: a batch (on_batch) or engine work (on_engine_step)."""
        if info.plan.batch is not None:
            self.on_batch(info.plan.batch, info.timings, info.started, info.finished)
        else:
            self.on_engine_step(info)

    def on_reply(self, kind: str, error: Optional[str]) -> None:
        """A reply was committed: error is its error code, None for a result."""

    def on_dead_letter(self, kind: str, code: str) -> None:
        """A message went to the dead-letter stream."""

    def on_committed(self, settlements: Sequence[Settlement], seconds: float) -> None:
        """Replies, acks and dead letters of these settlements were written to Redis in `seconds`."""

    def on_tick(self, queued: int, in_flight: int, kinds: Sequence[str]) -> None:
        """Called with each heartbeat."""

    def on_health(self, stalled_s: float, last_commit_at: float) -> None:
        """Called with each heartbeat: seconds since the last commit while holding requests
        (0 when idle), and the unix time of the last commit (0: none yet)."""

    def on_redis_error(self, op: str) -> None:
        """A Redis call failed (read, reclaim, commit, keep_alive, heartbeat, ...)."""

    def on_run_alone(self, kind: str) -> None:
        """A redelivered request (a suspect) is about to run in a batch of its own."""


class Observers(WorkerObserver):
    def __init__(self, observers: Sequence[WorkerObserver] = ()) -> None:
        self.observers = list(observers)

    def __getattribute__(self, name: str):
        if name.startswith("on_"):
            subs = object.__getattribute__(self, "observers")

            def fan_out(*args, **kwargs) -> None:
                for o in subs:
                    getattr(o, name)(*args, **kwargs)

            return fan_out
        return object.__getattribute__(self, name)


# What a package above this one (ops: Prometheus metrics on --metrics-port) hands `vlmq worker`
# to watch it: called once the model is loaded, with the worker's settings.
ObserverFactory = Callable[["WorkerSettings"], Sequence[WorkerObserver]]
