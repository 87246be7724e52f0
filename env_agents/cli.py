"""`vlmq agents`: run N agent sessions over P processes against the workers, then report.

vlmq agents --env MiniWorld-OneRoom-v0 --n 32 --procs 4 --task action_chunk
vlmq agents --env MiniWorld-OneRoom-v0 --n 32 --procs 4 --threshold adaptive
vlmq agents --env textworld --n 4 --task text_action --rate-hz 0 --mode sync
vlmq agents --env MiniWorld-OneRoom-v0 --task preference --pairs 32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import time
from typing import Any, Dict

from broker.commands import Command
from broker.settings import add_broker_args, broker_settings_from_args, env, flag
from env_agents.control.merge import MERGES
from env_agents.control.threshold import G_MAX, G_MIN, MARGIN, WINDOW
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


def default_session_prefix() -> str:
    """agent-<host>-<pid>-<time>: replicas started in the same second (`docker compose
    --scale agents=4`) still get distinct session ids, hence distinct reply streams."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"
    return f"agent-{host}-{os.getpid()}-{int(time.time())}"


def threshold_arg(value: str) -> Any:
    """--threshold: a number g >= 0, or "adaptive"."""
    if str(value).strip().lower() == "adaptive":
        return "adaptive"
    try:
        g = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number g >= 0 or 'adaptive', got {value!r}") from None
    if g < 0:
        raise argparse.ArgumentTypeError(f"g must be >= 0, got {value!r}")
    return g


def add_agent_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    r = p.add_argument_group("run")
    flag(
        r,
        "--env",
        var="AGENTS_ENV",
        default="MiniWorld-OneRoom-v0",
        help="env id: MiniWorld-*-v0, textworld, alfworld, crafter",
    )
    flag(
        r,
        "--task",
        var="AGENTS_TASK",
        default="action_chunk",
        choices=KINDS,
        help="task kind each step asks for",
    )
    flag(r, "--n", var="AGENTS_N", default=4, type=int, help="agent sessions")
    flag(
        r,
        "--procs",
        var="AGENTS_PROCS",
        default=1,
        type=int,
        help="processes the sessions are spread over, each one event loop",
    )
    flag(r, "--episodes", var="AGENTS_EPISODES", default=1, type=int, help="episodes per session")
    flag(
        r, "--max-steps", var="AGENTS_MAX_STEPS", default=500, type=int, help="env steps per episode at most"
    )
    flag(
        r,
        "--seed",
        var="AGENTS_SEED",
        default=0,
        type=int,
        help="session i, episode e uses seed + 1000 i + e",
    )
    flag(
        r,
        "--size",
        var="AGENTS_SIZE",
        default=224,
        type=int,
        help="observation side in pixels for image envs",
    )
    r.add_argument(
        "--env-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="adapter option, repeatable (textworld: game=PATH, games=N, rooms=N; alfworld: split=...; "
        "miniworld: render=cpu draws with Mesa on the CPU, off the GPU)",
    )
    flag(
        r,
        "--session-prefix",
        var="AGENTS_SESSION_PREFIX",
        default="",
        help="session ids are PREFIX-i; unique per run, also across containers started together",
        shown="agent-<host>-<pid>-<time>",
    )
    flag(
        r,
        "--tenant",
        var="TENANT",
        default="",
        help="publish to this tenant's own request streams (the session prefix must then start "
        "with '<tenant>.'; the workers serve it with --tenants)",
        shown=None,
    )
    c = p.add_argument_group("control")
    flag(
        c,
        "--mode",
        var="AGENTS_MODE",
        default="async",
        choices=["async", "sync"],
        help="async: act from the queue while the next chunk is computed; sync: wait for every reply",
    )
    flag(
        c,
        "--rate-hz",
        var="AGENTS_RATE_HZ",
        default=-1.0,
        type=float,
        help="control rate; 0 = step as soon as an action is there",
        shown="30 for MiniWorld, 0 for the turn-based games",
    )
    flag(
        c,
        "--threshold",
        "-g",
        var="AGENTS_THRESHOLD",
        default="0.5",
        type=threshold_arg,
        metavar="G|adaptive",
        help="g: ask for the next chunk when the queue holds <= g x chunk actions; 'adaptive': g from "
        "the p90 of the session's recent round trips, so the queue never runs dry (--g-min, --g-max, "
        "--g-margin)",
    )
    flag(c, "--g-min", var="AGENTS_G_MIN", default=G_MIN, type=float, help="adaptive g: lowest g")
    flag(
        c,
        "--g-max",
        var="AGENTS_G_MAX",
        default=G_MAX,
        type=float,
        help="adaptive g: highest g (between requests (1 - g) x chunk actions run: g bounds the requests)",
    )
    flag(
        c,
        "--g-margin",
        var="AGENTS_G_MARGIN",
        default=MARGIN,
        type=float,
        help="adaptive g: safety factor on the p90 latency",
    )
    flag(
        c,
        "--latency-window",
        var="AGENTS_LATENCY_WINDOW",
        default=WINDOW,
        type=int,
        help="adaptive g: round trips the p90 is taken over",
    )
    flag(
        c,
        "--merge",
        var="AGENTS_MERGE",
        default="",
        choices=["", *MERGES],
        help="how overlapping actions merge",
        shown="weighted_average for action_chunk, replace otherwise",
    )
    flag(
        c,
        "--similarity",
        var="AGENTS_SIMILARITY",
        default=0.0,
        type=float,
        help="skip frames closer than this to the last one sent (mean abs diff in [0,1]), never below the "
        "must-go queue level; 0 = off",
    )
    flag(
        c,
        "--rtc",
        var="AGENTS_RTC",
        default=False,
        action="store_true",
        help="send the queued actions as prev_chunk (real-time chunking)",
        shown=None,
    )
    flag(
        c,
        "--timeout",
        var="AGENTS_TIMEOUT",
        default=30.0,
        type=float,
        help="seconds a request may take (also its deadline)",
    )
    flag(
        c,
        "--model",
        var="AGENTS_MODEL",
        default="",
        help="ask for this model by name (model-specific streams)",
        shown=None,
    )
    flag(
        c,
        "--max-tokens",
        var="AGENTS_MAX_TOKENS",
        default=0,
        type=int,
        help="max_tokens of chat requests; 0 = the kind's default",
        shown=None,
    )
    flag(
        c,
        "--temperature",
        var="AGENTS_TEMPERATURE",
        default=0.0,
        type=float,
        help="sampling temperature of chat requests",
    )
    f = p.add_argument_group("preference (--task preference)")
    flag(f, "--pairs", var="AGENTS_PAIRS", default=16, type=int, help="frame pairs labelled per episode")
    flag(
        f,
        "--pref-mode",
        var="AGENTS_PREF_MODE",
        default="two_step",
        choices=["two_step", "one_pass"],
        help="RL-VLM-F two-step (analysis, then label) or one pass",
    )
    flag(
        f,
        "--min-gap",
        var="AGENTS_MIN_GAP",
        default=0.0,
        type=float,
        help="skip pairs whose ground-truth scores differ by less",
    )
    o = p.add_argument_group("output")
    flag(
        o, "--out", var="AGENTS_OUT", default="", help="results JSON", shown="runs/agents-<task>-<time>.json"
    )
    o.add_argument(
        "--traces",
        default=env("AGENTS_TRACES", "") or None,
        help="record episodes to this SQLite file (then: vlmq traces export) [VLMQ_AGENTS_TRACES]",
    )
    flag(
        o,
        "--metrics-port",
        var="AGENTS_METRICS_PORT",
        default=0,
        type=int,
        help="serve Prometheus /metrics of every agent process on this port, 0 = off; needs the `ops` extra",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def spec_from_args(args: argparse.Namespace):
    from env_agents.runner.spec import PreferenceConfig, RunSpec

    fields: Dict[str, Any] = {}
    if args.model:
        fields["model"] = args.model
    if args.task != "action_chunk":
        if args.max_tokens:
            fields["max_tokens"] = args.max_tokens
        fields["temperature"] = args.temperature
    adaptive = args.threshold == "adaptive"
    rate_hz = args.rate_hz if args.rate_hz >= 0 else (30.0 if args.env.startswith("MiniWorld-") else 0.0)
    try:
        control = _control(args, fields, adaptive, rate_hz)
    except ValueError as exc:
        raise SystemExit(f"vlmq agents: {exc}") from None
    return RunSpec(
        env_id=args.env,
        control=control,
        broker=broker_settings_from_args(args, tenant=args.tenant or None),
        n=args.n,
        procs=max(1, min(args.procs, args.n)),
        episodes=args.episodes,
        seed=args.seed,
        size=args.size,
        env_options=_kv(args.env_arg),
        session_prefix=args.session_prefix or default_session_prefix(),
        traces=args.traces,
        metrics=_metrics(args),
        preference=PreferenceConfig(pairs=args.pairs, mode=args.pref_mode, min_gap=args.min_gap),
    )


def _metrics(args: argparse.Namespace):
    if not args.metrics_port:
        return None
    if args.metrics_export is None:
        raise SystemExit("vlmq agents: --metrics-port needs the metrics of `vlmq` (ops.metrics)")
    return args.metrics_export(args.metrics_port)


def _control(args: argparse.Namespace, fields: Dict[str, Any], adaptive: bool, rate_hz: float):
    from env_agents.control.controller import ControlConfig

    return ControlConfig(
        kind=args.task,
        mode=args.mode,
        rate_hz=rate_hz,
        threshold=0.5 if adaptive else args.threshold,
        adaptive=adaptive,
        g_min=args.g_min,
        g_max=args.g_max,
        g_margin=args.g_margin,
        latency_window=args.latency_window,
        merge=args.merge,
        similarity=args.similarity,
        max_steps=args.max_steps,
        request_timeout_s=args.timeout,
        rtc=args.rtc,
        request_fields=fields,
    )


def adaptive_cost(summary: Dict[str, Any], episodes) -> Dict[str, Any]:
    """What the adaptive threshold asked for, against fixed g = 0.5 (the default): a fixed g
    asks once per (1 - g) x chunk actions once it acts, so the ratio of requests per step
    to 1 / (0.5 x chunk) is the requests it cost (> 1) or saved (< 1)."""
    from env_agents.control.stats import fixed_g_requests_per_step

    chunk = max((int(e.get("chunk_size", 0)) for e in episodes), default=0)
    if not chunk or not summary.get("steps"):
        return {}
    fixed = fixed_g_requests_per_step(0.5, chunk)
    return {"requests_vs_fixed_g_0.5": round(summary["requests_per_step"] / fixed, 4)}


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
    metrics = spec.metrics.start() if spec.metrics else None
    out = args.out or os.path.join("runs", f"agents-{spec.task}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        result = launch(spec, progress=not args.no_progress)
    finally:
        if metrics is not None:
            metrics.close()
    summary = result.summary
    if spec.control.adaptive and spec.control.mode == "async":
        summary.update(adaptive_cost(summary, result.episodes))
    report: Dict[str, Any] = {
        "env": spec.env_id,
        "task": spec.task,
        "mode": spec.control.mode,
        "rate_hz": spec.control.rate_hz,
        "threshold": spec.control.threshold_label,
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


COMMAND = Command(
    "agents",
    help="run N env agent sessions over P processes against the workers",
    description="Each session runs its own env and talks to the workers through Redis; each process "
    "runs many sessions on one event loop. Prints a summary and writes a JSON results file. "
    "docs/AGENTS.md explains the control loop (queue, threshold g, merges, similarity filter).",
    epilog="Every flag has an environment variable, shown in [brackets].",
    add_args=add_agent_args,
    run=run,
    # `vlmq` puts its metrics here (ops/metrics/plug.py): this package never imports ops.
    defaults={"metrics_export": None},
)
