"""`vlmq worker`: serve task kinds from the request streams until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
import sys

from broker import eventloop
from broker.commands import Command
from broker.settings import add_broker_args, broker_settings_from_args, env, flag
from schemas.limits import Limits
from schemas.messages import KINDS


def add_worker_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    g = p.add_argument_group("serving")
    flag(
        g, "--name", var="WORKER_NAME", default="", help="consumer name, unique per worker", shown="host-pid"
    )
    flag(g, "--kinds", var="KINDS", default=",".join(KINDS), help="comma-separated task kinds to serve")
    flag(
        g,
        "--tenants",
        var="TENANTS",
        default="",
        help="comma-separated tenants whose own request streams to serve too (each answers only "
        "sessions named '<tenant>.<name>'; docs/RELIABILITY.md, ACL)",
        shown=None,
    )
    flag(g, "--max-batch", var="MAX_BATCH", default=32, type=int, help="largest batch")
    flag(
        g,
        "--max-wait-ms",
        var="MAX_WAIT_MS",
        default=2.0,
        type=float,
        help="longest wait for a batch to fill after its first request",
    )
    flag(
        g,
        "--regroup-ms",
        var="REGROUP_MS",
        default=50.0,
        type=float,
        help="after a model batch, a partial batch waits up to this long (from when the replies "
        "are written) for the sessions of that batch that usually come back this fast, so "
        "closed-loop clients keep full batches; 0 = off",
    )
    flag(
        g,
        "--serving",
        var="SERVING",
        default="continuous",
        choices=["continuous", "batch"],
        help="chat kinds: continuous = requests join the running decode and are answered the "
        "step they finish; batch = one batch at a time to its longest answer (the old path, "
        "kept to compare)",
    )
    flag(
        g,
        "--control-kinds",
        var="CONTROL_KINDS",
        default="action_chunk",
        help="comma-separated kinds served as control traffic: a ready batch of them runs "
        "between any two chat steps, never behind a decode",
    )
    flag(
        g,
        "--prefill-min",
        var="PREFILL_MIN",
        default=32,
        type=int,
        help="chat requests start decoding in groups of this many, or once the oldest has "
        "waited --max-wait-ms",
    )
    flag(
        g,
        "--gil-switch-ms",
        var="GIL_SWITCH_MS",
        default=0.0,
        type=float,
        help="how long a Python thread may hold the GIL while another waits for it "
        "(sys.setswitchinterval); the model thread takes the GIL back after every torch call "
        "and can wait this long behind the intake. 0 = Python's default (5 ms)",
    )
    flag(
        g,
        "--prefetch",
        var="PREFETCH",
        default=0,
        type=int,
        help="requests read ahead of the model; 0 = 2 x max-batch",
        shown=None,
    )
    flag(
        g,
        "--max-deliveries",
        var="MAX_DELIVERIES",
        default=3,
        type=int,
        help="a message delivered more often than this, whose workers died running it alone, "
        "is dead-lettered",
    )
    flag(
        g,
        "--claim-min-idle-ms",
        var="CLAIM_MIN_IDLE_MS",
        default=15000,
        type=int,
        help="idle time after which a dead consumer's message is reclaimed",
    )
    flag(
        g,
        "--commit-retry-s",
        var="COMMIT_RETRY_S",
        default=120.0,
        type=float,
        help="how long writing replies is retried through Redis errors before the worker exits "
        "non-zero (another worker then takes over what it held)",
    )
    o = p.add_argument_group("metrics")
    flag(
        o,
        "--metrics-port",
        var="METRICS_PORT",
        default=0,
        type=int,
        help="serve Prometheus /metrics on this port, 0 = off; needs the ops extra",
    )
    flag(o, "--metrics-addr", var="METRICS_ADDR", default="0.0.0.0", help="address the /metrics server binds")
    t = p.add_argument_group("profiling")
    flag(
        t,
        "--profile-dir",
        var="PROFILE_DIR",
        default="",
        help="write a torch profiler trace of --profile-steps model steps into this folder (a "
        "Chrome trace and a summary: the GPU's busy share of the window, the longest kernels "
        "and operators); empty = off",
        shown=None,
    )
    flag(
        t,
        "--profile-steps",
        var="PROFILE_STEPS",
        default=100,
        type=int,
        help="model steps in the traced window",
    )
    flag(
        t,
        "--profile-skip",
        var="PROFILE_SKIP",
        default=200,
        type=int,
        help="model steps run before the window starts (warm-up, graph captures; at least 1)",
    )
    m = p.add_argument_group("model")
    flag(
        m,
        "--backend",
        var="BACKEND",
        default="hf",
        choices=["hf", "vllm", "synthetic"],
        help="hf (transformers), vllm, or synthetic (no model, fixed latency)",
    )
    flag(
        m,
        "--model",
        var="MODEL",
        default="",
        help="local Hugging Face folder of a Qwen2-VL / Qwen3-VL checkpoint",
        shown=None,
    )
    flag(
        m,
        "--model-name",
        var="MODEL_NAME",
        default="",
        help="also serve the streams of requests that name this model",
        shown=None,
    )
    flag(m, "--device", var="DEVICE", default="cpu", help="cpu, cuda, cuda:N")
    flag(m, "--dtype", var="DTYPE", default="auto", help="auto, float32, bfloat16, float16")
    m.add_argument(
        "--quantize",
        default=env("QUANTIZE", "") or None,
        choices=[None, "nf4"],
        help="nf4 through bitsandbytes, CUDA only [VLMQ_QUANTIZE]",
    )
    flag(
        m,
        "--synthetic-latency-ms",
        var="SYNTHETIC_LATENCY_MS",
        default=0.0,
        type=float,
        help="batch latency of the synthetic backend",
    )
    flag(
        m,
        "--synthetic-chunk",
        var="SYNTHETIC_CHUNK",
        default="50x7",
        metavar="ROWSxDIM",
        help="action_chunk shape of the synthetic backend",
    )
    flag(
        m,
        "--strict",
        var="STRICT",
        default=False,
        action="store_true",
        help="refuse to start if the engine's start-up self-check disagrees with the model's stock "
        "forward, instead of serving on the slower stock path (hf backend)",
        shown=None,
    )
    flag(
        m,
        "--option",
        var="OPTION",
        default=[],
        action="append",
        metavar="KEY=VALUE",
        help="backend-specific option, repeatable, e.g. vla=DIR to serve action_chunk; a key no "
        "component reads is refused (the variable: comma-separated; each KEY is also read from "
        "VLMQ_<KEY>, an engine option's from VLMQ_ENGINE_<KEY>)",
        shown=None,
    )


def settings_from_args(args: argparse.Namespace):
    from inference_worker.settings import WorkerSettings, default_worker_name

    broker = broker_settings_from_args(
        args, max_deliveries=args.max_deliveries, claim_min_idle_ms=args.claim_min_idle_ms
    )
    from broker.keys import TENANT_PATTERN

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    bad = [o for o in args.option if "=" not in o]
    if bad:
        raise SystemExit(f"--option takes KEY=VALUE, got {bad[0]!r}")
    tenants = tuple(t.strip() for t in args.tenants.split(",") if t.strip())
    bad = [t for t in tenants if not TENANT_PATTERN.match(t)]
    if bad:
        raise SystemExit(f"bad tenant name(s) {bad}: tenants match {TENANT_PATTERN.pattern}")
    options = dict(o.split("=", 1) for o in args.option)
    if args.gil_switch_ms < 0:
        raise SystemExit("vlmq worker: --gil-switch-ms must be 0 (Python's default) or more")
    if args.profile_dir and args.profile_steps < 1:
        raise SystemExit("vlmq worker: --profile-steps must be at least 1")
    if args.profile_dir and importlib.util.find_spec("torch") is None:
        raise SystemExit("vlmq worker: --profile-dir needs torch on the worker (pip install 'vlmq[worker]')")
    from inference_worker.settings import check_options

    try:
        check_options(options)
        limits = Limits.from_env()
    except ValueError as exc:
        raise SystemExit(f"vlmq worker: {exc}") from None
    control = tuple(k.strip() for k in args.control_kinds.split(",") if k.strip())
    unknown = [k for k in control if k not in KINDS]
    if unknown:
        raise SystemExit(f"--control-kinds: unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return WorkerSettings(
        broker=broker,
        limits=limits,
        name=args.name or default_worker_name(),
        kinds=kinds,
        tenants=tenants,
        commit_retry_s=args.commit_retry_s,
        model_name=args.model_name or None,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        regroup_ms=args.regroup_ms,
        serving=args.serving,
        control_kinds=control,
        prefill_min=args.prefill_min,
        gil_switch_ms=args.gil_switch_ms,
        prefetch=args.prefetch,
        backend=args.backend,
        model_path=args.model or None,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        synthetic_latency_ms=args.synthetic_latency_ms,
        synthetic_chunk=tuple(int(x) for x in args.synthetic_chunk.lower().split("x")),
        options=options,
        strict=args.strict,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        profile_dir=args.profile_dir or None,
        profile_steps=args.profile_steps,
        profile_skip=args.profile_skip,
    )


def set_gil_switch(ms: float) -> None:
    """--gil-switch-ms for this process (0: leave Python's default)."""
    if ms > 0:
        sys.setswitchinterval(ms / 1000.0)


async def serve(settings, observers=(), observer_factories=()) -> None:
    from inference_worker.handlers import build_handlers
    from inference_worker.worker import Worker

    set_gil_switch(settings.gil_switch_ms)
    handlers = build_handlers(settings)
    observers = [*observers, *(o for make in observer_factories for o in make(settings))]
    worker = Worker(settings, handlers, observers=observers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    await worker.run()


def run(args: argparse.Namespace) -> int:
    from broker.meta import PartitionMismatch
    from inference_worker.failures import FatalDeviceError
    from inference_worker.models.errors import ModelLoadError
    from inference_worker.worker import WorkerFailure

    try:
        eventloop.run(serve(settings_from_args(args), observer_factories=args.observer_factories))
    except (PartitionMismatch, ModelLoadError) as exc:
        raise SystemExit(f"vlmq worker: {exc}") from None
    except (WorkerFailure, FatalDeviceError) as exc:  # exit non-zero: another worker takes over
        raise SystemExit(f"vlmq worker stopped: {exc}") from None
    return 0


COMMAND = Command(
    "worker",
    help="serve task kinds from the request streams",
    description="Read requests in dynamic batches, run the model, write replies, ack. "
    "Stops cleanly on SIGTERM/SIGINT: finishes the batch in flight, replies, acks, exits 0.",
    add_args=add_worker_args,
    run=run,
    # `vlmq` adds its metrics here (ops/metrics/plug.py): this package never imports ops.
    defaults={"observer_factories": ()},
)
