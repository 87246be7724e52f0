"""Several workers sharing one Redis: chat throughput with 1, 2, 4 workers, one per GPU.

Each --device-sets entry is one run of `vlmq bench chat`'s served measurement (b): one
`vlmq worker --device D` per device of the set, all in one consumer group of one Redis,
driven by --sessions-per-worker closed-loop sessions per worker. The first set is the
baseline. With distinct GPUs the records are scaling_efficiency_<k>_gpus = rps(k) / (k x
rps(1)); a set that repeats a device (several workers on one GPU, what a one-GPU machine
can run) is recorded as ..._<k>_workers_<g>_gpus instead, so the two are never confused.
Every set runs --repeats times, interleaved with the others; each record is the median of
its runs with min/max, and each efficiency is taken within one repeat.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import List

from ops.bench import chat
from ops.bench.records import machine_description, record, write_results

log = logging.getLogger("vlmq.bench.multigpu")


def add_args(p: argparse.ArgumentParser) -> None:
    chat.add_args(p)
    p.add_argument(
        "--device-sets",
        default="cuda:0|cuda:0,cuda:1|cuda:0,cuda:1,cuda:2,cuda:3",
        help="runs separated by '|', each a comma-separated list of worker devices (%(default)s)",
    )
    p.add_argument(
        "--sessions-per-worker", type=int, default=128, help="agent sessions per worker (%(default)s)"
    )
    if "--repeats" not in p._option_string_actions:  # the chat benchmark may have its own
        p.add_argument(
            "--repeats",
            type=int,
            default=3,
            help="runs of every device set, interleaved; records are the median with min/max (%(default)s)",
        )


def _label(devices: List[str]) -> str:
    gpus = len(set(devices))
    if gpus == len(devices):
        return f"{gpus}_gpus"
    return f"{len(devices)}_workers_{gpus}_gpus"


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ops.bench.models import checkpoint

    sets = [[d.strip() for d in s.split(",") if d.strip()] for s in args.device_sets.split("|") if s.strip()]
    max_batch = int(str(args.max_batch).split(",")[0])
    results: List[List[dict]] = [[] for _ in sets]
    with checkpoint(args.model, args.arch, args.preset, sets[0][0]) as folder:
        text = chat.prompt_text(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
        for rep in range(args.repeats):
            for i, devices in enumerate(sets):
                args.sessions = args.sessions_per_worker * len(devices)
                args.procs = max(args.procs, len(devices))
                r = chat.served(folder, args, text, max_batch, devices=devices)
                log.info("%s: %s", ",".join(devices), r)
                print(
                    f"repeat {rep} {','.join(devices):<40} {r['rps']:8.1f} req/s  p50 {r['latency_p50_s']:.2f} s",
                    flush=True,
                )
                results[i].append(r)
    base = [r["rps"] for r in results[0]]
    card = results[0][0].get("card") or os.environ.get("VLMQ_BENCH_GPU", "")
    where = (
        f"{card}; {args.arch} {args.preset if not args.model else 'checkpoint'}, {args.image_size}-px image, "
        f"{args.prompt_tokens}-token prompt, {args.max_tokens} new tokens; {args.sessions_per_worker} sessions "
        f"per worker; worker --max-batch {max_batch}; {machine_description()}"
    )
    recs = []
    for devices, runs in zip(sets, results):
        label = _label(devices)
        rps = [r["rps"] for r in runs]
        recs.append(record(f"throughput_rps_{label}", rps, "requests/s", base, machine=where))
        if len(devices) > 1:
            eff = [x / (len(devices) * b) if b else 0.0 for x, b in zip(rps, base)]
            recs.append(record(f"scaling_efficiency_{label}", eff, "fraction", machine=where))
    write_results(args.out, recs)
    for r in recs:
        print(f"{r.metric:45s} {r.value:>10} {r.unit} ({r.min}-{r.max}, {r.runs} runs)")
    return 0
