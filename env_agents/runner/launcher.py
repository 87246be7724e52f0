"""Launch a run: P spawned processes (or this one, for P = 1), a progress bar, the results."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue as queue_mod
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from broker import eventloop
from env_agents.control.stats import summarize
from env_agents.runner.process import process_main, run_sessions
from env_agents.runner.progress import progress_bar
from env_agents.runner.spec import RunSpec

log = logging.getLogger("vlmq.agents")


@dataclass
class RunResult:
    spec: RunSpec
    episodes: List[Dict[str, Any]] = field(default_factory=list)
    failures: List[Dict[str, Any]] = field(default_factory=list)
    preference_rows: List[Dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def summary(self) -> Dict[str, Any]:
        out = summarize(self.episodes, self.wall_s)
        out["failed_sessions"] = len(self.failures)
        return out

    def add(self, what: str, payload: Any) -> None:
        if what == "episode":
            self.episodes.append(payload)
        elif what == "preference":
            self.preference_rows.extend(payload)
        elif what == "failed":
            self.failures.append(payload)


def launch(
    spec: RunSpec,
    progress: bool = True,
    in_process: Optional[bool] = None,
    on_event: Optional[Callable[[str, Any], None]] = None,
) -> RunResult:
    """Run every session of `spec` to the end. `in_process` (default: P == 1) runs the
    sessions on an event loop of this process instead of spawning."""
    result = RunResult(spec)
    bar = progress_bar(spec, progress)

    def take(what: str, payload: Any) -> None:
        result.add(what, payload)
        if on_event is not None:
            on_event(what, payload)
        if bar is not None:
            bar.take(what, payload)

    started = time.perf_counter()
    try:
        if in_process if in_process is not None else spec.procs == 1:
            eventloop.run(_all_sessions(spec, take))
        else:
            _spawn(spec, take)
    finally:
        result.wall_s = time.perf_counter() - started
        if bar is not None:
            bar.close()
    return result


async def _all_sessions(spec: RunSpec, take: Callable[[str, Any], None]) -> None:
    """Every process's share of the sessions, on this process's one event loop."""
    await asyncio.gather(*(run_sessions(spec, p, take) for p in range(spec.procs)))


def _spawn(spec: RunSpec, take: Callable[[str, Any], None]) -> None:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked event loops, GL contexts or sockets
    out = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    procs = [
        ctx.Process(target=process_main, args=(spec, p, out, level), name=f"vlmq-agents-{p}", daemon=True)
        for p in range(spec.procs)
    ]
    for p in procs:
        p.start()
    running = set(range(spec.procs))
    try:
        while running:
            try:
                proc, what, payload = out.get(timeout=1.0)
            except queue_mod.Empty:
                for i in list(running):
                    code = procs[i].exitcode
                    if code is not None and code != 0:
                        take("failed", {"session": f"process {i}", "error": f"exited with code {code}"})
                        running.discard(i)
                continue
            if what == "done":
                running.discard(proc)
            else:
                take(what, payload)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
