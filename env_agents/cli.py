"""`vlmq agents`: run N agent sessions over P processes against the workers, then report.

vlmq agents --env MiniWorld-OneRoom-v0 --n 32 --procs 4 --task action_chunk
vlmq agents --env textworld --n 4 --task text_action --rate-hz 0 --mode sync
vlmq agents --env MiniWorld-OneRoom-v0 --task preference --pairs 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Dict

from broker.settings import add_broker_args, broker_settings_from_args, env
from env_agents.control.merge import MERGES
from schemas.messages import KINDS

log = logging.getLogger("vlmq.agents")


def _kv(pairs) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in pairs:
        if "=" not in item:
            raise SystemExit(f"--env-arg wants KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def add_agent_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    r = p.add_argument_group("run")
    r.add_argument(
        "--env",
        default=env("AGENTS_ENV", "MiniWorld-OneRoom-v0"),
        help="env id: MiniWorld-*-v0, textworld, alfworld, crafter [VLMQ_AGENTS_ENV] (%(default)s)",
    )
    r.add_argument(
        "--task",
        default=env("AGENTS_TASK", "action_chunk"),
        choices=KINDS,
        help="task kind each step asks for [VLMQ_AGENTS_TASK] (%(default)s)",
    )
    r.add_argument(
        "--n", type=int, default=env("AGENTS_N", 4), help="agent sessions [VLMQ_AGENTS_N] (%(default)s)"
    )
    r.add_argument(
        "--procs",
        type=int,
        default=env("AGENTS_PROCS", 1),
        help="processes the sessions are spread over, each one event loop [VLMQ_AGENTS_PROCS] (%(default)s)",
    )
    r.add_argument(
        "--episodes",
        type=int,
        default=env("AGENTS_EPISODES", 1),
        help="episodes per session [VLMQ_AGENTS_EPISODES] (%(default)s)",
    )
    r.add_argument(
        "--max-steps",
        type=int,
        default=env("AGENTS_MAX_STEPS", 500),
        help="env steps per episode at most [VLMQ_AGENTS_MAX_STEPS] (%(default)s)",
    )
    r.add_argument(
        "--seed",
        type=int,
        default=env("AGENTS_SEED", 0),
        help="session i, episode e uses seed + 1000 i + e [VLMQ_AGENTS_SEED] (%(default)s)",
    )
    r.add_argument(
        "--size",
        type=int,
        default=env("AGENTS_SIZE", 224),
        help="observation side in pixels for image envs [VLMQ_AGENTS_SIZE] (%(default)s)",
    )
    r.add_argument(
        "--env-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="adapter option, repeatable (textworld: game=PATH, games=N, rooms=N; alfworld: split=...)",
    )
    r.add_argument(
        "--session-prefix",
        default=env("AGENTS_SESSION_PREFIX", ""),
        help="session ids are PREFIX-i [VLMQ_AGENTS_SESSION_PREFIX] (agent-<time>)",
    )
    c = p.add_argument_group("control")
    c.add_argument(
        "--mode",
        default=env("AGENTS_MODE", "async"),
        choices=["async", "sync"],
        help="async: act from the queue while the next chunk is computed; sync: wait for "
        "every reply [VLMQ_AGENTS_MODE] (%(default)s)",
    )
    c.add_argument(
        "--rate-hz",
        type=float,
        default=env("AGENTS_RATE_HZ", -1.0),
        help="control rate; 0 = step as soon as an action is there [VLMQ_AGENTS_RATE_HZ] "
        "(30 for MiniWorld, 0 for the turn-based games)",
    )
    c.add_argument(
        "--threshold",
        "-g",
        type=float,
        default=env("AGENTS_THRESHOLD", 0.5),
        help="g: ask for the next chunk when the queue holds <= g x chunk actions "
        "[VLMQ_AGENTS_THRESHOLD] (%(default)s)",
    )
    c.add_argument(
        "--merge",
        default=env("AGENTS_MERGE", ""),
        choices=["", *MERGES],
        help="how overlapping actions merge [VLMQ_AGENTS_MERGE] (weighted_average for "
        "action_chunk, replace otherwise)",
    )
    c.add_argument(
        "--similarity",
        type=float,
        default=env("AGENTS_SIMILARITY", 0.0),
        help="skip frames closer than this to the last one sent (mean abs diff in [0,1]), "
        "never below the must-go queue level; 0 = off [VLMQ_AGENTS_SIMILARITY] (%(default)s)",
    )
    c.add_argument(
        "--rtc",
        action="store_true",
        default=env("AGENTS_RTC", False),
        help="send the queued actions as prev_chunk (real-time chunking) [VLMQ_AGENTS_RTC]",
    )
    c.add_argument(
        "--timeout",
        type=float,
        default=env("AGENTS_TIMEOUT", 30.0),
        help="seconds a request may take (also its deadline) [VLMQ_AGENTS_TIMEOUT] (%(default)s)",
    )
    c.add_argument(
        "--model",
        default=env("AGENTS_MODEL", ""),
        help="ask for this model by name (model-specific streams) [VLMQ_AGENTS_MODEL]",
    )
    c.add_argument(
        "--max-tokens",
        type=int,
        default=env("AGENTS_MAX_TOKENS", 0),
        help="max_tokens of chat requests; 0 = the kind's default [VLMQ_AGENTS_MAX_TOKENS]",
    )
    c.add_argument(
        "--temperature",
        type=float,
        default=env("AGENTS_TEMPERATURE", 0.0),
        help="sampling temperature of chat requests [VLMQ_AGENTS_TEMPERATURE] (%(default)s)",
    )
    f = p.add_argument_group("preference (--task preference)")
    f.add_argument(
        "--pairs",
        type=int,
        default=env("AGENTS_PAIRS", 16),
        help="frame pairs labelled per episode [VLMQ_AGENTS_PAIRS] (%(default)s)",
    )
    f.add_argument(
        "--pref-mode",
        default=env("AGENTS_PREF_MODE", "two_step"),
        choices=["two_step", "one_pass"],
        help="RL-VLM-F two-step (analysis, then label) or one pass [VLMQ_AGENTS_PREF_MODE] (%(default)s)",
    )
    f.add_argument(
        "--min-gap",
        type=float,
        default=env("AGENTS_MIN_GAP", 0.0),
        help="skip pairs whose ground-truth scores differ by less [VLMQ_AGENTS_MIN_GAP] (%(default)s)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--out",
        default=env("AGENTS_OUT", ""),
        help="results JSON [VLMQ_AGENTS_OUT] (runs/agents-<task>-<time>.json)",
    )
    o.add_argument(
        "--traces",
        default=env("AGENTS_TRACES", "") or None,
        help="record episodes to this SQLite file (then: vlmq traces export) [VLMQ_AGENTS_TRACES]",
    )
    o.add_argument(
        "--metrics-port",
        type=int,
        default=env("AGENTS_METRICS_PORT", 0),
        help="serve Prometheus /metrics of every agent process on this port, 0 = off; needs the `ops` extra "
        "[VLMQ_AGENTS_METRICS_PORT] (%(default)s)",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace):
    from env_agents.control.controller import ControlConfig
    from env_agents.runner.spec import PreferenceConfig, RunSpec

    fields: Dict[str, Any] = {}
    if args.model:
        fields["model"] = args.model
    if args.task != "action_chunk":
        if args.max_tokens:
            fields["max_tokens"] = args.max_tokens
        fields["temperature"] = args.temperature
    control = ControlConfig(
        kind=args.task,
        mode=args.mode,
        rate_hz=args.rate_hz if args.rate_hz >= 0 else (30.0 if args.env.startswith("MiniWorld-") else 0.0),
        threshold=args.threshold,
        merge=args.merge,
        similarity=args.similarity,
        max_steps=args.max_steps,
        request_timeout_s=args.timeout,
        rtc=args.rtc,
        request_fields=fields,
    )
    return RunSpec(
        env_id=args.env,
        control=control,
        broker=broker_settings_from_args(args),
        n=args.n,
        procs=max(1, min(args.procs, args.n)),
        episodes=args.episodes,
        seed=args.seed,
        size=args.size,
        env_options=_kv(args.env_arg),
        session_prefix=args.session_prefix or f"agent-{int(time.time())}",
        traces=args.traces,
        metrics=bool(args.metrics_port),
        preference=PreferenceConfig(pairs=args.pairs, mode=args.pref_mode, min_gap=args.min_gap),
    )


def print_summary(summary: Dict[str, Any], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for k, v in summary.items():
            print(f"  {k:24s} {v}")
        return
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, str(v))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    from env_agents.runner.launcher import launch

    spec = spec_from_args(args)
    metrics = None
    if spec.metrics:
        from ops.metrics.agents import prepare_multiprocess, start_agent_metrics

        prepare_multiprocess()  # before any agent process starts: they inherit the directory
        metrics = start_agent_metrics(args.metrics_port, multiprocess=True)
    out = args.out or os.path.join("runs", f"agents-{spec.task}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        result = launch(spec, progress=not args.no_progress)
    finally:
        if metrics is not None:
            metrics.close()
    summary = result.summary
    report: Dict[str, Any] = {
        "env": spec.env_id,
        "task": spec.task,
        "mode": spec.control.mode,
        "rate_hz": spec.control.rate_hz,
        "threshold": spec.control.g,
        "merge": spec.control.merge,
        "similarity": spec.control.similarity,
        "sessions": spec.n,
        "procs": spec.procs,
        "summary": summary,
        "episodes": [{k: v for k, v in e.items() if k != "latencies_ms"} for e in result.episodes],
        "failures": result.failures,
    }
    if spec.task == "preference":
        from env_agents.preference.report import plot_accuracy, write_csv

        stem = os.path.splitext(out)[0]
        csv_path, png_path = f"{stem}-vlm_query_log.csv", f"{stem}-accuracy.png"
        write_csv(csv_path, result.preference_rows)
        plotted = plot_accuracy(result.preference_rows, png_path, title=f"VLM accuracy on {spec.env_id}")
        report["preference"] = {
            "csv": csv_path,
            "plot": png_path,
            "accuracy": plotted["accuracy"],
            "pairs": plotted["n"],
        }
        summary["label_accuracy"] = round(plotted["accuracy"], 4)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
    print_summary(summary, f"vlmq agents: {spec.env_id}, {spec.task}, {spec.control.mode}")
    for fail in result.failures:
        log.error("%s failed: %s", fail["session"], fail["error"])
    print(f"results: {out}")
    if spec.task == "preference":
        print(f"labels: {report['preference']['csv']}  plot: {report['preference']['plot']}")
    return 1 if result.failures else 0


def register(sub) -> None:
    p = sub.add_parser(
        "agents",
        help="run N env agent sessions over P processes against the workers",
        description="Each session runs its own env and talks to the workers through Redis; each process "
        "runs many sessions on one event loop. Prints a summary and writes a JSON results file. "
        "docs/AGENTS.md explains the control loop (queue, threshold g, merges, similarity filter).",
        epilog="Every flag has an environment variable, shown in [brackets].",
    )
    add_agent_args(p)
    p.set_defaults(func=run)
