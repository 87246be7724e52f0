"""VLA action chunks: latency per chunk with and without the feature cache, and success rate.

Latency: the action_chunk handler (the worker's own code path, without Redis) serves B
sessions at once, every session one step further each batch, so with the cache every
request encodes one new frame and reuses t-2 and t-4; the baseline is the same handler
with the cache of features off (vla_cache=frames), which re-encodes all 3 frames. A
chunk's latency is its batch's wall time (all chunks of a batch arrive together).
Metrics: chunk_latency_p50_ms_batch{B} (baseline: no cache), cache_speedup (batch 8).
Success (--success-vla DIR): MiniWorld episodes driven by the VLA vs a random policy on
the same episodes: success_rate (baseline: random).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Dict, List

import numpy as np

from ops.bench.records import Record, record, write_results


def add_args(p) -> None:
    p.add_argument("--vlm", default="", help="Qwen-VL folder; default: build a random one (--arch, --preset)")
    p.add_argument("--arch", default="qwen2-vl", help="architecture of the built VLM (%(default)s)")
    p.add_argument("--preset", default="2b", help="shape of the built VLM: 2b or tiny (%(default)s)")
    p.add_argument("--vla", default="", help="VLA folder; default: a random expert of the default shape")
    p.add_argument("--device", default="cuda", help="(%(default)s)")
    p.add_argument("--dtype", default="auto", help="(%(default)s)")
    p.add_argument("--image-size", type=int, default=384, help="frame size into the VLM (%(default)s)")
    p.add_argument("--frame-size", type=int, default=224, help="side of the frames agents send (%(default)s)")
    p.add_argument("--batches", default="1,8,32,64", help="batch sizes (%(default)s)")
    p.add_argument(
        "--profile-dir",
        default="",
        help="write a stage breakdown and a kernel table of the largest batch here",
    )
    p.add_argument("--iters", type=int, default=30, help="timed batches per point (%(default)s)")
    p.add_argument("--warmup", type=int, default=6, help="untimed batches per point (%(default)s)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the expert eagerly")
    p.add_argument("--success-vla", default="", help="also measure MiniWorld success of this VLA folder")
    p.add_argument("--env", default="MiniWorld-OneRoom-v0", help="success env (%(default)s)")
    p.add_argument("--episodes", type=int, default=100, help="success episodes per policy (%(default)s)")
    p.add_argument("--merge", action="store_true", help="keep the other metrics already in --out")


def _latency(
    vla, mode: str, batch: int, iters: int, warmup: int, size: int, graphs: bool
) -> Dict[str, List[float]]:
    from inference_worker.handlers.action_chunk import ActionChunkHandler
    from schemas.messages import ActionChunkRequest

    handler = ActionChunkHandler(vla, mode, cuda_graphs=graphs)
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(16)]
    walls: List[float] = []
    stages: Dict[str, List[float]] = {}
    for step in range(warmup + iters):
        reqs = [
            ActionChunkRequest(
                session_id=f"s{b}",
                step=step,
                image=pool[(step + b) % len(pool)],
                instruction="go to the red box",
                reset=step == 0,
                noise_seed=step,
            )
            for b in range(batch)
        ]
        t0 = time.perf_counter()
        out = handler.run(reqs)
        wall = (time.perf_counter() - t0) * 1000.0
        if step >= max(warmup, 4):  # steps >= 4: t-4 exists, the cache is in steady state
            walls.append(wall)
            for k, v in out.timings.items():
                stages.setdefault(k, []).append(v)
        bad = [r for r in out.results if isinstance(r, Exception)]
        if bad:
            raise RuntimeError(f"handler failed: {bad[0]}")
    return {"wall": walls, **stages}


def _runs(values: List[float], runs: int = 3) -> List[float]:
    """The p50 of each of `runs` consecutive slices of the timed batches: one figure per run."""
    k = max(1, len(values) // runs)
    return [statistics.median(values[i * k : (i + 1) * k]) for i in range(runs)]


def _profile(vla, batch: int, size: int, out_dir: str) -> None:
    """Stage times of the feature pass at `batch` (each stage synchronised) and a kernel
    table of one batch, into out_dir."""
    import torch

    ex = vla.extractor
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    texts = ["go to the red box"] * batch
    lines = []

    def sync():
        if vla.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        ex.encode(frames, texts)
    times: Dict[str, List[float]] = {}
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        images = ex._pixels(frames)
        sync()
        t1 = time.perf_counter()
        prompts = [ex._prompt(f, t) for f, t in zip(frames, texts)]
        b = ex.inputs.build(prompts, images)
        sync()
        t2 = time.perf_counter()
        with torch.no_grad():
            feats = ex.vision(b.pixel_values, b.grids, b.image_grid_thw)
            sync()
            t3 = time.perf_counter()
            ex.hidden_states(b)
            sync()
            t4 = time.perf_counter()
        for k, v in (
            ("pixels", t1 - t0),
            ("inputs", t2 - t1),
            ("vision", t3 - t2),
            ("features_all", t4 - t3),
        ):
            times.setdefault(k, []).append(v * 1000)
        del feats
    for k, v in times.items():
        lines.append(f"batch {batch} {k}: p50 {statistics.median(v):.2f} ms (min {min(v):.2f})")
    if vla.device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ex.encode(frames, texts)
            sync()
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_vla_b{batch}.txt"), "w") as f:
        f.write(text)


def _machine(where: str) -> str:
    from ops.bench.records import machine_description

    return f"{where}; {machine_description()}"


def _build_vlm(args) -> str:
    from inference_worker.models import make_model

    out = os.path.join(tempfile.gettempdir(), f"vlmq-bench-{args.arch}-{args.preset}")
    if not os.path.isfile(os.path.join(out, "config.json")):
        print(f"building a random {args.preset} {args.arch} at {out} ...", flush=True)
        make_model(args.arch, out, preset=args.preset, device=args.device)
    return out


def run(args) -> int:
    import torch

    from inference_worker.vla.config import VLAConfig
    from inference_worker.vla.model import QwenVLA

    records: List[Record] = []
    if args.merge and os.path.isfile(args.out):
        with open(args.out) as f:
            records = [Record(**r) for r in json.load(f)]
    gpu = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else ""
    )
    if gpu:
        os.environ.setdefault("VLMQ_BENCH_GPU", gpu)
    batches = [int(b) for b in args.batches.split(",") if b]
    new: List[Record] = []
    if batches:
        if args.vla:
            vla = QwenVLA.load(args.vla, device=args.device, dtype=args.dtype)
        else:
            vlm = args.vlm or _build_vlm(args)
            vla = QwenVLA.build(
                VLAConfig(vlm_path=vlm, image_size=args.image_size), device=args.device, dtype=args.dtype
            )
        print(vla.describe(), flush=True)
        graphs = not args.no_cuda_graphs
        table = {}
        where = f"{args.frame_size}-px frames into {args.image_size}-px VLM input"
        for b in batches:
            for mode in ("features", "frames"):
                r = _latency(vla, mode, b, args.iters, args.warmup, args.frame_size, graphs)
                table[(b, mode)] = r
                print(
                    f"batch {b:3d} {mode:8s} "
                    + " ".join(f"{k}={statistics.median(v):.1f}" for k, v in r.items()),
                    flush=True,
                )
            cached, full = table[(b, "features")], table[(b, "frames")]
            # a stage the handler did not time in a run reads 0
            for metric, stage, baseline in (
                ("chunk_latency_p50_ms", "wall", _runs(full["wall"])),
                ("encode_ms_p50", "encode", _runs(full.get("encode", [0.0]))),
                ("expert_ms_p50", "expert", None),
            ):
                ms = _runs(cached.get(stage, [0.0]))
                new.append(record(f"{metric}_batch{b}", ms, "ms", baseline=baseline, machine=_machine(where)))
        if 8 in batches:
            f8, c8 = _runs(table[(8, "frames")]["wall"]), _runs(table[(8, "features")]["wall"])
            new.append(record("cache_speedup", [f / c for f, c in zip(f8, c8)], "x", machine=_machine(where)))
        if args.profile_dir:
            _profile(vla, max(batches), args.frame_size, args.profile_dir)
        del vla
    if args.success_vla:
        from inference_worker.handlers.action_chunk import ActionChunkHandler
        from ops.vla.evaluate import random_policy_rate, vla_policy_rate

        vla = QwenVLA.load(args.success_vla, device=args.device, dtype=args.dtype)
        ours = vla_policy_rate(ActionChunkHandler(vla), args.env, args.episodes, progress=True)
        rand = random_policy_rate(args.env, args.episodes, progress=True)
        print(json.dumps({"vla": ours, "random": rand}), flush=True)
        new.append(record("success_rate", ours["success_rate"], "fraction", baseline=rand["success_rate"]))
    names = {r.metric for r in new}
    write_results(args.out, [r for r in records if r.metric not in names] + new)
    print(f"wrote {args.out}")
    return 0
