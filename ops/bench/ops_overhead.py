"""Ops overhead: worker throughput with /metrics scraped and with `vlmq record` tapping, vs neither.

One `vlmq worker` process (synthetic no-op handler, text_action) serves N sessions that
send their next request as soon as the reply arrives, three times in one run: plain
(the baseline), with --metrics-port and a scraper reading /metrics every second, and with
metrics plus a `vlmq record` process holding the workers' commit tap. A no-op handler is
the worst case for both: per-request overhead is not hidden behind model time. The
recording's share of the requests sent is reported too (workers copy each request they
answer to the tap in the commit itself, so it should be all of them; see ops/commit_tap.py). On a shared machine the throughput difference
is noisy; the CPU time the metrics hooks add per request is measured in process as well.
Every figure is the median of --rounds runs, with min and max in the record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional

from broker import eventloop
from broker.embedded import EmbeddedRedis, free_port
from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from ops.bench.records import Record, record, write_results
from ops.cli import argv
from ops.recording import read_recording
from schemas.messages import TextActionRequest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (%(default)s)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (%(default)s)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the three configurations, order alternating; records are the median (%(default)s)",
    )
    p.add_argument(
        "--model-latency-ms",
        type=float,
        default=10.0,
        help="handler latency of the extra recording run that stands in for a model (%(default)s)",
    )


def _cli(settings: BrokerSettings, command: str, *extra: str) -> List[str]:
    return argv(command, settings, *extra)


def _spawn(cmd: List[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _load(settings: BrokerSettings, sessions: int, duration: float) -> Dict[str, float]:
    latencies: List[float] = []
    give_up = time.monotonic() + duration

    async def session(i: int) -> None:
        async with AsyncAgentClient(f"bench-{i}", settings=settings) as client:
            await client.request(
                TextActionRequest(messages=[{"role": "user", "content": "warm"}]), timeout=60
            )
            step = 0
            while time.monotonic() < give_up:
                t0 = time.perf_counter()
                req = TextActionRequest(messages=[{"role": "user", "content": f"step {step}"}], step=step)
                await client.request(req, timeout=60)
                latencies.append((time.perf_counter() - t0) * 1000)
                step += 1

    started = time.monotonic()
    await asyncio.gather(*(session(i) for i in range(sessions)))
    seconds = time.monotonic() - started
    return {"rps": len(latencies) / seconds, "p50_ms": statistics.median(latencies), "n": len(latencies)}


def _scraper(url: str, stop: asyncio.Event):
    async def loop() -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
            except OSError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    return loop()


def _measure(
    settings: BrokerSettings,
    args: argparse.Namespace,
    metrics: bool,
    recording: Optional[str],
    latency_ms: float = 0.0,
) -> Dict[str, float]:
    port = free_port()
    extra = ["--backend", "synthetic", "--kinds", "text_action", "--max-wait-ms", "0"]
    extra += ["--synthetic-latency-ms", str(latency_ms)]
    if metrics:
        extra += ["--metrics-port", str(port), "--metrics-addr", "127.0.0.1"]
    worker = _spawn(_cli(settings, "worker", *extra))
    recorder = _spawn(_cli(settings, "record", recording)) if recording else None
    try:
        if recorder is not None:
            line = recorder.stderr.readline()
            if "recording" not in line:
                raise RuntimeError(f"vlmq record did not start: {line}{recorder.stderr.read()}")

        async def main() -> Dict[str, float]:
            stop = asyncio.Event()
            scraper = (
                asyncio.ensure_future(_scraper(f"http://127.0.0.1:{port}/metrics", stop)) if metrics else None
            )
            try:
                return await _load(settings, args.sessions, args.duration)
            finally:
                stop.set()
                if scraper is not None:
                    await scraper

        return eventloop.run(main())
    finally:
        if recorder is not None:
            _stop(recorder)
        _stop(worker)


def hook_cost_us(requests: int = 20_000, batch: int = 8) -> float:
    """CPU microseconds the WorkerMetrics hooks add per request, in process: steadier than a
    throughput difference on a shared machine."""
    from broker.consumer import Delivery
    from broker.replies import Settlement
    from inference_worker.scheduler import Batch, Item
    from inference_worker.settings import WorkerSettings
    from ops.metrics.worker import WorkerMetrics

    metrics = WorkerMetrics(WorkerSettings(backend="synthetic"), sample_redis=False)
    req = TextActionRequest(messages=[{"role": "user", "content": "hi"}], session_id="s")
    timings = {"preprocess": 1.0, "model": 5.0, "postprocess": 0.5}
    t0 = time.process_time()
    for b in range(requests // batch):
        items = [
            Item(Delivery("vlmq:req:text_action:{p0}", f"{b}-{i}", "text_action", None, 0, {}), req)
            for i in range(batch)
        ]
        for item in items:
            metrics.on_admitted("text_action", item)
        now = time.time()
        metrics.on_batch(Batch("text_action", items), timings, now, now)
        settlements = [Settlement(i.delivery, b"") for i in items]
        metrics.on_committed(settlements, 0.001)
        for _ in items:
            metrics.on_reply("text_action", None)
    return (time.process_time() - t0) / (requests // batch * batch) * 1e6


def _captured(path: str, result: Dict[str, float], sessions: int) -> float:
    sent = result["n"] + sessions  # the warm-up request of each session is recorded too
    return len(read_recording(path).requests()) / sent


def run(args: argparse.Namespace) -> int:
    configs = [("plain", False, False), ("metrics", True, False), ("metrics_record", True, True)]
    runs: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in configs}
    captured: List[float] = []
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, metrics, rec in configs if r % 2 == 0 else configs[::-1]:
                settings = BrokerSettings(url=server.url, prefix=f"bench{r}{name}")
                path = os.path.join(tmp, f"{r}.vlmqrec") if rec else None
                result = _measure(settings, args, metrics, path)
                runs[name].append(result)
                if path:
                    captured.append(_captured(path, result, args.sessions))
                print(
                    f"round {r} {name:<15} {result['rps']:8.0f} req/s  p50 {result['p50_ms']:.2f} ms",
                    flush=True,
                )
        captured_model: List[float] = []
        for r in range(args.rounds):
            path = os.path.join(tmp, f"model{r}.vlmqrec")
            settings = BrokerSettings(url=server.url, prefix=f"benchmodel{r}")
            model_run = _measure(settings, args, True, path, args.model_latency_ms)
            captured_model.append(_captured(path, model_run, args.sessions))

    def each(name: str, key: str) -> List[float]:
        return [x[key] for x in runs[name]]

    def against_plain(metric: str, key: str, unit: str) -> List[Record]:
        base = each("plain", key)
        return [
            record(f"{metric}_plain", base, unit),
            record(f"{metric}_with_metrics", each("metrics", key), unit, baseline=base),
            record(f"{metric}_with_metrics_and_record", each("metrics_record", key), unit, baseline=base),
        ]

    records: List[Record] = [
        *against_plain("throughput_rps", "rps", "req/s"),
        *against_plain("latency_p50_ms", "p50_ms", "ms"),
        record("record_captured_fraction_noop_handler", captured, "fraction"),
        record(f"record_captured_fraction_{args.model_latency_ms:g}ms_handler", captured_model, "fraction"),
        record("metrics_hooks_cpu_us_per_request", [hook_cost_us() for _ in range(3)], "us"),
    ]
    write_results(args.out, records)
    print(
        f"recorded {statistics.median(captured):.1%} of the requests (no-op handler; rounds "
        f"{min(captured):.1%}-{max(captured):.1%}), {statistics.median(captured_model):.1%} with a "
        f"{args.model_latency_ms:g} ms handler; results in {args.out}"
    )
    return 0
