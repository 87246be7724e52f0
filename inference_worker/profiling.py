"""`vlmq worker --profile-dir DIR`: a torch profiler trace of a window of model steps.

The question it answers is the one a served benchmark cannot: while the worker serves, how
much of the time is the GPU running kernels, and what is the model thread doing when it
is not. After `--profile-skip` steps that ran work (warm-up, graph captures and compiles
are not in the window), the next `--profile-steps` are traced on the thread that runs
them: a Chrome trace (chrome://tracing, Perfetto) and a summary with the GPU's busy share
of the window (the union of its kernel and copy intervals) and the longest kernels and
operators, written by a thread of its own. The profiler slows the host side while it
records, so a traced window serves less than an untraced one; the busy share is a lower
bound of what the GPU could keep.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import os
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

log = logging.getLogger("vlmq.profile")

# trace event categories that occupy the GPU
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _union(intervals: Iterable[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """(start, duration) intervals merged into disjoint (start, stop) pieces, in time order."""
    pieces: List[Tuple[float, float]] = []
    for start, dur in sorted(intervals):
        stop = start + dur
        if pieces and start <= pieces[-1][1]:
            pieces[-1] = (pieces[-1][0], max(pieces[-1][1], stop))
        else:
            pieces.append((start, stop))
    return pieces


def busy_us(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of (start, duration) intervals, in their unit."""
    return sum(stop - start for start, stop in _union(intervals))


def gpu_intervals(trace: dict) -> List[Tuple[float, float]]:
    """(start us, duration us) of every GPU event of a Chrome trace."""
    return [
        (float(e["ts"]), float(e.get("dur", 0.0)))
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
    ]


def top(title: str, trace: dict, categories: Sequence[str], rows: int = 30) -> str:
    """The trace's events of these categories by name, the longest in total first (an
    operator's time includes the operators it calls)."""
    total: Dict[str, float] = {}
    count: Dict[str, int] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in categories:
            name = str(e.get("name", ""))
            total[name] = total.get(name, 0.0) + float(e.get("dur", 0.0))
            count[name] = count.get(name, 0) + 1
    lines = [f"{title}: total ms, calls, name"]
    for name in sorted(total, key=total.get, reverse=True)[:rows]:  # type: ignore[arg-type]
        lines.append(f"{total[name] / 1000.0:10.2f} {count[name]:7d}  {name[:100]}")
    return "\n".join(lines)


# the ranges the chat engine names what its thread does by (chat_engine.py `record_function`)
RANGE_PREFIX = "vlmq."


def _segments(ranges: Iterable[Tuple[float, float, str]]) -> List[Tuple[float, float, str]]:
    """One thread's properly nested (start, end, name) ranges as consecutive (start, end,
    innermost name) segments, in time order; time outside every range has no segment."""
    segs: List[Tuple[float, float, str]] = []
    stack: List[Tuple[float, float, str]] = []
    cur = float("-inf")

    def close_until(t: float) -> None:
        nonlocal cur
        while stack and stack[-1][1] <= t:
            end, name = stack[-1][1], stack[-1][2]
            if end > cur:
                segs.append((cur, end, name))
            cur = max(cur, end)
            stack.pop()

    for start, end, name in sorted(ranges, key=lambda r: (r[0], -r[1])):
        close_until(start)
        if stack and start > cur:
            segs.append((cur, start, stack[-1][2]))
        cur = start
        stack.append((start, end, name))
    close_until(float("inf"))
    return segs


def _label(segs: List[Tuple[float, float, str]], starts: List[float], t: float) -> str:
    i = bisect.bisect_right(starts, t) - 1
    return segs[i][2] if i >= 0 and segs[i][0] <= t < segs[i][1] else "(outside the ranges)"


def by_range(trace: dict) -> str:
    """The model thread's time by the innermost `vlmq.*` range it was in (the size in a
    name's brackets dropped), with the GPU time of the kernels and copies launched there
    and the GPU's idle time while the thread was there: which part of a step the GPU
    runs, and what the host was doing while the GPU waited. Empty without such ranges."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    ranges: Dict[Any, List[Tuple[float, float, str]]] = {}
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") == "user_annotation" and name.startswith(RANGE_PREFIX):
            ts = float(e["ts"])
            ranges.setdefault(e.get("tid"), []).append(
                (ts, ts + float(e.get("dur", 0.0)), name.split("[")[0])
            )
    if not ranges:
        return ""
    thread = max(ranges, key=lambda t: len(ranges[t]))  # the model thread
    segs = _segments(ranges[thread])
    starts = [s[0] for s in segs]
    host: Dict[str, float] = {}
    for start, end, name in segs:
        host[name] = host.get(name, 0.0) + end - start
    launches = {
        e["args"]["correlation"]: float(e["ts"])
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver")
        and e.get("tid") == thread
        and "correlation" in e.get("args", {})
    }
    gpu_ms: Dict[str, float] = {}
    intervals = []
    for e in events:
        if e.get("cat") not in GPU_CATEGORIES:
            continue
        start, dur = float(e["ts"]), float(e.get("dur", 0.0))
        intervals.append((start, dur))
        at = launches.get(e.get("args", {}).get("correlation"))
        name = _label(segs, starts, at) if at is not None else "(launched elsewhere)"
        gpu_ms[name] = gpu_ms.get(name, 0.0) + dur
    idle: Dict[str, float] = {}
    pieces = _union(intervals)
    for (_, end), (start, _) in zip(pieces, pieces[1:]):
        name = _label(segs, starts, (start + end) / 2)
        idle[name] = idle.get(name, 0.0) + start - end
    lines = ["The model thread by vlmq range: host ms, GPU ms launched there, GPU idle ms while there, name"]
    for name in sorted(set(host) | set(gpu_ms) | set(idle), key=lambda n: -host.get(n, 0.0)):
        lines.append(
            f"{host.get(name, 0.0) / 1000.0:10.2f} {gpu_ms.get(name, 0.0) / 1000.0:10.2f}"
            f" {idle.get(name, 0.0) / 1000.0:10.2f}  {name}"
        )
    return "\n".join(lines)


class StepProfiler:
    """Counts the model's steps (`after_step`, on the thread that runs them) and traces a window."""

    def __init__(self, directory: str, steps: int, skip: int, name: str, device: str) -> None:
        if steps <= 0:
            raise ValueError("--profile-steps must be at least 1")
        # at least one step runs untraced: the profiler starts after a step, on its thread
        self.directory, self.steps, self.skip, self.name = directory, steps, max(1, skip), name
        self.cuda = device.startswith("cuda")
        self.seen = 0
        self.prof: Optional[Any] = None
        self.started = 0.0
        self.done = False
        self._writer: Optional[threading.Thread] = None
        try:
            import torch.profiler  # noqa: F401
        except ImportError:
            raise ValueError("--profile-dir needs torch on the worker (pip install 'vlmq[worker]')") from None
        os.makedirs(directory, exist_ok=True)

    def after_step(self, ran: bool) -> None:
        """A step ended; `ran`: it ran model work (idle waits are not counted)."""
        if self.done or not ran:
            return
        self.seen += 1
        if self.prof is None and self.seen >= self.skip:
            self._start()
        elif self.prof is not None and self.seen >= self.skip + self.steps:
            self._finish()

    def close(self) -> None:
        """The worker stops: write what was traced so far, and wait until it is written."""
        if self.prof is not None and not self.done:
            self._finish()
        if self._writer is not None:
            self._writer.join()

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.started = time.perf_counter()

    def _finish(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        window_ms = (time.perf_counter() - self.started) * 1000.0
        prof, self.done = self.prof, True
        prof.__exit__(None, None, None)  # recording stops on the thread it started on
        # writing a large trace takes seconds: off the model thread, which goes on serving
        self._writer = threading.Thread(
            target=self._write,
            args=(prof, self.seen - self.skip, window_ms),
            name="vlmq-profile",
            daemon=True,
        )
        self._writer.start()

    def _write(self, prof: Any, steps: int, window_ms: float) -> None:
        base = os.path.join(self.directory, f"{self.name}-{os.getpid()}")
        prof.export_chrome_trace(base + ".trace.json")
        with open(base + ".trace.json", "rb") as f:
            raw = f.read()
        os.remove(base + ".trace.json")
        with gzip.open(base + ".trace.json.gz", "wb") as f:
            f.write(raw)
        trace = json.loads(raw)
        share = "no GPU"
        if self.cuda:
            gpu = gpu_intervals(trace)
            busy = busy_us(gpu) / 1000.0
            share = (
                f"GPU busy {busy:.1f} ms of {window_ms:.1f} ({busy / window_ms:.0%})"
                if gpu
                else "no GPU activity was recorded (the profiler could not trace the GPU)"
            )
        tables = [t for t in (by_range(trace), top("CPU operators", trace, ("cpu_op",))) if t]
        if self.cuda:
            tables.insert(0, top("GPU kernels and copies", trace, GPU_CATEGORIES))
        with open(base + ".summary.txt", "w") as f:
            f.write(f"{steps} steps in {window_ms:.1f} ms; {share}\n\n" + "\n\n".join(tables) + "\n")
        log.info("profile of %d steps written to %s.trace.json.gz: %s", steps, base, share)
