"""`vlmq envs`: make env data offline.

vlmq envs alfworld-make --games 24     # into $ALFWORLD_DATA/json_2.1.1/generated/
vlmq agents --env alfworld --task text_action --env-arg split=generated
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time
from typing import List

from broker.commands import Command
from broker.settings import flag


def _ints(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--floor-plans wants numbers separated by commas, got {text!r}") from None


def clear_generated(out: str) -> int:
    """Remove the games vlmq made under `out`; refuse when other games are there too."""
    from env_agents.envs.alfworld_games import generated_by_us

    folders = [os.path.dirname(p) for p in glob.glob(os.path.join(out, "**", "game.tw-pddl"), recursive=True)]
    foreign = [f for f in folders if not generated_by_us(f)]
    if foreign:
        raise SystemExit(
            f"{out} holds {len(foreign)} game(s) vlmq did not make (e.g. {foreign[0]}); pick another --data"
        )
    for folder in folders:
        shutil.rmtree(folder)
        parent = os.path.dirname(folder)
        if parent != out and not os.listdir(parent):
            os.rmdir(parent)
    return len(folders)


def run_alfworld_make(args: argparse.Namespace) -> int:
    from env_agents.envs.alfworld import split_dir
    from env_agents.envs.alfworld_games import TASK_TYPES, make_game

    types = [t.strip() for t in args.task_types.split(",") if t.strip()]
    unknown = sorted(set(types) - set(TASK_TYPES))
    if unknown or not types:
        raise SystemExit(f"--task-types: unknown {unknown}; choose from {', '.join(TASK_TYPES)}")
    if args.games < 1:
        raise SystemExit("--games must be >= 1")
    out = split_dir(args.data or None, "generated")
    existing = glob.glob(os.path.join(out, "**", "game.tw-pddl"), recursive=True)
    if existing and not args.overwrite:
        raise SystemExit(f"{out} already holds {len(existing)} game(s); pass --overwrite to replace vlmq's")
    if existing:
        print(f"removed {clear_generated(out)} game(s) from {out}")
    started = time.perf_counter()
    made = []
    for i in range(args.games):
        try:
            g = make_game(out, i, args.seed, types[i % len(types)], _ints(args.floor_plans), args.distractors)
        except (ValueError, RuntimeError) as exc:
            raise SystemExit(f"game {i}: {exc}") from None
        made.append({"game": g.path, "task_type": g.task_type, "floor_plan": g.floor_plan,
                     "expert_steps": len(g.walkthrough)})  # fmt: skip
        print(
            f"[{i + 1}/{args.games}] {g.task_type} FloorPlan{g.floor_plan}: {len(g.walkthrough)} expert steps"
        )
    manifest = os.path.join(out, "vlmq-games.json")
    with open(manifest, "w") as f:
        json.dump({"seed": args.seed, "games": made}, f, indent=1)
    print(f"{len(made)} games in {out} ({time.perf_counter() - started:.1f} s); list: {manifest}")
    data = f" --env-arg data={args.data}" if args.data else ""
    print(f"play them: vlmq agents --env alfworld --task text_action --env-arg split=generated{data}")
    return 0


def add_alfworld_make_args(p: argparse.ArgumentParser) -> None:
    from env_agents.envs.alfworld_games import DEFAULT_FLOOR_PLANS, TASK_TYPES

    flag(p, "--games", var="ALFWORLD_GAMES", default=24, type=int, help="games to make, task types in turn")
    flag(
        p, "--seed", var="ALFWORLD_SEED", default=0, type=int, help="game i of seed s is always the same game"
    )
    flag(
        p,
        "--data",
        var="ALFWORLD_MAKE_DATA",
        default="",
        help="ALFWorld data folder: the games go to DATA/json_2.1.1/generated/",
        shown="$ALFWORLD_DATA, else ~/.cache/alfworld",
    )
    flag(
        p,
        "--task-types",
        var="ALFWORLD_TASK_TYPES",
        default=",".join(TASK_TYPES),
        help="comma-separated ALFWorld task types",
        shown="all six",
    )
    flag(
        p,
        "--floor-plans",
        var="ALFWORLD_FLOOR_PLANS",
        default=",".join(map(str, DEFAULT_FLOOR_PLANS)),
        help="ALFRED floor plans to draw from (1-30 kitchens, 201-230 living rooms, 301-330 bedrooms, "
        "401-430 bathrooms); each task type uses the room kinds ALFRED allows it",
    )
    flag(p, "--distractors", var="ALFWORLD_DISTRACTORS", default=8, type=int,
         help="object types placed besides the task's")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the games vlmq made there before")


COMMAND = Command(
    "envs",
    help="make env data offline (ALFWorld games)",
    description="Env data that needs no download.",
    subcommands=[
        Command(
            "alfworld-make",
            help="write ALFWorld text games (game.tw-pddl + traj_data.json) from the alfworld wheel's "
            "floor plans",
            description="Each game: a real ALFRED floor plan's receptacles, objects of the types that plan "
            "holds placed where ALFWorld allows them, one of ALFWorld's six text task types with its own "
            "PDDL goal, and an expert walkthrough checked to win. ALFWorld's own TextWorld env "
            "(AlfredTWEnv) loads them unchanged. They are not ALFRED's scenes nor its train/valid splits.",
            epilog="Every flag has an environment variable, shown in [brackets].",
            add_args=add_alfworld_make_args,
            run=run_alfworld_make,
        )
    ],
)
