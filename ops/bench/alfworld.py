"""ALFWorld success rate: the served model beside a random-admissible-command policy and the scripted expert.

Each run makes --games ALFWorld games (`vlmq envs alfworld-make`, game set seed --seed + run,
the six task types in turn) and plays every game once with each policy, at most
--max-steps steps a game:

* served model: `vlmq agents --env alfworld --task text_action` sessions through Redis; the
  worker scores the admissible commands (summed log-probability) and plays the best;
* random: a command drawn uniformly from the admissible ones at every step (the baseline);
* expert: the game's walkthrough; its success rate must be 1.0 (the sanity check that the
  games are winnable and success is read from the game).

Records, merged into --out (benchmarks/results/agents.json: only these metric names are
replaced): alfworld_success_rate (served model, baseline = random),
alfworld_success_rate_random and alfworld_success_rate_expert, each the median over
--runs game sets.

--worker hf (default): a private redis-server and `vlmq worker --backend hf` on --model
(empty: the tiny random-weight Qwen2-VL built here) on --device. --worker external: the
workers serving --redis-url (the GPU machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import numpy as np

from broker.settings import BrokerSettings
from ops.bench.records import Record, machine_description, record

METRICS = ("alfworld_success_rate", "alfworld_success_rate_random", "alfworld_success_rate_expert")


def add_args(p) -> None:
    p.set_defaults(out="benchmarks/results/agents.json")
    p.add_argument("--games", type=int, default=24, help="games per run (%(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs, each on a game set of its own (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="game set of run r: seed + r (%(default)s)")
    p.add_argument("--max-steps", type=int, default=50, help="steps a game at most (%(default)s)")
    p.add_argument("--sessions", type=int, default=4, help="served-model agent sessions (%(default)s)")
    p.add_argument("--procs", type=int, default=1, help="agent processes (%(default)s)")
    p.add_argument("--data", default="", help="ALFWorld data folder for the games (empty: a temporary one)")
    p.add_argument(
        "--worker",
        choices=["hf", "external"],
        default="hf",
        help="hf: own Redis + `vlmq worker --backend hf`; external: --redis-url's workers",
    )
    p.add_argument("--model", default="", help="checkpoint (empty: build the tiny random-weight Qwen2-VL)")
    p.add_argument("--device", default="cpu", help="worker device for --worker hf (%(default)s)")
    p.add_argument("--redis-url", default="", help="Redis of the external workers")
    p.add_argument("--prefix", default="vlmq", help="key prefix of the external workers (%(default)s)")
    p.add_argument("--label", default="", help="what serves the requests, for the records (external)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (%(default)s)")


def _make_games(root: str, count: int, seed: int) -> List[str]:
    from env_agents.envs.alfworld import split_dir
    from env_agents.envs.alfworld_games import make_games

    return [g.path for g in make_games(split_dir(root, "generated"), count, seed)]


def _task_type(game_file: str) -> str:
    with open(os.path.join(os.path.dirname(game_file), "traj_data.json")) as f:
        return json.load(f)["task_type"]


def play_local(games: Sequence[str], policy: str, max_steps: int, seed: int) -> Dict[str, bool]:
    """Play each game once in this process with the expert's walkthrough or random commands."""
    from env_agents.envs.alfworld import ALFWorldAdapter

    rng = np.random.default_rng(seed)
    won: Dict[str, bool] = {}
    for game in games:
        adapter = ALFWorldAdapter(game=game, max_episode_steps=max_steps)
        try:
            adapter.reset()
            plan = iter(adapter.expert_plan()) if policy == "expert" else None
            result = None
            for _ in range(max_steps):
                action = next(plan, "look") if plan is not None else adapter.random_action(rng)
                result = adapter.step(action)
                if result.done:
                    break
            won[game] = bool(result and result.success)
        finally:
            adapter.close()
    return won


def play_served(games: Sequence[str], root: str, args, broker: BrokerSettings) -> Dict[str, bool]:
    """Every game once through the queue: sessions split the games, one episode each."""
    from env_agents.control.controller import ControlConfig
    from env_agents.runner.launcher import launch
    from env_agents.runner.spec import RunSpec

    sessions = args.sessions
    control = ControlConfig(
        kind="text_action", mode="sync", rate_hz=0.0, max_steps=args.max_steps,
        request_timeout_s=args.timeout, request_fields={"temperature": 0.0},
    )  # fmt: skip
    spec = RunSpec(
        "alfworld", control, broker, n=sessions, procs=min(args.procs, sessions),
        episodes=len(games) // sessions,
        env_options={"split": "generated", "data": root, "max_episode_steps": args.max_steps},
        session_prefix=f"bench-alfworld-{int(time.time())}",
    )  # fmt: skip
    result = launch(spec, progress=False)
    if result.failures:
        raise RuntimeError(f"{len(result.failures)} session(s) failed: {result.failures[0]['error']}")
    # Session i plays games i, i + n, ... in that order (ALFWorldAdapter.share).
    ordered = sorted(games)
    won: Dict[str, bool] = {}
    for ep in result.episodes:
        index = int(ep["session"].rsplit("-", 1)[1])
        won[ordered[index + sessions * ep["episode"]]] = bool(ep["success"])
    errors = sum(int(ep["errors"]) for ep in result.episodes)
    if errors:
        print(f"  served model: {errors} failed request(s)")
    return won


def _by_type(won: Dict[str, bool]) -> str:
    counts: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for game, ok in won.items():
        c = counts[_task_type(game)]
        c[0] += ok
        c[1] += 1
    return ", ".join(f"{t} {w}/{n}" for t, (w, n) in sorted(counts.items()))


def _start_worker(args, broker: BrokerSettings, model: str) -> subprocess.Popen:
    from ops.cli import argv

    cmd = argv(
        "worker", broker, "--backend", "hf", "--model", model, "--device", args.device,
        "--kinds", "text_action", "--max-batch", str(max(1, args.sessions)), log_level="WARNING",
    )  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def merge_results(path: str, records: List[Record]) -> None:
    """Replace this benchmark's metrics in `path`, keep every other record as it is."""
    mine = {r.metric for r in records}
    kept: List[dict] = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f) if r.get("metric") not in mine]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(kept + [asdict(r) for r in records], f, indent=2)
        f.write("\n")


def run(args) -> int:
    if args.games < 1 or args.runs < 1 or args.sessions < 1 or args.games % args.sessions:
        raise SystemExit("--games, --runs and --sessions must be >= 1, and --games a multiple of --sessions")
    # fast-downward's translator rebinds sys.argv on every game load; the records name this command.
    command = sys.argv
    # A terminated run still stops its worker and Redis (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = tempfile.TemporaryDirectory(prefix="vlmq-alfworld-")
    worker: Optional[subprocess.Popen] = None
    server = None
    try:
        if args.worker == "hf":
            from broker.embedded import EmbeddedRedis

            model = args.model
            if not model:
                from inference_worker.models.make import make_model

                model = make_model("qwen2-vl", os.path.join(tmp.name, "tiny"), preset="tiny")
            server = EmbeddedRedis().start()
            broker = BrokerSettings(url=server.url, prefix="bench")
            worker = _start_worker(args, broker, model)
            label = f"{'tiny random-weight Qwen2-VL' if not args.model else model} on {args.device} (vlmq worker --backend hf)"
        else:
            if not args.redis_url:
                raise SystemExit("--worker external needs --redis-url")
            broker = BrokerSettings(url=args.redis_url, prefix=args.prefix)
            label = args.label or "external workers"
        rates: Dict[str, List[float]] = defaultdict(list)
        for r in range(args.runs):
            root = os.path.join(args.data or tmp.name, f"set{args.seed + r}")
            games = _make_games(root, args.games, args.seed + r)
            print(f"run {r + 1}/{args.runs}: {len(games)} games (seed {args.seed + r}) in {root}", flush=True)
            for policy in ("expert", "random", "served"):
                started = time.perf_counter()
                if policy == "served":
                    won = play_served(games, root, args, broker)
                else:
                    won = play_local(games, policy, args.max_steps, seed=1000 + args.seed + r)
                rate = sum(won.values()) / len(games)
                rates[policy].append(rate)
                print(
                    f"  {policy:7s} {rate:.3f} ({_by_type(won)}) in {time.perf_counter() - started:.0f} s",
                    flush=True,
                )
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        if server is not None:
            server.stop()
        tmp.cleanup()
    sys.argv = command
    machine = (
        f"{label}; {args.games} generated ALFWorld games per run (vlmq envs alfworld-make, seeds "
        f"{args.seed}..{args.seed + args.runs - 1}, six task types in turn), {args.max_steps} steps a game, "
        f"{args.sessions} sessions; {machine_description()}"
    )
    records = [
        record(
            "alfworld_success_rate",
            rates["served"],
            "fraction of games",
            baseline=rates["random"],
            machine=machine,
        ),
        record("alfworld_success_rate_random", rates["random"], "fraction of games", machine=machine),
        record("alfworld_success_rate_expert", rates["expert"], "fraction of games", machine=machine),
    ]
    if min(rates["expert"]) < 1.0:
        print("warning: the expert lost a game: the games or the adapter are broken")
    merge_results(args.out, records)
    print(f"merged {', '.join(METRICS)} into {args.out}")
    return 0 if min(rates["expert"]) == 1.0 else 1
