"""`vlmq vla record|convert|train|eval`: the VLA pipeline from expert recordings to a
served policy, with no downloaded data (docs/VLA.md walks through it)."""

from __future__ import annotations

import argparse
import json
import os

from broker.commands import Command
from broker.settings import env, flag


def _record(args: argparse.Namespace) -> int:
    from env_agents.recording.recorder import RecordingOptions, record

    opts = RecordingOptions(
        fps=args.fps,
        offset_ms=args.offset_ms,
        duplicate_prob=args.duplicate_prob,
        max_steps=args.max_steps or None,
    )
    out = record(
        args.env,
        args.out,
        args.episodes,
        size=args.size,
        seed=args.seed,
        opts=opts,
        epsilon=args.epsilon,
        progress=True,
    )
    wins = sum(1 for o in out if o["success"])
    print(f"recorded {len(out)} episodes to {args.out}; expert success {wins}/{len(out)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ops.vla.convert import convert

    ratios = tuple(float(x) for x in args.splits.split(","))
    if len(ratios) != 3:
        raise SystemExit("--splits needs three ratios: train,val,test")
    m = convert(
        args.src, args.out, image_size=args.image_size or None, ratios=ratios, seed=args.seed, progress=True
    )
    print(json.dumps({"frames": m["frames"], "stats": m["stats"]}))
    return 0


def _vla_config(args: argparse.Namespace):
    from inference_worker.vla.config import VLAConfig

    return VLAConfig(
        vlm_path=os.path.abspath(args.vlm),
        vlm_layer=args.layer or None,
        image_size=args.image_size,
        num_frames=args.num_frames,
        frame_skip=args.frame_skip,
        chunk_size=args.chunk_size,
        expert_layers=args.expert_layers,
        expert_dim=args.expert_dim,
        expert_heads=args.expert_heads,
        num_steps=args.num_steps,
    )


def _train(args: argparse.Namespace) -> int:
    from inference_worker.vla.config import CONFIG_FILE
    from inference_worker.vla.model import QwenVLA
    from ops.vla.train import TrainConfig, train

    existing = os.path.isfile(os.path.join(args.out, CONFIG_FILE))
    if existing and (args.resume or args.init_from is None):
        if not args.resume:
            raise SystemExit(f"{args.out} already holds a VLA; pass --resume to continue training it")
        vla = QwenVLA.load(args.out, device=args.device, dtype=args.dtype, quantize=args.quantize)
    elif args.init_from:
        vla = QwenVLA.load(args.init_from, device=args.device, dtype=args.dtype, quantize=args.quantize)
    else:
        if not args.vlm:
            raise SystemExit("a new VLA needs --vlm DIR (a Qwen2-VL / Qwen3-VL folder)")
        vla = QwenVLA.build(
            _vla_config(args), device=args.device, dtype=args.dtype, quantize=args.quantize, seed=args.seed
        )
    tc = TrainConfig(
        data=args.data,
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        save_every=args.save_every,
        precision=args.precision,
        seed=args.seed,
        resume=args.resume,
    )
    train(vla, tc, progress=True)
    print(f"VLA folder: {args.out} (best by validation loss: {os.path.join(args.out, 'best')})")
    return 0


def _init(args: argparse.Namespace) -> int:
    from inference_worker.vla.model import QwenVLA

    vla = QwenVLA.build(
        _vla_config(args), device=args.device, dtype=args.dtype, quantize=args.quantize, seed=args.seed
    )
    vla.save(args.out)
    print(
        f"untrained VLA folder: {args.out} (serve it with `vlmq worker --model {args.vlm} --option vla={args.out}`)"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from inference_worker.handlers.action_chunk import ActionChunkHandler
    from inference_worker.vla.model import QwenVLA
    from ops.vla.evaluate import random_policy_rate, vla_policy_rate

    vla = QwenVLA.load(args.vla, device=args.device, dtype=args.dtype, quantize=args.quantize)
    handler = ActionChunkHandler(vla)
    ours = vla_policy_rate(
        handler,
        args.env,
        args.episodes,
        seed=args.seed,
        size=args.size,
        replan_every=args.replan_every,
        max_steps=args.max_steps or None,
        progress=True,
    )
    rand = random_policy_rate(
        args.env, args.episodes, seed=args.seed, size=64, max_steps=args.max_steps or None, progress=True
    )
    print(json.dumps({"vla": ours, "random": rand}, indent=1))
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    """The shape of a new VLA (VLAConfig)."""
    p.add_argument(
        "--layer", type=int, default=0, help="VLM layer for features, 0 = the middle (%(default)s)"
    )
    p.add_argument("--image-size", type=int, default=384, help="frame size into the VLM (%(default)s)")
    p.add_argument("--num-frames", type=int, default=3, help="context frames (%(default)s)")
    p.add_argument("--frame-skip", type=int, default=2, help="steps between context frames (%(default)s)")
    p.add_argument("--chunk-size", type=int, default=50, help="actions per chunk (%(default)s)")
    p.add_argument("--expert-layers", type=int, default=8, help="(%(default)s)")
    p.add_argument("--expert-dim", type=int, default=512, help="(%(default)s)")
    p.add_argument("--expert-heads", type=int, default=8, help="(%(default)s)")
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps when sampling (%(default)s)")


def _model_args(p: argparse.ArgumentParser) -> None:
    flag(p, "--device", var="DEVICE", default="cpu", help="cpu, cuda, cuda:N")
    flag(p, "--dtype", var="DTYPE", default="auto", help="VLM dtype: auto, float32, bfloat16")
    p.add_argument(
        "--quantize",
        default=env("QUANTIZE", "") or None,
        choices=[None, "nf4"],
        help="nf4 VLM (CUDA) [VLMQ_QUANTIZE]",
    )


def _record_args(p: argparse.ArgumentParser) -> None:
    flag(p, "--env", var="VLA_ENV", default="MiniWorld-OneRoom-v0", help="MiniWorld env id")
    p.add_argument("--out", required=True, help="folder for episode_NNNNN/ folders")
    p.add_argument("--episodes", type=int, default=100, help="episodes to record (%(default)s)")
    p.add_argument("--size", type=int, default=384, help="canvas size in pixels (%(default)s)")
    p.add_argument("--fps", type=float, default=10.0, help="capture rate (%(default)s)")
    p.add_argument(
        "--offset-ms", type=float, default=0.0, help="event clock offset written to meta.json (%(default)s)"
    )
    p.add_argument(
        "--duplicate-prob", type=float, default=0.03, help="chance a frame is grabbed twice (%(default)s)"
    )
    p.add_argument(
        "--epsilon", type=float, default=0.0, help="chance the expert acts at random (%(default)s)"
    )
    p.add_argument("--max-steps", type=int, default=0, help="episode step limit, 0 = the env's (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="env and timing seed (%(default)s)")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a recording folder, or a folder of them")
    p.add_argument("out", help="output folder (shards + manifest.json)")
    p.add_argument(
        "--image-size", type=int, default=0, help="resize frames to this square size, 0 = keep (%(default)s)"
    )
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test ratios by episode (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split shuffle seed (%(default)s)")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="converted shards (vlmq vla convert)")
    p.add_argument("--out", required=True, help="the VLA folder to write")
    flag(p, "--vlm", var="MODEL", default="", help="Qwen-VL folder for a new VLA", shown=None)
    p.add_argument("--init-from", default=None, help="start from this VLA folder's weights")
    p.add_argument("--resume", action="store_true", help="continue training --out from its train_state.pt")
    _config_args(p)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (%(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(%(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="(%(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (%(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="(%(default)s)")
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps (%(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="(%(default)s)")
    p.add_argument("--eval-every", type=int, default=200, help="validation period in steps (%(default)s)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint period in steps (%(default)s)")
    p.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast (%(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    _model_args(p)


def _init_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vlm", required=True, help="Qwen-VL folder the expert reads features from")
    p.add_argument("--out", required=True, help="the VLA folder to write")
    p.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    _config_args(p)
    _model_args(p)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vla", required=True, help="VLA folder")
    p.add_argument(
        "--env", default=env("VLA_ENV", "MiniWorld-OneRoom-v0"), help="[VLMQ_VLA_ENV] (%(default)s)"
    )
    p.add_argument("--episodes", type=int, default=50, help="(%(default)s)")
    p.add_argument("--size", type=int, default=384, help="render size, as recorded (%(default)s)")
    p.add_argument("--max-steps", type=int, default=0, help="episode step limit, 0 = the env's (%(default)s)")
    p.add_argument("--replan-every", type=int, default=2, help="env steps per chunk request (%(default)s)")
    p.add_argument(
        "--seed", type=int, default=1000, help="env seed (episodes differ from recording's) (%(default)s)"
    )
    _model_args(p)


COMMAND = Command(
    "vla",
    help="VLA pipeline: record expert episodes, convert, train the action expert, evaluate",
    description="QwenVLA: a frozen Qwen-VL and a flow-matching action expert. "
    "record -> convert -> train -> eval; serve with `vlmq worker --option vla=DIR`.",
    metavar="STEP",
    subcommands=[
        Command(
            "record",
            help="record MiniWorld episodes of a scripted expert (the capture format)",
            add_args=_record_args,
            run=_record,
        ),
        Command(
            "convert",
            help="recordings -> aligned training shards with train/val/test splits",
            add_args=_convert_args,
            run=_convert,
        ),
        Command(
            "train",
            help="train the action expert on converted shards (VLM frozen)",
            add_args=_train_args,
            run=_train,
        ),
        Command(
            "init",
            help="a new, untrained VLA folder (seeded random expert): to serve or benchmark before training",
            add_args=_init_args,
            run=_init,
        ),
        Command(
            "eval",
            help="success rate in MiniWorld: the VLA policy vs a random policy",
            add_args=_eval_args,
            run=_eval,
        ),
    ],
)
