"""`vlmq worker`: serve task kinds from the request streams until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal

from broker import eventloop
from broker.settings import add_broker_args, broker_settings_from_args, env
from schemas.limits import Limits
from schemas.messages import KINDS


def add_worker_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    g = p.add_argument_group("serving")
    g.add_argument(
        "--name",
        default=env("WORKER_NAME", ""),
        help="consumer name, unique per worker [VLMQ_WORKER_NAME] (host-pid)",
    )
    g.add_argument(
        "--kinds",
        default=env("KINDS", ",".join(KINDS)),
        help="comma-separated task kinds to serve [VLMQ_KINDS] (%(default)s)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        default=env("MAX_BATCH", 32),
        help="largest batch [VLMQ_MAX_BATCH] (%(default)s)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=env("MAX_WAIT_MS", 2.0),
        help="longest wait for a batch to fill after its first request [VLMQ_MAX_WAIT_MS] (%(default)s)",
    )
    g.add_argument(
        "--regroup-ms",
        type=float,
        default=env("REGROUP_MS", 50.0),
        help="after a model batch, a partial batch waits up to this long (from when the "
        "replies are written) for the sessions of that batch that usually come back this "
        "fast, so closed-loop clients keep full batches; 0 = off [VLMQ_REGROUP_MS] (%(default)s)",
    )
    g.add_argument(
        "--prefetch",
        type=int,
        default=env("PREFETCH", 0),
        help="requests read ahead of the model; 0 = 2 x max-batch [VLMQ_PREFETCH]",
    )
    g.add_argument(
        "--max-deliveries",
        type=int,
        default=env("MAX_DELIVERIES", 3),
        help="deliveries before a message is dead-lettered [VLMQ_MAX_DELIVERIES] (%(default)s)",
    )
    g.add_argument(
        "--claim-min-idle-ms",
        type=int,
        default=env("CLAIM_MIN_IDLE_MS", 15000),
        help="idle time after which a dead consumer's message is reclaimed [VLMQ_CLAIM_MIN_IDLE_MS] (%(default)s)",
    )
    o = p.add_argument_group("metrics")
    o.add_argument(
        "--metrics-port",
        type=int,
        default=env("METRICS_PORT", 0),
        help="serve Prometheus /metrics on this port, 0 = off; needs the ops extra [VLMQ_METRICS_PORT] (%(default)s)",
    )
    o.add_argument(
        "--metrics-addr",
        default=env("METRICS_ADDR", "0.0.0.0"),
        help="address the /metrics server binds [VLMQ_METRICS_ADDR] (%(default)s)",
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--backend",
        default=env("BACKEND", "hf"),
        choices=["hf", "vllm", "synthetic"],
        help="hf (transformers), vllm, or synthetic (no model, fixed latency) [VLMQ_BACKEND] (%(default)s)",
    )
    m.add_argument(
        "--model",
        default=env("MODEL", ""),
        help="local Hugging Face folder of a Qwen2-VL / Qwen3-VL checkpoint [VLMQ_MODEL]",
    )
    m.add_argument(
        "--model-name",
        default=env("MODEL_NAME", ""),
        help="also serve the streams of requests that name this model [VLMQ_MODEL_NAME]",
    )
    m.add_argument(
        "--device", default=env("DEVICE", "cpu"), help="cpu, cuda, cuda:N [VLMQ_DEVICE] (%(default)s)"
    )
    m.add_argument(
        "--dtype",
        default=env("DTYPE", "auto"),
        help="auto, float32, bfloat16, float16 [VLMQ_DTYPE] (%(default)s)",
    )
    m.add_argument(
        "--quantize",
        default=env("QUANTIZE", "") or None,
        choices=[None, "nf4"],
        help="nf4 through bitsandbytes, CUDA only [VLMQ_QUANTIZE]",
    )
    m.add_argument(
        "--synthetic-latency-ms",
        type=float,
        default=env("SYNTHETIC_LATENCY_MS", 0.0),
        help="batch latency of the synthetic backend [VLMQ_SYNTHETIC_LATENCY_MS] (%(default)s)",
    )
    m.add_argument(
        "--synthetic-chunk",
        default=env("SYNTHETIC_CHUNK", "50x7"),
        metavar="ROWSxDIM",
        help="action_chunk shape of the synthetic backend [VLMQ_SYNTHETIC_CHUNK] (%(default)s)",
    )
    m.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend-specific option, repeatable",
    )


def settings_from_args(args: argparse.Namespace):
    from inference_worker.settings import WorkerSettings, default_worker_name

    broker = broker_settings_from_args(
        args, max_deliveries=args.max_deliveries, claim_min_idle_ms=args.claim_min_idle_ms
    )
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    options = dict(o.split("=", 1) for o in args.option)
    return WorkerSettings(
        broker=broker,
        limits=Limits.from_env(),
        name=args.name or default_worker_name(),
        kinds=kinds,
        model_name=args.model_name or None,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        regroup_ms=args.regroup_ms,
        prefetch=args.prefetch,
        backend=args.backend,
        model_path=args.model or None,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        synthetic_latency_ms=args.synthetic_latency_ms,
        synthetic_chunk=tuple(int(x) for x in args.synthetic_chunk.lower().split("x")),
        options=options,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )


async def serve(settings, observers=()) -> None:
    from inference_worker.handlers import build_handlers
    from inference_worker.worker import Worker

    handlers = build_handlers(settings)
    observers = list(observers)
    if settings.metrics_port:
        from ops.metrics import WorkerMetrics  # optional: the ops extra (prometheus-client)

        observers.append(WorkerMetrics(settings).serve(settings.metrics_port, settings.metrics_addr))
    worker = Worker(settings, handlers, observers=observers)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    await worker.run()


def run(args: argparse.Namespace) -> int:
    from broker.meta import PartitionMismatch
    from inference_worker.models.errors import ModelLoadError

    try:
        eventloop.run(serve(settings_from_args(args)))
    except (PartitionMismatch, ModelLoadError) as exc:
        raise SystemExit(f"vlmq worker: {exc}") from None
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="serve task kinds from the request streams",
        description="Read requests in dynamic batches, run the model, write replies, ack. "
        "Stops cleanly on SIGTERM/SIGINT: finishes the batch in flight, replies, acks, exits 0.",
    )
    add_worker_args(p)
    p.set_defaults(func=run)
