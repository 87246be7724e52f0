"""ALFWorld games built locally from what the `alfworld` wheel ships.

A game is what `alfworld-generate` writes next to an ALFRED trajectory: a folder holding
`traj_data.json` (the task type and its targets) and `game.tw-pddl` (JSON: ALFWorld's PDDL
domain and text grammar, a PDDL problem, `solvable` and a `walkthrough`). ALFWorld's
problems come from ALFRED scenes recorded in AI2-THOR; here the scene is sampled from the
wheel's own floor-plan data instead: the receptacles of a real floor plan with their ids
and poses (`alfworld/gen/layouts/FloorPlanN-openable.json`, plus one instance of each
receptacle type the plan lists without one), the object types the plan contains
(`-objects.json`), placed where ALFWorld's constants say they can go. The goal is
ALFWorld's own PDDL goal for the task type (`alfworld.gen.goal_library`) and the task text
one of its templates. The expert plan is written from the sampled scene and kept only
after it wins the game in TextWorld's PDDL engine under ALFWorld's wrappers, and the game
must not be won before it is played. These are not the ALFRED scenes nor its splits.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# ALFWorld's six text task types, in the order of its TASK_TYPES table.
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# The floor plans a task type is sampled from unless told otherwise: a few kitchens,
# living rooms, bedrooms and bathrooms (ALFRED's room kinds per task type).
DEFAULT_FLOOR_PLANS = (1, 2, 5, 12, 201, 203, 301, 302, 401, 402)
GENERATOR = "vlmq alfworld-make"
SPLIT = "generated"  # the folder under json_2.1.1/ the games go to by default
# Receptacle types ALFRED scenes hold several of, where a plan's layout lists none.
_EXTRA_COUNTS = {"StoveBurner": 4}
# A target never starts in its own goal receptacle type, nor in the appliance its task uses.
_APPLIANCE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
_LAMP_HOLDERS = ("Desk", "SideTable", "Dresser", "Shelf")


def _mangle(name: str) -> str:
    """ALFRED ids -> PDDL symbols, as ALFRED's planner writes them."""
    for a, b in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(a, b)
    return name


def _coord(v: float) -> str:
    return f"{v:+06.2f}" if v else "00.00"


@dataclass
class Receptacle:
    rid: str  # ALFRED id, e.g. Cabinet|+00.68|+00.50|-02.20
    rtype: str
    loc: str

    @property
    def openable(self) -> bool:
        return self.rtype in _consts().OPENABLE_CLASS_SET


@dataclass
class Thing:
    oid: str
    otype: str
    where: Receptacle


@dataclass
class Scene:
    floor_plan: int
    receptacles: List[Receptacle]
    agent_loc: str
    things: List[Thing] = field(default_factory=list)


@dataclass
class Task:
    task_type: str
    obj: str
    recep: str = ""  # goal receptacle type ("" for look_at_obj_in_light)
    toggle: str = ""  # lamp type for look_at_obj_in_light

    @property
    def folder(self) -> str:
        """ALFRED's task folder name, less the scene number: type-object-mrecep-parent (or lamp)."""
        return f"{self.task_type}-{self.obj}-None-{self.recep or self.toggle}"


def _consts():
    try:
        import alfworld.gen.constants as constants
    except ImportError as exc:
        raise RuntimeError("ALFWorld is not installed: pip install 'vlmq[envs]'") from exc
    return constants


def _layouts_dir() -> str:
    return os.path.join(os.path.dirname(_consts().__file__), "layouts")


def room_kind(floor_plan: int) -> str:
    for kind, numbers in _consts().SCENE_TYPE.items():
        if floor_plan in numbers:
            return kind
    raise ValueError(f"FloorPlan{floor_plan} is not an ALFRED scene")


def _pickupable() -> set:
    c = _consts()
    inside = set().union(*c.VAL_RECEPTACLE_OBJECTS.values())
    return {t for t in inside if t in c.OBJECTS and not t.endswith("Sliced")}


def _load_plan(floor_plan: int) -> Tuple[List[str], Dict[str, List[float]], List[List[float]]]:
    base = os.path.join(_layouts_dir(), f"FloorPlan{floor_plan}")
    try:
        with open(base + "-objects.json") as f:
            types = json.load(f)
        with open(base + "-openable.json") as f:
            poses = json.load(f)
    except FileNotFoundError as exc:
        raise ValueError(f"no layout data for FloorPlan{floor_plan} in the alfworld wheel") from exc
    import numpy as np

    points = np.load(base + "-layout.npy").tolist()
    return types, poses, points


def _loc(x: float, z: float, rot: float, horizon: float) -> str:
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{round(rot / 90) % 4}|{round(horizon)}"


def build_scene(floor_plan: int, rng: random.Random) -> Scene:
    """The plan's receptacles (ids and poses from the layout data; every receptacle at a
    location of its own, so "go to" names one) and a free start location for the agent."""
    c = _consts()
    types, poses, points = _load_plan(floor_plan)
    used: set = set()
    receps: List[Receptacle] = []

    def free_loc() -> str:
        while True:
            x, z = rng.choice(points)
            loc = _loc(x, z, rng.randrange(4) * 90, 30)
            if loc not in used:
                return loc

    for rid, (x, z, rot, horizon) in sorted(poses.items()):
        parts = rid.split("|")
        rtype = parts[4] if len(parts) == 5 else parts[0]
        if len(parts) == 5 and rtype != parts[0] + "Basin":
            continue  # a layout quirk (a bathtub listed as a sink basin)
        if rtype not in c.VAL_RECEPTACLE_OBJECTS or rtype in c.MOVABLE_RECEPTACLES_SET:
            continue
        loc = _loc(x, z, rot, horizon)
        if loc in used:
            loc = free_loc()
        used.add(loc)
        receps.append(Receptacle(rid, rtype, loc))
    have = {r.rtype for r in receps}
    for rtype in types:
        if rtype in have or rtype not in c.VAL_RECEPTACLE_OBJECTS or rtype in c.MOVABLE_RECEPTACLES_SET:
            continue
        for _ in range(_EXTRA_COUNTS.get(rtype, 1)):
            x, z = rng.choice(points)
            rid = f"{rtype}|{_coord(x)}|{_coord(rng.uniform(0.0, 1.5))}|{_coord(z)}"
            loc = free_loc()
            used.add(loc)
            receps.append(Receptacle(rid, rtype, loc))
    agent = free_loc()
    return Scene(floor_plan, receps, agent)


def _holders(scene: Scene, otype: str, avoid: Sequence[str] = ()) -> List[Receptacle]:
    allowed = _consts().VAL_RECEPTACLE_OBJECTS
    return [r for r in scene.receptacles if otype in allowed[r.rtype] and r.rtype not in avoid]


def _candidates(task_type: str, scene: Scene, present: List[str]) -> List[Task]:
    """Every (object, receptacle or lamp) target the task type can have in this scene."""
    c = _consts()
    rtypes = sorted({r.rtype for r in scene.receptacles})
    out: List[Task] = []
    if task_type == "look_at_obj_in_light":
        types, _, _ = _load_plan(scene.floor_plan)
        if "DeskLamp" not in types or not any(r.rtype in _LAMP_HOLDERS for r in scene.receptacles):
            return []
        return [Task(task_type, o, toggle="DeskLamp") for o in present if _holders(scene, o)]
    appliance, ability = _APPLIANCE.get(task_type, ("", ""))
    if appliance and appliance not in rtypes:
        return []
    for o in present:
        if ability and o not in c.VAL_ACTION_OBJECTS[ability]:
            continue
        for rt in rtypes:
            if rt == appliance or o not in c.VAL_RECEPTACLE_OBJECTS[rt]:
                continue
            if _holders(scene, o, avoid=(rt, appliance)):
                out.append(Task(task_type, o, recep=rt))
    return out


def _place(scene: Scene, task: Task, rng: random.Random, distractors: int) -> None:
    """The target(s) away from their goal receptacle and appliance, the lamp on a table or
    shelf, and up to `distractors` other object types of the plan, one or two of each."""
    types, _, _ = _load_plan(scene.floor_plan)
    present = sorted(t for t in set(types) & _pickupable() if t != task.obj)
    counts = {"pick_two_obj_and_place": rng.randint(2, 3)}
    appliance = _APPLIANCE.get(task.task_type, ("", ""))[0]
    avoid = (task.recep, appliance) if task.recep else ()
    n = 0

    def put(otype: str, where: Receptacle) -> None:
        nonlocal n
        n += 1
        x, y, z = rng.uniform(-3, 3), rng.uniform(0, 2), rng.uniform(-3, 3)
        scene.things.append(Thing(f"{otype}|{_coord(x)}|{_coord(y)}|{_coord(z)}", otype, where))

    for _ in range(counts.get(task.task_type, rng.randint(1, 2))):
        put(task.obj, rng.choice(_holders(scene, task.obj, avoid)))
    if task.toggle:
        lamp_holders = [r for r in scene.receptacles if r.rtype in _LAMP_HOLDERS]
        put(task.toggle, rng.choice(lamp_holders))
    for otype in rng.sample(present, min(distractors, len(present))):
        holders = _holders(scene, otype)
        for _ in range(rng.randint(1, 2) if holders else 0):
            put(otype, rng.choice(holders))


def expert_plan(scene: Scene, task: Task) -> List[Tuple[str, ...]]:
    """The plan as (action, ALFRED ids...) steps: fetch the target(s), use the appliance
    or the lamp, put it (them) down. Entity names come later, from the game itself."""
    by_type: Dict[str, List[Receptacle]] = {}
    for r in scene.receptacles:
        by_type.setdefault(r.rtype, []).append(r)
    targets = [t for t in scene.things if t.otype == task.obj]
    steps: List[Tuple[str, ...]] = []
    at: Optional[str] = None
    opened: set = set()

    def go(r: Receptacle) -> None:
        nonlocal at
        if at != r.rid:
            steps.append(("go", r.rid))
            at = r.rid
        if r.openable and r.rid not in opened:
            steps.append(("open", r.rid))
            opened.add(r.rid)

    def fetch(t: Thing) -> None:
        go(t.where)
        steps.append(("take", t.oid, t.where.rid))

    if task.task_type == "look_at_obj_in_light":
        lamp = next(t for t in scene.things if t.otype == task.toggle)
        fetch(targets[0])
        go(lamp.where)
        steps.append(("use", lamp.oid))
        return steps
    goal = by_type[task.recep][0]
    appliance = _APPLIANCE.get(task.task_type, ("", ""))[0]
    for t in targets[: 2 if task.task_type == "pick_two_obj_and_place" else 1]:
        fetch(t)
        if appliance:
            app = by_type[appliance][0]
            verb = {"SinkBasin": "clean", "Microwave": "heat", "Fridge": "cool"}[appliance]
            if at != app.rid:
                steps.append(("go", app.rid))
                at = app.rid
            steps.append((verb, t.oid, app.rid))
        go(goal)
        steps.append(("move", t.oid, goal.rid))
    return steps


def problem_pddl(scene: Scene, task: Task, name: str) -> str:
    """The PDDL problem in the form of ALFWorld's initial_state.pddl files."""
    import alfworld.gen.goal_library as glib

    c = _consts()
    rtypes = sorted(set(c.RECEPTACLES) - c.MOVABLE_RECEPTACLES_SET)
    otypes = sorted(c.OBJECTS_SET - set(rtypes))
    m = _mangle
    lines = [f"(define (problem {m(name)})", "(:domain alfred)", "(:objects", "        agent1 - agent"]
    lines += [f"        {t}Type - otype" for t in otypes]
    lines += [f"        {t}Type - rtype" for t in rtypes]
    lines += [f"        {m(t.oid)} - object" for t in scene.things]
    lines += [f"        {m(r.rid)} - receptacle" for r in scene.receptacles]
    locs = sorted({r.loc for r in scene.receptacles} | {scene.agent_loc})
    lines += [f"        {m(loc)} - location" for loc in locs]
    lines += ["    )", "(:init"]
    facts: List[str] = [f"(atLocation agent1 {m(scene.agent_loc)})"]
    for r in scene.receptacles:
        facts.append(f"(receptacleType {m(r.rid)} {r.rtype}Type)")
        facts.append(f"(receptacleAtLocation {m(r.rid)} {m(r.loc)})")
        if r.openable:
            facts.append(f"(openable {m(r.rid)})")
    present_o = sorted({t.otype for t in scene.things})
    for rt in sorted({r.rtype for r in scene.receptacles}):
        facts += [f"(canContain {rt}Type {ot}Type)" for ot in present_o if ot in c.VAL_RECEPTACLE_OBJECTS[rt]]
    pickupable = _pickupable()
    abilities = {"cleanable": "Cleanable", "heatable": "Heatable", "coolable": "Coolable",
                 "sliceable": "Sliceable", "toggleable": "Toggleable"}  # fmt: skip
    for t in scene.things:
        o = m(t.oid)
        facts.append(f"(objectType {o} {t.otype}Type)")
        facts.append(f"(inReceptacle {o} {m(t.where.rid)})")
        facts.append(f"(objectAtLocation {o} {m(t.where.loc)})")
        if t.otype in pickupable:
            facts.append(f"(pickupable {o})")
        if t.otype in c.MOVABLE_RECEPTACLES_SET:
            facts.append(f"(isReceptacleObject {o})")
        facts += [f"({pred} {o})" for pred, key in abilities.items() if t.otype in c.VAL_ACTION_OBJECTS[key]]
    lines += [f"        {f}" for f in facts]
    lines.append("    )")
    goal = glib.gdict[task.task_type]["pddl"].format(
        obj=task.obj, recep=task.recep, toggle=task.toggle, mrecep=""
    )
    lines.append(goal.replace("#", "-"))  # ALFWorld's goal text closes the define too
    return "\n".join(lines) + "\n"


def task_text(task: Task, rng: random.Random) -> str:
    import alfworld.gen.goal_library as glib

    template = rng.choice(glib.gdict[task.task_type]["templates"])
    return template.format(
        obj=task.obj.lower(), recep=task.recep.lower(), toggle=task.toggle.lower(), mrecep=""
    )


def _logic() -> Tuple[str, str]:
    base = os.path.join(os.path.dirname(os.path.dirname(_consts().__file__)), "data")
    with open(os.path.join(base, "alfred.pddl")) as f:
        domain = f.read()
    with open(os.path.join(base, "alfred.twl2")) as f:
        grammar = f.read()
    return domain, grammar


def _command(step: Tuple[str, ...], names: Dict[str, str]) -> str:
    verb, *ids = step
    n = [names[_mangle(i).lower()] for i in ids]
    return {
        "go": lambda: f"go to {n[0]}",
        "open": lambda: f"open {n[0]}",
        "take": lambda: f"take {n[0]} from {n[1]}",
        "move": lambda: f"move {n[0]} to {n[1]}",
        "use": lambda: f"use {n[0]}",
        "clean": lambda: f"clean {n[0]} with {n[1]}",
        "heat": lambda: f"heat {n[0]} with {n[1]}",
        "cool": lambda: f"cool {n[0]} with {n[1]}",
    }[verb]()


def solve(gamedata: Dict[str, Any], plan: List[Tuple[str, ...]]) -> List[str]:
    """Play the plan in TextWorld's PDDL engine under ALFWorld's wrappers (as
    alfworld-generate checks a game); returns the commands, or raises if the game is won
    before the end, a command is not admissible, or the plan does not win."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs import PddlEnv

    env = AlfredDemangler(PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True)), shuffle=False)
    env.load(gamedata)
    state = env.reset()
    names = {k: info.name for k, info in state["_entity_infos"].items()}
    commands: List[str] = []
    for i, step in enumerate(plan):
        if state["won"]:
            raise ValueError(f"won before step {i}: {commands}")
        cmd = _command(step, names)
        if cmd not in state["admissible_commands"]:
            raise ValueError(f"step {i} {cmd!r} is not admissible: {state['admissible_commands']}")
        commands.append(cmd)
        state, _, _ = env.step(cmd)
    if not state["won"]:
        raise ValueError(f"the plan does not win: {commands}")
    env.close()
    return commands


@dataclass(frozen=True)
class MadeGame:
    path: str  # the game.tw-pddl
    task_type: str
    floor_plan: int
    walkthrough: Tuple[str, ...]


def make_game(
    directory: str,
    index: int,
    seed: int = 0,
    task_type: Optional[str] = None,
    floor_plans: Sequence[int] = DEFAULT_FLOOR_PLANS,
    distractors: int = 8,
    attempts: int = 20,
) -> MadeGame:
    """Generate game `index` of `seed` into DIRECTORY/<task folder>/trial_vlmq_s<seed>_<index>/."""
    task_type = task_type or TASK_TYPES[index % len(TASK_TYPES)]
    if task_type not in TASK_TYPES:
        raise ValueError(f"task type must be one of {TASK_TYPES}, got {task_type!r}")
    rng = random.Random(f"{seed}/{index}/{task_type}")
    valid = _consts().GOALS_VALID[task_type]
    plans = [fp for fp in floor_plans if room_kind(fp) in valid]
    if not plans:
        raise ValueError(
            f"none of the floor plans {list(floor_plans)} suits {task_type} (rooms: {sorted(valid)})"
        )
    domain, grammar = _logic()
    last_error = ""
    for _ in range(attempts):
        scene = build_scene(rng.choice(plans), rng)
        types, _, _ = _load_plan(scene.floor_plan)
        present = sorted(set(types) & _pickupable())
        tasks = _candidates(task_type, scene, present)
        if not tasks:
            last_error = f"FloorPlan{scene.floor_plan} has no {task_type} target"
            continue
        task = rng.choice(tasks)
        _place(scene, task, rng, distractors)
        trial = f"trial_vlmq_s{seed}_{index:05d}"
        desc = task_text(task, rng)
        gamedata = {
            "pddl_domain": domain,
            "grammar": grammar.replace("UNKNOWN GOAL", desc),
            "pddl_problem": problem_pddl(scene, task, trial),
            "solvable": False,
            "walkthrough": None,
        }
        try:
            walkthrough = solve(gamedata, expert_plan(scene, task))
        except ValueError as exc:
            last_error = str(exc)
            continue
        gamedata["solvable"], gamedata["walkthrough"] = True, walkthrough
        traj = {
            "task_id": trial,
            "task_type": task_type,
            "pddl_params": {
                "object_target": task.obj,
                "parent_target": task.recep,
                "toggle_target": task.toggle,
                "mrecep_target": "",
                "object_sliced": False,
            },
            "scene": {"floor_plan": f"FloorPlan{scene.floor_plan}", "scene_num": scene.floor_plan},
            "turk_annotations": {"anns": [{"task_desc": desc[0].upper() + desc[1:] + ".", "high_descs": []}]},
            "vlmq": {"generator": GENERATOR, "seed": seed, "index": index, "expert_plan": walkthrough},
        }
        folder = os.path.join(directory, f"{task.folder}-{scene.floor_plan}", trial)
        _write_folder(folder, {"game.tw-pddl": gamedata, "traj_data.json": traj})
        return MadeGame(os.path.join(folder, "game.tw-pddl"), task_type, scene.floor_plan, tuple(walkthrough))
    raise RuntimeError(f"could not make a {task_type} game in {attempts} attempts: {last_error}")


def _write_folder(folder: str, files: Dict[str, Any]) -> None:
    """Write into a private folder, then rename: readers never see half a game."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, data in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(data, f, indent=1 if name == "traj_data.json" else None)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def generated_by_us(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "traj_data.json")) as f:
            return json.load(f).get("vlmq", {}).get("generator") == GENERATOR
    except (OSError, ValueError):
        return False


def make_games(
    directory: str,
    count: int,
    seed: int = 0,
    task_types: Sequence[str] = TASK_TYPES,
    floor_plans: Sequence[int] = DEFAULT_FLOOR_PLANS,
    distractors: int = 8,
) -> List[MadeGame]:
    """`count` games, the task types taken in turn."""
    types = list(task_types)
    return [
        make_game(directory, i, seed, types[i % len(types)], floor_plans, distractors) for i in range(count)
    ]
