"""`vlmq traces export`: SQLite traces -> SFT train/val JSONL."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from broker.settings import env


def run_export(args: argparse.Namespace) -> int:
    from env_agents.traces.sft import export_sft

    counts = export_sft(
        args.db,
        args.out_dir,
        val_fraction=args.val_fraction,
        min_steps=args.min_steps,
        success_only=args.success_only,
        seed=args.seed,
    )
    print(json.dumps({"out_dir": args.out_dir, **asdict(counts)}, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "traces",
        help="work with agent traces (SQLite written by `vlmq agents --traces`)",
        description="Agent traces: episodes, frames, requests, replies and timings in SQLite.",
    )
    tsub = p.add_subparsers(dest="traces_command", metavar="ACTION")
    e = tsub.add_parser(
        "export",
        help="export SFT JSONL (OpenAI-style messages, images as data URLs) with a train/val split",
        description="One sample per answered text_action / structured_action request: its messages "
        "plus the answer as the assistant turn. Episodes go wholly to train or to val.",
    )
    e.add_argument("--db", required=True, help="trace database (vlmq agents --traces PATH)")
    e.add_argument("--out-dir", required=True, help="writes train.jsonl and val.jsonl here")
    e.add_argument(
        "--val-fraction",
        type=float,
        default=env("SFT_VAL_FRACTION", 0.1),
        help="share of episodes for validation [VLMQ_SFT_VAL_FRACTION] (%(default)s)",
    )
    e.add_argument(
        "--min-steps",
        type=int,
        default=env("SFT_MIN_STEPS", 1),
        help="skip episodes shorter than this [VLMQ_SFT_MIN_STEPS] (%(default)s)",
    )
    e.add_argument("--success-only", action="store_true", help="keep successful episodes only")
    e.add_argument(
        "--seed", type=int, default=env("SFT_SEED", 0), help="split seed [VLMQ_SFT_SEED] (%(default)s)"
    )
    e.set_defaults(func=run_export)
    p.set_defaults(func=lambda args: p.print_help() or 2)
