"""`vlmq make-model`: write a random-weight checkpoint of a real Qwen-VL architecture."""

from __future__ import annotations

import argparse
import os
import time

from broker.commands import Command
from broker.settings import flag

ARCH_CHOICES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
PRESET_CHOICES = ("tiny", "2b")


def default_out(arch: str, preset: str) -> str:
    return os.path.join("models", f"{arch}-{preset}")


def run(args: argparse.Namespace) -> int:
    from inference_worker.models.make import make_model

    t0 = time.perf_counter()
    out = args.out or default_out(args.arch, args.preset)
    out = make_model(args.arch, out, preset=args.preset, seed=args.seed, device=args.device)
    print(f"wrote {args.arch} ({args.preset}, seed {args.seed}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="qwen2-vl", choices=ARCH_CHOICES, help="architecture (%(default)s)")
    p.add_argument(
        "--preset",
        default="tiny",
        choices=PRESET_CHOICES,
        help="tiny: a few hundred thousand parameters, seconds on CPU; 2b: the published 2B "
        "shapes (build it on a GPU: --device cuda) (%(default)s)",
    )
    p.add_argument(
        "--out",
        default="",
        help="output folder (models/ARCH-PRESET, e.g. models/qwen2-vl-tiny: the folder "
        "ops/docker-compose.yml serves by default)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (%(default)s)")
    flag(p, "--device", var="MAKE_MODEL_DEVICE", default="cpu", help="where the weights are initialised")


COMMAND = Command(
    "make-model",
    help="write a random-weight Qwen-VL checkpoint (Hugging Face folder)",
    description="Build a real Qwen2-VL / Qwen2.5-VL / Qwen3-VL architecture from its transformers "
    "config class with random weights, a tokenizer trained locally, the release's image "
    "processor and chat template, and save it with save_pretrained. The folder loads like "
    "a downloaded checkpoint (`vlmq worker --model DIR`). The weights are random: the "
    "model's answers are noise, its shapes and costs are real.",
    add_args=add_args,
    run=run,
)
