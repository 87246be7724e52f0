"""`vlmq worker --profile-dir`: a torch profiler trace of a window of model steps, from a
real worker (tiny random-weight Qwen2-VL on CPU, real Redis); the GPU-busy arithmetic on
hand-made traces (there is no GPU here)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from env_agents.client import AsyncAgentClient
from inference_worker.profiling import busy_us, gpu_intervals
from inference_worker.settings import WorkerSettings
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import REPO, WorkerThread


def test_busy_time_is_the_union_of_the_intervals():
    assert busy_us([]) == 0.0
    assert busy_us([(0, 10), (20, 5)]) == 15  # apart
    assert busy_us([(0, 10), (5, 10)]) == 15  # overlapping
    assert busy_us([(0, 30), (5, 10), (12, 3)]) == 30  # nested
    assert busy_us([(20, 5), (0, 10), (10, 10)]) == 25  # unsorted, touching


def test_only_gpu_events_count_as_busy():
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "ts": 100, "dur": 40},
            {"ph": "X", "cat": "gpu_memcpy", "ts": 130, "dur": 20},
            {"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 500},
            {"ph": "X", "cat": "cuda_runtime", "ts": 90, "dur": 5},
            {"ph": "i", "cat": "kernel", "ts": 300},
        ]
    }
    assert busy_us(gpu_intervals(trace)) == 50


def test_the_summary_lists_the_longest_events_first():
    from inference_worker.profiling import top

    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 300},
            {"ph": "X", "cat": "kernel", "name": "norm", "ts": 300, "dur": 100},
            {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 400, "dur": 300},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},
        ]
    }
    lines = top("GPU", trace, ("kernel",)).splitlines()
    assert lines[1].split() == ["0.60", "2", "gemm"] and lines[2].split() == ["0.10", "1", "norm"]
    assert len(lines) == 3  # the CPU operator is not a kernel


def test_gpu_time_and_idle_go_to_the_range_the_model_thread_was_in():
    from inference_worker.profiling import by_range

    def rng(name, ts, dur, tid=1):
        return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "tid": tid}

    def launch(ts, corr, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
                "args": {"correlation": corr}}  # fmt: skip

    def kernel(ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    trace = {
        "traceEvents": [
            rng("vlmq.step[64]", 0, 1000),
            rng("vlmq.admit[3]", 1000, 3000),
            rng("vlmq.preprocess", 1100, 900),
            rng("vlmq.prefill", 2000, 1500),
            rng("vlmq.step[67]", 4500, 1000),  # 500 us outside every range before it
            rng("vlmq.other", 0, 50, tid=2),  # another thread's range
            launch(100, 1),
            launch(1200, 2),
            launch(2100, 3),
            launch(4600, 4),
            kernel(200, 700, 1),  # the step's
            kernel(1300, 300, 2),  # the vision tower's, launched in preprocess
            kernel(2200, 2000, 3),  # the text layers'
            kernel(4700, 500, 4),
        ]
    }
    rows = {
        line.split()[-1]: [float(x) for x in line.split()[:3]] for line in by_range(trace).splitlines()[1:]
    }
    assert rows["vlmq.step"] == [2.0, 1.2, 0.0]
    assert rows["vlmq.preprocess"] == [0.9, 0.3, 1.0]  # idle 900-1300 and 1600-2200
    assert rows["vlmq.prefill"] == [1.5, 2.0, 0.0]
    assert rows["vlmq.admit"] == [0.6, 0.0, 0.0]  # admit's own time, outside its inner ranges
    assert rows["ranges)"] == [0.0, 0.0, 0.5]  # 4200-4700: the host outside the ranges
    assert "vlmq.other" not in rows
    assert by_range({"traceEvents": [kernel(0, 5, 1)]}) == ""


def test_the_window_counts_the_steps_that_ran(tmp_path):
    import torch

    from inference_worker.profiling import StepProfiler

    p = StepProfiler(str(tmp_path), steps=2, skip=0, name="w", device="cpu")  # skip 0 runs as 1
    p.after_step(True)
    assert p.prof is not None and not p.done
    p.after_step(False)  # an idle wait is no step
    torch.ones(3).sum()
    p.after_step(True)
    assert not p.done
    p.after_step(True)
    assert p.done
    p.after_step(True)  # traced once
    p.close()  # the trace is written off the stepping thread: wait for it
    (summary,) = [f for f in os.listdir(tmp_path) if f.endswith(".summary.txt")]
    assert (tmp_path / summary).read_text().startswith("2 steps in ")


def test_a_worker_traces_the_steps_it_was_asked_for(settings, tiny_qwen2_vl, tmp_path):
    out = tmp_path / "profile"
    wsettings = WorkerSettings(
        broker=settings,
        name="prof",
        kinds=("text_action",),
        backend="hf",
        model_path=tiny_qwen2_vl,
        dtype="float32",
        max_wait_ms=1.0,
        heartbeat_s=0.5,
        options={"self_check": "0"},
        profile_dir=str(out),
        profile_steps=3,
        profile_skip=2,
    )

    async def ask() -> list:
        async with AsyncAgentClient("prof-1", settings=settings) as c:
            reqs = [
                TextActionRequest(messages=[ChatMessage(role="user", content=f"go {i}")], max_tokens=8)
                for i in range(6)
            ]
            return await asyncio.gather(*(c.request(r, timeout=120) for r in reqs))

    with WorkerThread(wsettings) as w:
        w.wait_live()
        replies = asyncio.run(ask())
    assert all(r.ok for r in replies)
    files = sorted(os.listdir(out))
    assert [f.split("-", 1)[0] for f in files] == ["prof", "prof"]
    summary = next(f for f in files if f.endswith(".summary.txt"))
    first = (out / summary).read_text().splitlines()[0]
    assert first.startswith("3 steps in ") and first.endswith("; no GPU"), first
    trace_file = next(f for f in files if f.endswith(".trace.json.gz"))
    with gzip.open(out / trace_file, "rt") as f:
        names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
    # the model's own operators are in the window, and the engine's ranges in the summary
    assert any(n.startswith("aten::") for n in names)
    assert "vlmq.step" in (out / summary).read_text()


def test_a_window_of_no_steps_is_refused_at_start():
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", "--profile-dir", "/tmp/x", "--profile-steps", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "vlmq worker: --profile-steps must be at least 1"
