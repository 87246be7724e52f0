"""`vlmq traces export`: SQLite traces -> SFT train/val JSONL."""

from __future__ import annotations

import argparse
import json
import sqlite3
from dataclasses import asdict

from broker.commands import Command
from broker.settings import flag


def run_export(args: argparse.Namespace) -> int:
    from env_agents.traces.sft import export_sft

    try:
        counts = export_sft(
            args.db,
            args.out_dir,
            val_fraction=args.val_fraction,
            min_steps=args.min_steps,
            success_only=args.success_only,
            seed=args.seed,
        )
    except (OSError, ValueError, sqlite3.Error) as exc:  # no database, bad fraction, nothing to export
        raise SystemExit(f"vlmq traces export: {exc}") from None
    print(json.dumps({"out_dir": args.out_dir, **asdict(counts)}, indent=2))
    return 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="trace database (vlmq agents --traces PATH)")
    p.add_argument("--out-dir", required=True, help="writes train.jsonl and val.jsonl here")
    flag(
        p,
        "--val-fraction",
        var="SFT_VAL_FRACTION",
        default=0.1,
        type=float,
        help="share of episodes for validation",
    )
    flag(p, "--min-steps", var="SFT_MIN_STEPS", default=1, type=int, help="skip episodes shorter than this")
    p.add_argument("--success-only", action="store_true", help="keep successful episodes only")
    flag(p, "--seed", var="SFT_SEED", default=0, type=int, help="split seed")


COMMAND = Command(
    "traces",
    help="work with agent traces (SQLite written by `vlmq agents --traces`)",
    description="Agent traces: episodes, frames, requests, replies and timings in SQLite.",
    subcommands=[
        Command(
            "export",
            help="export SFT JSONL (OpenAI-style messages, images as data URLs) with a train/val split",
            description="One sample per answered text_action / structured_action request: its messages "
            "plus the answer as the assistant turn. Episodes go wholly to train or to val. Traces without "
            "such a request (action_chunk runs) or filters that leave no sample are an error (exit 1).",
            add_args=add_export_args,
            run=run_export,
        )
    ],
)
