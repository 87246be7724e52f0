"""Agents: starvation at a fixed control rate, async (queue + threshold g) vs synchronous.

N sessions step MiniWorld at 30 Hz and ask for 50-action chunks. Async control asks for
the next chunk when the queue falls to g x 50 and keeps acting meanwhile; synchronous
control (the baseline) asks when the queue is empty and stands still for the round trip.
For each session count it records starvation_fraction_30hz_<N>_sessions (ticks with an
action due and the queue empty, after each episode's first chunk), env steps/s per
session, the fraction of ticks the agent processes ran late (overruns: the env side was
CPU-bound) and the chunk latency the agents saw, each with sync as the baseline.

--worker synthetic (default, CPU): a private redis-server and a `vlmq worker --backend
synthetic` whose every batch takes --latency-ms; the records say so. --worker external:
use --redis-url and whatever workers serve it (the VLA worker on the GPU machine).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Dict, List, Optional

from broker.settings import BrokerSettings
from ops.bench.records import Record, machine_description, record, write_results
from ops.bench.workers import synthetic_worker

SHOWN = (
    "steps",
    "starvation_fraction",
    "session_steps_per_s",
    "overrun_fraction",
    "requests",
    "latency_p50_ms",
)


def add_args(p) -> None:
    p.add_argument(
        "--worker",
        choices=["synthetic", "external"],
        default="synthetic",
        help="synthetic: own Redis + fixed-latency synthetic worker; external: --redis-url's workers",
    )
    p.add_argument("--redis-url", default="", help="Redis of the external workers (--worker external)")
    p.add_argument("--prefix", default="vlmq", help="key prefix of the external workers (%(default)s)")
    p.add_argument(
        "--partitions", type=int, default=1, help="partitions of the external workers (%(default)s)"
    )
    p.add_argument("--latency-ms", type=float, default=100.0, help="synthetic batch latency (%(default)s)")
    p.add_argument("--chunk", type=int, default=50, help="synthetic chunk rows (%(default)s)")
    p.add_argument("--sessions", default="64,16", help="agent session counts, comma-separated (%(default)s)")
    p.add_argument("--procs", type=int, default=2, help="agent processes (%(default)s)")
    p.add_argument("--rate-hz", type=float, default=30.0, help="control rate (%(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="g of the async mode (%(default)s)")
    p.add_argument(
        "--seconds", type=float, default=15.0, help="control time per session and mode (%(default)s)"
    )
    p.add_argument("--env", default="MiniWorld-OneRoom-v0", help="env id (%(default)s)")
    p.add_argument(
        "--size",
        type=int,
        default=32,
        help="frame side; small on CPU so 64 envs can render at 30 Hz on 2 cores (%(default)s)",
    )
    p.add_argument("--label", default="", help="what serves the requests, for the records (external)")


def _start_synthetic(url: str, prefix: str, latency_ms: float, chunk: str) -> subprocess.Popen:
    return synthetic_worker(
        BrokerSettings(url=url, prefix=prefix), "action_chunk",
        "--synthetic-latency-ms", str(latency_ms), "--synthetic-chunk", chunk, "--max-batch", "64",
        max_wait_ms=2,
    )  # fmt: skip


def _run_mode(args, broker: BrokerSettings, sessions: int, mode: str) -> Dict[str, Any]:
    from env_agents.control.controller import ControlConfig
    from env_agents.runner.launcher import launch
    from env_agents.runner.spec import RunSpec

    control = ControlConfig(
        kind="action_chunk",
        mode=mode,
        rate_hz=args.rate_hz,
        threshold=args.threshold,
        merge="weighted_average",
        max_steps=int(args.seconds * args.rate_hz),
        request_timeout_s=60.0,
    )
    spec = RunSpec(
        args.env,
        control,
        broker,
        n=sessions,
        procs=args.procs,
        size=args.size,
        # One episode spans the whole run: the env's own time limit would otherwise end it
        # (and add resets to the measurement).
        env_options={"max_episode_steps": control.max_steps + 10}
        if args.env.startswith("MiniWorld-") or args.env == "Frames-v0"
        else {},
        session_prefix=f"bench-{sessions}-{mode}-{int(time.time())}",
    )
    result = launch(spec, progress=False)
    if result.failures:
        raise RuntimeError(f"{mode}: {len(result.failures)} session(s) failed: {result.failures[0]['error']}")
    s = result.summary
    s["overrun_fraction"] = round(s["overruns"] / s["ticks"], 5) if s["ticks"] else 0.0
    print(f"{sessions:3d} sessions {mode:5s}: " + ", ".join(f"{k}={s[k]}" for k in SHOWN), flush=True)
    return s


def _records(args, n: int, a: Dict[str, Any], s: Dict[str, Any], machine: str) -> List[Record]:
    hz = f"{args.rate_hz:g}hz"
    rows = [
        (f"starvation_fraction_{hz}_{n}_sessions", "starvation_fraction", "fraction of ticks"),
        (f"env_steps_per_s_per_session_{hz}_{n}_sessions", "session_steps_per_s", "steps/s"),
        (f"overrun_fraction_{hz}_{n}_sessions", "overrun_fraction", "fraction of ticks"),
        (f"chunk_latency_p50_ms_{hz}_{n}_sessions", "latency_p50_ms", "ms"),
        (f"chunk_latency_p90_ms_{hz}_{n}_sessions", "latency_p90_ms", "ms"),
    ]
    return [record(metric, a[key], unit, baseline=s[key], machine=machine) for metric, key, unit in rows]


def run(args) -> int:
    counts = [int(x) for x in str(args.sessions).split(",") if x.strip()]
    worker: Optional[subprocess.Popen] = None
    server = None
    if args.worker == "synthetic":
        from broker.embedded import EmbeddedRedis
        from env_agents.recording.actions import ACTION_DIM

        server = EmbeddedRedis().start()
        broker = BrokerSettings(url=server.url, prefix="bench")
        worker = _start_synthetic(server.url, broker.prefix, args.latency_ms, f"{args.chunk}x{ACTION_DIM}")
        label = (
            f"CPU run: fixed-latency synthetic handler ({args.latency_ms:g} ms per batch, "
            f"{args.chunk}-row chunks), {args.env} at {args.size} px"
        )
    else:
        if not args.redis_url:
            raise SystemExit("--worker external needs --redis-url")
        broker = BrokerSettings(url=args.redis_url, prefix=args.prefix, partitions=args.partitions)
        label = (args.label or "external workers") + f", {args.env} at {args.size} px"
    records: List[Record] = []
    try:
        for n in counts:
            a = _run_mode(args, broker, n, "async")
            s = _run_mode(args, broker, n, "sync")
            machine = f"{label}; {n} sessions over {args.procs} processes, g={args.threshold:g}; {machine_description()}"
            records += _records(args, n, a, s, machine)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        if server is not None:
            server.stop()
    write_results(args.out, records)
    print(f"wrote {args.out}")
    return 0
