"""One runner process: its share of the sessions on one event loop, one Redis pool."""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any, Callable, List

from broker import eventloop
from broker.connection import connect_async
from env_agents.control.tracer import Tracer, Tracers
from env_agents.runner.progress import StepCounter
from env_agents.runner.session import make_session_adapter, run_session
from env_agents.runner.spec import RunSpec

log = logging.getLogger("vlmq.agents")


async def run_sessions(spec: RunSpec, proc: int, emit: Callable[[str, Any], None]) -> None:
    # Every env is built before any session starts ticking: building one blocks the event
    # loop (MiniWorld takes ~0.1-1 s) and would make the sessions already running late.
    adapters = {}
    for i in spec.sessions_of(proc):
        try:
            adapters[i] = make_session_adapter(spec, i)
        except Exception as exc:
            log.error("session %s: env %s failed: %s", spec.session_id(i), spec.env_id, exc)
            emit("failed", _failure(spec.session_id(i), exc))
    redis = connect_async(spec.broker)
    counter = StepCounter()
    tracers: List[Tracer] = [counter]
    if spec.traces:
        from env_agents.traces.store import TraceStore

        tracers.append(TraceStore(spec.traces, run=spec.session_prefix))
    if spec.metrics:
        tracers.append(spec.metrics.tracer(spec))
    tracer = Tracers(tracers)

    async def one(index: int) -> None:
        try:
            await run_session(spec, index, adapters[index], redis, emit, tracer)
        except Exception as exc:
            log.error("session %s failed: %s", spec.session_id(index), exc)
            emit("failed", _failure(spec.session_id(index), exc))

    reporter = asyncio.ensure_future(counter.report(emit))
    try:
        await asyncio.gather(*(one(i) for i in adapters))
    finally:
        reporter.cancel()
        counter.flush(emit)
        for t in tracers:
            t.close()
        await redis.aclose()


def _failure(session: str, exc: BaseException) -> dict:
    return {"session": session, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def process_main(spec: RunSpec, proc: int, out, log_level: int = logging.WARNING) -> None:
    """Entry point of a spawned runner process: results go to the parent through `out`."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def emit(what: str, payload: Any) -> None:
        out.put((proc, what, payload))

    try:
        eventloop.run(run_sessions(spec, proc, emit))
    except BaseException as exc:  # a crash is reported, never a silent hang of the parent
        emit(
            "failed", {"session": f"process {proc}", "error": repr(exc), "traceback": traceback.format_exc()}
        )
    finally:
        out.put((proc, "done", None))
