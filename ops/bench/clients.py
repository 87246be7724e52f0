"""Client processes for the benchmarks: started once, reused for every timed window.

A benchmark that measures many configurations would otherwise spend most of its time
starting processes (a spawned Python imports numpy, pydantic, redis, ... each time). Each
window runs one closed-loop client function per process, all between the same wall-clock
start and stop, and returns what each call returned.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Any, Callable, Dict, List, Optional, Sequence

log = logging.getLogger("vlmq.bench")

# Time from submitting a window to its start: each process sets up its clients and warms
# them up before the start, not inside the measurement. A window that a client reaches late
# is run again with twice the lead (a loaded machine warms up slower).
LEAD_S = 1.0
MAX_LEAD_S = 16.0


class LateStart(RuntimeError):
    """A client was not ready when its window opened; its figures would be short."""


def _ready(imports: Sequence[str], hold_s: float) -> None:
    import importlib

    for name in imports:
        importlib.import_module(name)
    time.sleep(hold_s)  # keeps this process busy so that every warm-up lands on its own one


class ClientPool:
    """`procs` spawned processes; `window(fn, args)` runs fn(*args[i], start, stop) in
    process i for every i at once and returns the results in order."""

    def __init__(self, procs: int, imports: Sequence[str] = ()) -> None:
        self.procs = procs
        self._leads: Dict[str, float] = {}
        self._pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"))
        for f in [self._pool.submit(_ready, list(imports), 1.0) for _ in range(procs)]:
            f.result(timeout=300)

    def window(
        self,
        fn: Callable[..., Any],
        args: Sequence[Sequence[Any]],
        duration: float,
        during: Optional[Callable[[float, float], None]] = None,
        key: str = "",
    ) -> List[Any]:
        """`during(start, stop)`, if given, runs here while the clients run (e.g. to sample
        the server's CPU over the window). Windows of one `key` share their lead."""
        if len(args) > self.procs:
            raise ValueError(f"{len(args)} clients for a pool of {self.procs} processes")
        key = key or fn.__name__
        while True:
            lead = self._leads.setdefault(key, LEAD_S)
            start = time.time() + lead
            stop = start + duration
            futures = [self._pool.submit(fn, *a, start, stop) for a in args]
            if during is not None:
                during(start, stop)
            try:
                return [f.result(timeout=lead + duration + 120) for f in futures]
            except LateStart:
                wait(futures, timeout=lead + duration + 120)  # the others finish their window
                if lead >= MAX_LEAD_S:
                    raise
                self._leads[key] = 2 * lead
                log.warning(
                    "a %s client was not ready when its window opened: again, %.0f s ahead", key, 2 * lead
                )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def wait_until(t: float, client: bool = False) -> None:
    """Sleep until wall-clock time t. A client (`client=True`) already past t raises
    LateStart: it would measure less than the window."""
    if client and time.time() > t + 0.01:
        raise LateStart(f"a client was ready {time.time() - t:.2f} s after its window opened")
    while True:
        left = t - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.001) if left < 0.01 else left - 0.005)


def summary(latencies_ms: List[float], seconds: float) -> dict:
    """n, rps, p50, p99 of one window's round trips."""
    lat = sorted(latencies_ms)
    if not lat:
        raise RuntimeError("no request completed inside the window")
    return {
        "n": len(lat),
        "rps": len(lat) / seconds,
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }
