"""Chat throughput: the vlmq worker serving many sessions through Redis vs transformers' `generate`.

Baselines, same checkpoint, card and run: the strongest thing a user could run instead,
batched `generate` (--sessions requests per call: the processor and plain `generate`,
left-padded), and a per-request policy server's style, one request at a time (batch 1).
vlmq: a `vlmq worker --backend hf` process and --sessions concurrent agent sessions (in
--procs processes), each sending a text_action request (one --image-size frame, a
~--prompt-tokens prompt, --max-tokens new tokens) and the next as soon as its reply arrives. Each served figure is
the median of --runs measurement windows of --seconds after one warm-up.

Records throughput_rps_<N>_sessions (baseline: batched generate), the same against batch
1 (`_vs_seed`), tokens/s and latency; with mixed lengths (max_tokens drawn from
--mixed-lengths per request) the continuous core against `--serving batch`, the
batch-at-a-time path; the engine's own throughput and stage times without Redis; whether
graph and eager decoding agree token for token at the same shapes; GPU memory, and the
GPU's utilization in the served windows (nvidia-smi, where there is one).

The checkpoint is --model, or one built here with `make_model --preset 2b` (random
weights: the shapes and costs of the release, not its answers). Random weights end at
arbitrary tokens, so every side decodes exactly max_tokens (the worker with
`--option ignore_eos=1`, the baselines with min_new_tokens).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from broker import eventloop
from ops.bench.workers import stop_worker, wait_for_worker
from ops.cli import argv

log = logging.getLogger("vlmq.bench.chat")


def add_checkpoint_args(p) -> None:
    """The checkpoint, the worker's device and the agent sessions: the same for every
    benchmark that serves a Qwen-VL through a worker process (chat, structured)."""
    p.add_argument("--model", default="", help="checkpoint folder; empty: build one with make-model")
    p.add_argument("--arch", default="qwen2-vl", help="arch of the built checkpoint (%(default)s)")
    p.add_argument("--preset", default="2b", help="preset of the built checkpoint (%(default)s)")
    p.add_argument("--device", default="cuda", help="model device (%(default)s)")
    p.add_argument("--dtype", default="auto", help="model dtype (%(default)s)")
    p.add_argument("--sessions", type=int, default=128, help="concurrent agent sessions (%(default)s)")
    p.add_argument("--procs", type=int, default=4, help="agent processes (%(default)s)")


def add_served_args(p) -> None:
    """The requests' frame and prompt, the measurement windows and the worker's batching:
    shared with the structured benchmark so that both measure the same served setup."""
    p.add_argument("--image-size", type=int, default=224, help="frame side in pixels (%(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=100, help="text tokens in the prompt (%(default)s)")
    p.add_argument("--runs", type=int, default=3, help="measured runs of every figure (%(default)s)")
    p.add_argument(
        "--warmup-s", type=float, default=10.0, help="served: time before the first window (%(default)s)"
    )
    p.add_argument("--seconds", type=float, default=8.0, help="served: length of one window (%(default)s)")
    p.add_argument("--max-batch", type=int, default=128, help="worker --max-batch (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="worker --max-wait-ms (%(default)s)")
    p.add_argument("--prefill-min", type=int, default=32, help="worker --prefill-min (%(default)s)")


def add_args(p) -> None:
    p.set_defaults(out="benchmarks/results/gpu_chat.json")
    add_checkpoint_args(p)
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (%(default)s)")
    add_served_args(p)
    p.add_argument(
        "--baseline-requests", type=int, default=4, help="requests per run of batch 1 (%(default)s)"
    )
    p.add_argument(
        "--starts",
        type=int,
        default=1,
        help="served: worker starts, each warmed up and measured for --runs windows; a figure "
        "is the median of all their windows (a start settles into a closed-loop rhythm of its "
        "own: docs/BENCHMARKS.md) (%(default)s)",
    )
    p.add_argument(
        "--batch-serving-wait-ms",
        type=float,
        default=50.0,
        help="--serving batch: its --max-wait-ms and --regroup-ms, as it was tuned (%(default)s)",
    )
    p.add_argument(
        "--mixed-lengths",
        default="16,64,256",
        help="max_tokens choices of the mixed-length runs; empty: skip them (%(default)s)",
    )
    p.add_argument(
        "--parts",
        default="baseline,engine,served,mixed",
        help="what to run, comma-separated from baseline, engine, served, mixed (%(default)s)",
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra worker --option, repeatable"
    )


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


class Utilization:
    """`nvidia-smi`'s utilization.gpu (the share of its sample period in which a kernel ran),
    read every `period_ms` into a file between `start` and `stop`; nothing without nvidia-smi."""

    def __init__(self, path: str, period_ms: int = 100) -> None:
        self.path, self.period_ms = path, period_ms
        self.proc: Any = None

    def start(self) -> None:
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(self.period_ms), "-f", self.path],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def mean(self, lo: float, hi: float) -> Optional[float]:
        """Mean utilization (%) of the samples taken in [lo, hi) (epoch seconds), or None."""
        try:
            with open(self.path) as f:
                samples = utilization_samples(f.read())
        except OSError:
            return None
        window = [u for t, u in samples if lo <= t < hi]
        return statistics.mean(window) if window else None


def utilization_samples(text: str) -> List[Tuple[float, float]]:
    """(epoch seconds, %) of nvidia-smi's `timestamp, utilization.gpu` lines (local time)."""
    from datetime import datetime

    out = []
    for line in text.splitlines():
        try:
            stamp, util = line.rsplit(",", 1)
            when = datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((when, float(util)))
        except ValueError:
            continue  # a partial last line, or a card that reports [N/A]
    return out


# ---------------------------------------------------------------------------- baselines and checks


def baselines(vlm, args, text: str, frame) -> Dict[str, Any]:
    """transformers' processor and plain `generate`: batch 1 (a per-request server's style) and a batch of
    --sessions (left-padded); each the list of --runs runs' requests/s."""
    import torch

    proc = vlm.processor
    proc.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out: Dict[str, Any] = {}

    def call(n: int) -> int:
        inputs = proc(text=[prompt] * n, images=[frame] * n, padding=True, return_tensors="pt").to(vlm.device)
        out["prompt_tokens"] = float(inputs["input_ids"].shape[1])
        gen = vlm.model.generate(
            **inputs, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
        )
        return n * (gen.shape[1] - inputs["input_ids"].shape[1])

    with torch.inference_mode():
        for name, n, calls in (("batch1", 1, args.baseline_requests), ("batched", args.sessions, 1)):
            call(n)  # warm-up
            rps, tps = [], []
            for _ in range(args.runs):
                _sync(vlm.device)
                t0 = time.perf_counter()
                new = sum(call(n) for _ in range(calls))
                _sync(vlm.device)
                dt = time.perf_counter() - t0
                rps.append(n * calls / dt)
                tps.append(new / dt)
            out[f"{name}_rps"], out[f"{name}_tokens_per_s"] = rps, tps
    return out


def engine_checks(vlm, args, text: str) -> Dict[str, Any]:
    """The engine alone (no Redis): --sessions prompts through `generate` (per-run
    requests/s and stages) and a stage probe. (Graph vs eager decoding at the same shapes:
    `vlmq bench backends --parity`.)"""
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.timing import Stopwatch

    n = args.sessions
    prompts = [user_prompt(f, text) for f in frames(n, args.image_size)]
    samp = [Sampling(max_tokens=args.max_tokens)] * n
    out: Dict[str, Any] = {}
    engine = ChatEngine(vlm, EngineOptions(ignore_eos=True, kv_slots=n, max_context=1024), max_sequences=n)
    engine.warmup()
    engine.generate(prompts, samp)
    rps, stages = [], {}
    for _ in range(args.runs):
        _sync(vlm.device)
        sw = Stopwatch()
        t0 = time.perf_counter()
        fast = engine.generate(prompts, samp, sw)
        _sync(vlm.device)
        rps.append(n / (time.perf_counter() - t0))
        for k, v in sw.timings.items():
            stages.setdefault(f"engine_{k}_ms", []).append(v)
    out["engine_batch_rps"] = rps
    out.update(stages)
    out.update(stage_probe(engine, prompts, args.max_tokens, args.runs))
    del engine, fast
    return out


def stage_probe(engine, prompts, max_tokens: int, runs: int) -> Dict[str, List[float]]:
    """Where the time goes, each the list of `runs` timings: the vision tower (the engine's
    path and transformers'), the prompt pass with vision (the engine's and
    transformers'), one decode step of the whole batch (mean over max_tokens steps)."""
    import torch

    from inference_worker.engines.sampling import Sampling

    batch = engine.inputs.build(prompts)
    out: Dict[str, List[float]] = {}

    def timed(name: str, fn) -> None:
        fn()
        for _ in range(runs):
            _sync(engine.device)
            t0 = time.perf_counter()
            fn()
            _sync(engine.device)
            out.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

    def prefill(own: bool) -> None:
        engine.own_prefill, was = own, engine.own_prefill
        try:
            engine._prefill_into(engine.stack.new_cache(batch.batch, batch.length), batch, padded=False)
        finally:
            engine.own_prefill = was

    with torch.inference_mode():
        if batch.pixel_values is not None:
            timed(
                "probe_vision_ms",
                lambda: engine.vision_pass(batch.pixel_values, batch.grids, batch.image_grid_thw),
            )
            timed(
                "probe_vision_stock_ms",
                lambda: engine.model.model.get_image_features(batch.pixel_values, batch.image_grid_thw),
            )
        timed("probe_prefill_ms", lambda: prefill(True))
        timed("probe_prefill_transformers_ms", lambda: prefill(False))
        keys = [object() for _ in prompts]
        for _ in range(runs):
            engine.admit(keys, prompts, [Sampling(max_tokens=max_tokens + 1)] * len(prompts))
            _sync(engine.device)
            t0 = time.perf_counter()
            for _ in range(max_tokens - 1):
                engine.step()
            _sync(engine.device)
            out.setdefault("probe_decode_step_ms", []).append(
                (time.perf_counter() - t0) * 1000 / (max_tokens - 1)
            )
            engine.abort(keys)
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


def _sessions(url, prefix, first, count, text, size, lengths, t_end, queue) -> None:
    """One agent process: `count` sessions, each a closed loop of requests until t_end;
    each request's max_tokens is drawn from `lengths` (seeded by the session)."""
    import random

    from broker.settings import BrokerSettings
    from env_agents.client import AsyncAgentClient
    from schemas.messages import TextActionRequest

    broker = BrokerSettings(url=url, prefix=prefix)
    frame = frames(1, size)[0]
    # (answered at, latency, completion tokens, decode rows, the worker's queue + model ms,
    # its queue ms, its prompt pass's ms, the intake's part of the queue ms)
    done: List[Tuple[float, float, int, int, float, float, float, float]] = []

    async def session(i: int) -> None:
        pick = random.Random(i)
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
                    max_tokens=pick.choice(lengths),
                    step=step,
                )
                t0 = time.time()
                reply = await client.request(req, timeout=300)
                t = reply.timings
                inside = t.get("queue_ms", 0.0) + t.get("model_ms", 0.0)
                done.append(
                    (
                        time.time(),
                        time.time() - t0,
                        reply.result.completion_tokens,
                        reply.batch_size,
                        inside,
                        t.get("queue_ms", 0.0),
                        t.get("prefill", 0.0),
                        t.get("intake_ms", 0.0),
                    )
                )
                step += 1

    async def main() -> None:
        await asyncio.gather(*(session(i) for i in range(first, first + count)))

    eventloop.run(main())
    queue.put(done)


def served(
    folder: str, args, text: str, serving: str, lengths: List[int], worker_flags: Sequence[str] = ()
) -> List[Dict[str, float]]:
    """One `vlmq worker` (with `worker_flags`) and --sessions closed-loop agent sessions;
    after --warmup-s, --runs windows of --seconds, each summarised on its own."""
    from broker.embedded import EmbeddedRedis
    from broker.settings import BrokerSettings

    prefix = f"bench{os.getpid()}{serving}"
    wait = args.batch_serving_wait_ms if serving == "batch" else args.max_wait_ms
    with EmbeddedRedis() as server:
        cmd = argv(
            "worker", BrokerSettings(url=server.url, prefix=prefix),
            "--name", "bench-worker", "--backend", "hf", "--model", folder, "--device", args.device,
            "--dtype", args.dtype, "--kinds", "text_action", "--max-batch", str(args.max_batch),
            "--serving", serving, "--max-wait-ms", str(wait), "--prefill-min", str(args.prefill_min),
            "--regroup-ms", str(args.batch_serving_wait_ms if serving == "batch" else 0),
            "--option", "ignore_eos=1", "--option", f"kv_slots={args.max_batch}",
        )  # fmt: skip
        for o in args.option:
            cmd += ["--option", o]
        cmd += list(worker_flags)
        worker = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        util = Utilization(os.path.join(tempfile.mkdtemp(prefix="vlmq-util-"), "utilization.csv"))
        try:
            wait_for_worker(BrokerSettings(url=server.url, prefix=prefix), "bench-worker", worker, 900)
            util.start()
            start = time.time() + args.warmup_s
            end = start + args.runs * args.seconds
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            per = [args.sessions // args.procs + (i < args.sessions % args.procs) for i in range(args.procs)]
            procs, first = [], 0
            for n in per:
                procs.append(
                    ctx.Process(
                        target=_sessions,
                        args=(server.url, prefix, first, n, text, args.image_size, lengths, end, queue),
                    )
                )
                first += n
            for p in procs:
                p.start()
            time.sleep(max(0.0, start + args.seconds / 2 - time.time()))
            card, mib = gpu_memory()
            done = [
                x for _ in procs for x in queue.get(timeout=args.warmup_s + args.runs * args.seconds + 600)
            ]
            for p in procs:
                p.join(60)
        finally:
            util.stop()
            stop_worker(worker)
    runs = []
    for k in range(args.runs):
        lo, hi = start + k * args.seconds, start + (k + 1) * args.seconds
        window = [d for d in done if lo <= d[0] < hi]
        lat = sorted(d[1] for d in window)
        runs.append(
            {
                "rps": len(window) / args.seconds,
                "tokens_per_s": sum(d[2] for d in window) / args.seconds,
                "latency_p50_s": statistics.median(lat) if lat else 0.0,
                "latency_p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else 0.0,
                "batch_size_mean": statistics.mean(d[3] for d in window) if window else 0.0,
                # the client's wait outside the worker's queue and model: Redis both ways, the
                # worker's reading, preparing and replying, the agent process
                "outside_ms_p50": statistics.median(d[1] * 1000.0 - d[4] for d in window) if window else 0.0,
                # waiting to be admitted (of it, reaching the scheduler), and the prompt pass
                # of its group (the worker's timings)
                "queue_ms_p50": statistics.median(d[5] for d in window) if window else 0.0,
                "intake_ms_p50": statistics.median(d[7] for d in window) if window else 0.0,
                "prefill_ms_p50": statistics.median(d[6] for d in window) if window else 0.0,
                "gpu_memory_mib": mib,
                "gpu_utilization": util.mean(lo, hi),  # type: ignore[dict-item]
                "card": card,  # type: ignore[dict-item]
            }
        )
    shutil.rmtree(os.path.dirname(util.path), ignore_errors=True)
    return runs


# ---------------------------------------------------------------------------- run


def run(args) -> int:
    import torch

    from inference_worker.models.loading import load_vlm
    from ops.bench.models import checkpoint
    from ops.bench.records import Record, machine_description, record, write_results

    if args.starts < 1:
        raise SystemExit("vlmq bench chat: --starts must be at least 1")
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    a: Dict[str, Any] = {}
    served_runs: Dict[str, List[Dict[str, float]]] = {}
    with checkpoint(args.model, args.arch, args.preset, args.device) as folder:
        from transformers import AutoTokenizer

        text = prompt_text(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
        frame = frames(1, args.image_size)[0]
        if parts & {"baseline", "engine"}:
            vlm = load_vlm(folder, device=args.device, dtype=args.dtype)
            if "baseline" in parts:
                a.update(baselines(vlm, args, text, frame))
                log.info("baselines %s", a)
            if "engine" in parts:
                a.update(engine_checks(vlm, args, text))
            del vlm
            _free(args.device)
        lengths = [int(x) for x in args.mixed_lengths.split(",") if x]
        starts = range(args.starts)
        if "served" in parts:
            served_runs["uniform"] = [
                r for _ in starts for r in served(folder, args, text, "continuous", [args.max_tokens])
            ]
            log.info("served %s", served_runs["uniform"])
        if "mixed" in parts and lengths:
            for serving in ("continuous", "batch"):
                served_runs[serving] = [
                    r for _ in starts for r in served(folder, args, text, serving, lengths)
                ]
                log.info("mixed lengths, %s: %s", serving, served_runs[serving])
    card = next((r["card"] for rs in served_runs.values() for r in rs if r.get("card")), "")
    card = card or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    n = args.sessions
    # the whole prompt's length is counted by the baseline part; without it, the text's
    prompt = (
        f"{int(a['prompt_tokens'])} prompt tokens"
        if "prompt_tokens" in a
        else f"a ~{args.prompt_tokens}-token text"
    )
    host = machine_description()
    options = "".join(f" --option {o}" for o in args.option)
    where = (
        f"{'' if card in host else card + '; '}{args.arch} {args.preset if not args.model else 'checkpoint'}, "
        f"{args.image_size}-px image, {prompt}, {args.max_tokens} new tokens; {n} sessions in "
        f"{args.procs} processes; worker --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g} "
        f"--prefill-min {args.prefill_min}{options}; {host}"
    )

    def col(runs: List[Dict[str, float]], key: str) -> List[float]:
        return [r[key] for r in runs]

    recs: List[Record] = []
    batched, seed = a.get("batched_rps"), a.get("batch1_rps")
    u = served_runs.get("uniform")
    if u:
        recs += [
            record(f"throughput_rps_{n}_sessions", col(u, "rps"), "requests/s", batched, machine=where),
            record(f"throughput_rps_{n}_sessions_vs_seed", col(u, "rps"), "requests/s", seed, machine=where),
            record(
                f"tokens_per_s_{n}_sessions",
                col(u, "tokens_per_s"),
                "tokens/s",
                a.get("batched_tokens_per_s"),
                machine=where,
            ),
            record(f"latency_p50_{n}_sessions", col(u, "latency_p50_s"), "s", machine=where),
            record(f"latency_p95_{n}_sessions", col(u, "latency_p95_s"), "s", machine=where),
            record(f"decode_rows_mean_{n}_sessions", col(u, "batch_size_mean"), "sequences", machine=where),
            record(f"outside_worker_ms_p50_{n}_sessions", col(u, "outside_ms_p50"), "ms", machine=where),
            record("gpu_memory_used_mib", col(u, "gpu_memory_mib"), "MiB", machine=where),
        ]
        if all(r["gpu_utilization"] is not None for r in u):  # nvidia-smi sampled every window
            recs.append(
                record(
                    f"gpu_utilization_{n}_sessions",
                    col(u, "gpu_utilization"),
                    "percent",
                    machine=f"nvidia-smi utilization.gpu every 100 ms, mean of a window; {where}",
                )
            )
    cont, batch = served_runs.get("continuous"), served_runs.get("batch")
    mixed = f"max_tokens from {{{args.mixed_lengths}}}"
    if cont:
        base = statistics.median(col(batch, "rps")) if batch else None
        recs.append(
            record(
                f"throughput_rps_{n}_sessions_mixed_lengths",
                col(cont, "rps"),
                "requests/s",
                base,
                machine=f"{mixed}; {where}",
            )
        )
        recs.append(
            record(
                f"latency_p95_{n}_sessions_mixed_lengths",
                col(cont, "latency_p95_s"),
                "s",
                machine=f"{mixed}; {where}",
            )
        )
    if batch:
        recs.append(
            record(
                f"throughput_rps_{n}_sessions_mixed_lengths_batch_serving",
                col(batch, "rps"),
                "requests/s",
                machine=f"{mixed}; --serving batch --max-wait-ms/--regroup-ms {args.batch_serving_wait_ms:g}; {where}",
            )
        )
        recs.append(
            record(
                f"latency_p95_{n}_sessions_mixed_lengths_batch_serving",
                col(batch, "latency_p95_s"),
                "s",
                machine=f"{mixed}; {where}",
            )
        )
    if batched:
        recs.append(record(f"baseline_generate_rps_batch{n}", batched, "requests/s", machine=where))
    if seed:
        recs.append(record("baseline_generate_rps_batch1", seed, "requests/s", machine=where))
    for k, v in a.items():
        if k.startswith(("engine_", "probe_")):
            unit = "ms" if k.endswith("_ms") else ("requests/s" if k.endswith("rps") else "fraction")
            recs.append(record(k, v, unit, batched if k == "engine_batch_rps" else None, machine=where))
    write_results(args.out, recs)
    for r in recs:
        ratio = f" ({r.ratio}x)" if r.ratio else ""
        print(f"{r.metric:55s} {r.value:>12} {r.unit}{ratio}  [{r.min}..{r.max}, {r.runs} runs]")
    return 0
