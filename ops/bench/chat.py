"""Chat throughput: the vlmq worker serving many sessions through Redis vs one-at-a-time `generate`.

(a) baseline, the seed's style: one request at a time, batch 1, the processor and plain
`model.generate` (greedy, exactly --max-tokens new tokens). (b) vlmq: a `vlmq worker
--backend hf` process and --sessions concurrent agent sessions (in --procs processes),
each sending a text_action request (one --image-size frame, a ~--prompt-tokens prompt,
--max-tokens new tokens) and the next as soon as its reply arrives. Same checkpoint,
same card, same run. Records throughput_rps_<N>_sessions (baseline (a), ratio), tokens/s,
latency, the engine's own batch throughput and stage times without Redis, the agreement
of CUDA-graph decoding with eager decoding, and GPU memory.

The checkpoint is --model, or one built here with `make_model --preset 2b` (random
weights: the shapes and costs of the release, not its answers). Random weights end at
arbitrary tokens, so both sides decode exactly --max-tokens (the worker with
`--option ignore_eos=1`, the baseline with min_new_tokens).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from broker import eventloop
from ops.cli import argv

log = logging.getLogger("vlmq.bench.chat")


def add_args(p) -> None:
    p.set_defaults(out="benchmarks/results/gpu_chat.json")
    p.add_argument("--model", default="", help="checkpoint folder; empty: build one with make-model")
    p.add_argument("--arch", default="qwen2-vl", help="arch of the built checkpoint (%(default)s)")
    p.add_argument("--preset", default="2b", help="preset of the built checkpoint (%(default)s)")
    p.add_argument("--device", default="cuda", help="model device (%(default)s)")
    p.add_argument("--dtype", default="auto", help="model dtype (%(default)s)")
    p.add_argument("--sessions", type=int, default=128, help="concurrent agent sessions (%(default)s)")
    p.add_argument("--procs", type=int, default=4, help="agent processes (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (%(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="frame side in pixels (%(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=100, help="text tokens in the prompt (%(default)s)")
    p.add_argument("--baseline-requests", type=int, default=8, help="timed requests of (a) (%(default)s)")
    p.add_argument("--warmup-s", type=float, default=20.0, help="(b) time before measuring (%(default)s)")
    p.add_argument("--seconds", type=float, default=30.0, help="(b) measured time (%(default)s)")
    p.add_argument(
        "--max-batch",
        default="128",
        help="worker --max-batch; a comma-separated list runs (b) once per value and reports the best "
        "(%(default)s)",
    )
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="worker --max-wait-ms (%(default)s)")
    p.add_argument("--regroup-ms", type=float, default=50.0, help="worker --regroup-ms (%(default)s)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra worker --option, repeatable"
    )
    p.add_argument("--skip-check", action="store_true", help="skip the in-process engine runs")


# ---------------------------------------------------------------------------- inputs


def prompt_text(tokenizer: Any, tokens: int) -> str:
    """Deterministic English from the tokenizer corpus, about `tokens` tokens long."""
    from inference_worker.models.corpus import sentences

    words: List[str] = []
    pool = " ".join(sentences()).split()
    i = 0
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words.append(pool[i % len(pool)])
        i += 1
    return " ".join(words)


def frames(n: int, size: int) -> List[Any]:
    import numpy as np

    rs = np.random.RandomState(0)
    return [rs.randint(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def gpu_memory() -> Tuple[str, float]:
    """(card name, MiB in use on it) from nvidia-smi; ("", 0) without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        name, used = out.splitlines()[0].rsplit(",", 1)
        return name.strip(), float(used)
    except Exception:
        return "", 0.0


# ---------------------------------------------------------------------------- (a) and checks


def baseline(folder: str, args, text: str, frame) -> Dict[str, float]:
    """One request at a time through the processor and plain generate."""
    import torch

    from inference_worker.models.loading import load_vlm

    vlm = load_vlm(folder, device=args.device, dtype=args.dtype)
    proc = vlm.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    prompt_tokens = 0

    def one() -> int:
        nonlocal prompt_tokens
        prompt = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = proc(text=[prompt], images=[frame], return_tensors="pt").to(vlm.device)
        prompt_tokens = inputs["input_ids"].shape[1]
        out = vlm.model.generate(
            **inputs, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
        )
        return out.shape[1] - inputs["input_ids"].shape[1]

    with torch.inference_mode():
        for _ in range(2):
            one()
        _sync(vlm.device)
        t0 = time.perf_counter()
        new = sum(one() for _ in range(args.baseline_requests))
        _sync(vlm.device)
        dt = time.perf_counter() - t0
    result = {
        "rps": args.baseline_requests / dt,
        "tokens_per_s": new / dt,
        "prompt_tokens": float(prompt_tokens),
    }
    if not args.skip_check:
        result.update(engine_checks(vlm, args, text))
    return result  # the model goes with this frame; run() frees the GPU memory


def engine_checks(vlm, args, text: str) -> Dict[str, float]:
    """The engine alone (no Redis): batch throughput and stages; graphs vs eager tokens."""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.handlers.base import Stopwatch

    n = args.sessions
    prompts = [user_prompt(f, text) for f in frames(n, args.image_size)]
    samp = [Sampling(max_tokens=args.max_tokens)] * n
    out: Dict[str, float] = {}
    decode = "graphs" if vlm.device.type == "cuda" else "eager"
    engine = ChatEngine(vlm, EngineOptions(ignore_eos=True, decode=decode))
    engine.warmup()
    engine.generate(prompts, samp)  # first batch of this shape: captures its graph
    timed = []
    for _ in range(3):  # the median of three batches
        _sync(vlm.device)
        sw = Stopwatch()
        t0 = time.perf_counter()
        fast = engine.generate(prompts, samp, sw)
        _sync(vlm.device)
        timed.append((time.perf_counter() - t0, sw.timings))
    dt, timings = sorted(timed, key=lambda x: x[0])[1]
    out["engine_batch_rps"] = n / dt
    out.update({f"engine_{k}_ms": v for k, v in timings.items()})
    out.update(stage_probe(engine, prompts, args.max_tokens))
    if decode == "graphs":
        k = min(16, n)
        eager = ChatEngine(vlm, EngineOptions(ignore_eos=True, decode="eager")).generate(
            prompts[:k], samp[:k]
        )
        same = sum(a.token_ids == b.token_ids for a, b in zip(fast[:k], eager))
        out["graph_vs_eager_identical_fraction"] = same / k
    return out


def stage_probe(engine, prompts, max_tokens: int) -> Dict[str, float]:
    """Where a batch's time goes: the vision tower alone (the engine's path and
    transformers'), the prompt pass (the engine's and transformers'), one decode step."""
    import torch

    batch = engine.inputs.build(prompts)
    out: Dict[str, float] = {}

    def timed(name: str, fn) -> Any:
        fn()
        _sync(engine.device)
        t0 = time.perf_counter()
        res = fn()
        _sync(engine.device)
        out[name] = (time.perf_counter() - t0) * 1000
        return res

    with torch.inference_mode():
        if batch.pixel_values is not None:
            timed(
                "probe_vision_ms",
                lambda: engine.vision(batch.pixel_values, batch.grids, batch.image_grid_thw),
            )
            timed(
                "probe_vision_stock_ms",
                lambda: engine.model.model.get_image_features(batch.pixel_values, batch.image_grid_thw),
            )
        own = engine.own_prefill
        timed("probe_prefill_ms", lambda: engine._prefill(batch, extra=max_tokens))
        engine.own_prefill = False
        timed("probe_prefill_transformers_ms", lambda: engine._prefill(batch, extra=max_tokens))
        engine.own_prefill = own
        cache, first = engine._prefill(batch, extra=max_tokens)
        tok = first.argmax(-1)
        steps = max(1, max_tokens - 1)
        _sync(engine.device)
        t0 = time.perf_counter()
        for i in range(steps):
            tok = engine.steps.step(cache, tok, batch.next_positions + i, batch.length + i).argmax(-1)
        _sync(engine.device)
        out["probe_decode_step_ms"] = (time.perf_counter() - t0) * 1000 / steps
    return out


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- (b)


def _sessions(url, prefix, first, count, text, size, max_tokens, t_end, queue) -> None:
    """One agent process: `count` sessions, each a closed loop of requests until t_end."""
    from broker.settings import BrokerSettings
    from env_agents.client import AsyncAgentClient
    from schemas.messages import TextActionRequest

    broker = BrokerSettings(url=url, prefix=prefix)
    frame = frames(1, size)[0]
    done: List[Tuple[float, float, int, int, float]] = []

    async def session(i: int) -> None:
        async with AsyncAgentClient(f"bench-{i}", settings=broker) as client:
            step = 0
            while time.time() < t_end:
                req = TextActionRequest(
                    messages=[
                        {
                            "role": "user",
                            "content": [{"type": "image", "image": frame}, {"type": "text", "text": text}],
                        }
                    ],
                    max_tokens=max_tokens,
                    step=step,
                )
                t0 = time.time()
                reply = await client.request(req, timeout=300)
                model_ms = sum(v for k, v in reply.timings.items() if k != "queue_ms")
                done.append(
                    (
                        time.time(),
                        time.time() - t0,
                        reply.result.completion_tokens,
                        reply.batch_size,
                        model_ms,
                    )
                )
                step += 1

    async def main() -> None:
        await asyncio.gather(*(session(i) for i in range(first, first + count)))

    eventloop.run(main())
    queue.put(done)


def served(
    folder: str,
    args,
    text: str,
    max_batch: int,
    devices: Optional[List[str]] = None,
    worker_flags: Sequence[str] = (),
    windows: int = 1,
) -> Dict[str, Any]:
    """(b): one `vlmq worker` per entry of `devices` (default: --device), all in one
    consumer group of one Redis, and --sessions closed-loop agent sessions. `worker_flags`:
    more worker flags (e.g. --quantize nf4). With `windows` > 1 the sessions run that many
    --seconds windows back to back after one warm-up; "rps_runs" holds each window's rate."""
    from broker.connection import connect_sync
    from broker.embedded import EmbeddedRedis
    from broker.keys import Keys
    from broker.settings import BrokerSettings

    prefix = f"bench{os.getpid()}"
    devices = devices or [args.device]
    with EmbeddedRedis() as server:
        workers = []
        for i, device in enumerate(devices):
            cmd = argv(
                "worker", BrokerSettings(url=server.url, prefix=prefix),
                "--name", f"bench-worker-{i}", "--backend", "hf", "--model", folder, "--device", device,
                "--dtype", args.dtype, "--kinds", "text_action", "--max-batch", str(max_batch),
                "--max-wait-ms", str(args.max_wait_ms), "--regroup-ms", str(args.regroup_ms),
                "--option", "ignore_eos=1", *worker_flags,
            )  # fmt: skip
            for o in args.option:
                cmd += ["--option", o]
            workers.append(subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        try:
            redis = connect_sync(BrokerSettings(url=server.url, prefix=prefix))
            keys = [Keys(prefix).worker(f"bench-worker-{i}") for i in range(len(devices))]
            give_up = time.time() + 900
            while not all(redis.exists(k) for k in keys):
                if any(w.poll() is not None for w in workers) or time.time() > give_up:
                    raise RuntimeError("a worker did not start (see its output above)")
                time.sleep(0.5)
            start = time.time() + args.warmup_s
            end = start + args.seconds * windows
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            per = [args.sessions // args.procs + (i < args.sessions % args.procs) for i in range(args.procs)]
            procs = []
            first = 0
            for n in per:
                procs.append(
                    ctx.Process(
                        target=_sessions,
                        args=(
                            server.url,
                            prefix,
                            first,
                            n,
                            text,
                            args.image_size,
                            args.max_tokens,
                            end,
                            queue,
                        ),
                    )
                )
                first += n
            for p in procs:
                p.start()
            time.sleep(max(0.0, start + args.seconds / 2 - time.time()))
            card, mib = gpu_memory()
            done = [x for _ in procs for x in queue.get(timeout=args.warmup_s + args.seconds * windows + 600)]
            for p in procs:
                p.join(60)
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                try:
                    w.wait(60)
                except subprocess.TimeoutExpired:
                    w.kill()
    window = [d for d in done if start <= d[0] <= end]
    lat = sorted(d[1] for d in window)
    seconds = args.seconds * windows
    bounds = [start + i * args.seconds for i in range(windows + 1)]
    return {
        "rps": len(window) / seconds,
        "rps_runs": [
            sum(lo <= d[0] < hi for d in window) / args.seconds for lo, hi in zip(bounds, bounds[1:])
        ],
        "tokens_per_s": sum(d[2] for d in window) / seconds,
        "latency_p50_s": statistics.median(lat) if lat else 0.0,
        "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else 0.0,
        "replies": float(len(window)),
        "batch_size_mean": statistics.mean(d[3] for d in window) if window else 0.0,
        # each reply carries its batch's model time: summed once per batch, over the window
        "model_busy_fraction": sum(d[4] / d[3] for d in window) / 1000 / seconds / len(devices),
        "gpu_memory_mib": mib,
        "card": card,  # type: ignore[dict-item]
    }


# ---------------------------------------------------------------------------- run


def run(args) -> int:
    from inference_worker.models.make import make_model
    from ops.bench.records import machine_description, record, write_results

    folder = args.model
    tmp: Optional[tempfile.TemporaryDirectory] = None
    if not folder:
        tmp = tempfile.TemporaryDirectory(prefix="vlmq-bench-model-")
        t0 = time.perf_counter()
        folder = make_model(args.arch, tmp.name, preset=args.preset, seed=0, device=args.device)
        log.info("built %s %s in %.1f s", args.arch, args.preset, time.perf_counter() - t0)
    try:
        from transformers import AutoTokenizer

        text = prompt_text(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
        frame = frames(1, args.image_size)[0]
        a = baseline(folder, args, text, frame)
        _free(args.device)
        log.info("(a) %s", a)
        runs = {}
        for mb in (int(x) for x in str(args.max_batch).split(",")):
            runs[mb] = served(folder, args, text, mb)
            log.info("(b) max_batch %d: %s", mb, runs[mb])
        best = max(runs, key=lambda mb: runs[mb]["rps"])
        b = runs[best]
    finally:
        if tmp is not None:
            tmp.cleanup()
    card = b.pop("card") or os.environ.get("VLMQ_BENCH_GPU", "")
    where = (
        f"{card}; {args.arch} {args.preset if not args.model else 'checkpoint'}, {args.image_size}-px image, "
        f"{int(a['prompt_tokens'])} prompt tokens, {args.max_tokens} new tokens; {args.sessions} sessions in "
        f"{args.procs} processes; worker --max-batch {best} --max-wait-ms {args.max_wait_ms:g} --regroup-ms {args.regroup_ms:g}; "
        f"{machine_description()}"
    )
    n = args.sessions
    recs = [
        record(f"throughput_rps_{n}_sessions", b["rps"], "requests/s", a["rps"], machine=where),
        record(f"tokens_per_s_{n}_sessions", b["tokens_per_s"], "tokens/s", a["tokens_per_s"], machine=where),
        record(f"latency_p50_{n}_sessions", b["latency_p50_s"], "s", machine=where),
        record(f"latency_p95_{n}_sessions", b["latency_p95_s"], "s", machine=where),
        record("gpu_memory_used_mib", b["gpu_memory_mib"], "MiB", machine=where),
        record("baseline_generate_rps_batch1", a["rps"], "requests/s", machine=where),
    ]
    for mb, r in sorted(runs.items()):
        recs.append(
            record(
                f"throughput_rps_{n}_sessions_max_batch_{mb}", r["rps"], "requests/s", a["rps"], machine=where
            )
        )
    recs.append(record(f"batch_size_mean_{n}_sessions", b["batch_size_mean"], "requests", machine=where))
    recs.append(
        record(f"model_busy_fraction_{n}_sessions", b["model_busy_fraction"], "fraction", machine=where)
    )
    for k, v in a.items():
        if k.startswith(("engine_", "graph_", "probe_")):
            unit = "ms" if k.endswith("_ms") else ("requests/s" if k.endswith("rps") else "fraction")
            recs.append(record(k, v, unit, a["rps"] if k == "engine_batch_rps" else None, machine=where))
    write_results(args.out, recs)
    for r in recs:
        ratio = f" ({r.ratio}x)" if r.ratio else ""
        print(f"{r.metric:45s} {r.value:>12} {r.unit}{ratio}")
    return 0
