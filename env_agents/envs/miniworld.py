"""MiniWorld (3-D navigation), rendered headless, as a Gymnasium env and as an agent adapter.

pyglet must be told to run headless before miniworld is imported (EGL, no X server); that
is why every MiniWorld env in vlmq comes from `make_miniworld`. EGL draws with whatever
driver glvnd finds: the GPU's where there is one. `render="cpu"` points glvnd at Mesa's
vendor library instead (llvmpipe, one thread unless LP_NUM_THREADS says otherwise), so
simulators on the machine that serves the model leave its GPU to the model: sixteen
processes rendering on the serving H100 made its batches ~5x slower (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from env_agents.envs.base import EnvAdapter, Observation, StepResult
from env_agents.envs.prompts import choice_messages, structured_messages
from env_agents.recording.actions import vector_to_action
from schemas.actions import ACTION_DIM
from schemas.messages import (
    ActionChunkRequest,
    PreferenceRequest,
    Reply,
    Request,
    StructuredActionRequest,
    TextActionRequest,
)

log = logging.getLogger("vlmq.agents")

DEFAULT_ENV = "MiniWorld-OneRoom-v0"
# MiniWorld's own action ids (miniworld.miniworld.MiniWorldEnv.Actions).
TURN_LEFT, TURN_RIGHT, MOVE_FORWARD, MOVE_BACK, PICKUP, DROP, TOGGLE, DONE = range(8)
ACTION_NAMES = ("turn left", "turn right", "move forward", "move back", "pick up", "drop", "toggle", "done")


# glvnd's variable naming the EGL vendor libraries to load, and where Mesa installs its own
EGL_VENDORS = "__EGL_VENDOR_LIBRARY_FILENAMES"
MESA_EGL_VENDOR = "/usr/share/glvnd/egl_vendor.d/50_mesa.json"
RENDERS = ("auto", "cpu")


def choose_renderer(render: str) -> None:
    """auto: EGL's own choice; cpu: Mesa's llvmpipe. glvnd reads its vendor list once, when
    the process first loads EGL, so the choice must come before the first env."""
    if render not in RENDERS:
        raise ValueError(f"render={render!r}: use one of {', '.join(RENDERS)}")
    if render == "auto":
        return
    current = os.environ.get(EGL_VENDORS, "")
    if "mesa" in os.path.basename(current):
        return  # already Mesa (a vendor file of the user's own)
    if not os.path.exists(MESA_EGL_VENDOR):
        raise RuntimeError(
            f"render=cpu needs Mesa's EGL vendor library ({MESA_EGL_VENDOR}): "
            "apt-get install -y libegl-mesa0 libgl1-mesa-dri"
        )
    if "pyglet.libs.egl.egl" in sys.modules:
        raise RuntimeError("render=cpu must be chosen before this process's first MiniWorld env")
    os.environ[EGL_VENDORS] = MESA_EGL_VENDOR
    os.environ.setdefault("LP_NUM_THREADS", "1")  # an agent process per core: no extra threads


def _import_headless() -> None:
    try:
        import pyglet
    except ImportError as exc:  # pragma: no cover - the envs extra brings it
        raise RuntimeError("MiniWorld needs the envs extra: pip install 'vlmq[envs]'") from exc
    pyglet.options["headless"] = True
    try:
        import miniworld  # noqa: F401  (registers the MiniWorld-* ids with Gymnasium)
    except ImportError as exc:
        raise RuntimeError("MiniWorld is not installed: pip install 'vlmq[envs]'") from exc
    except Exception as exc:
        raise RuntimeError(
            f"MiniWorld could not start headless OpenGL ({exc}); install Mesa EGL: "
            "apt-get install -y libgl1 libegl1 libgl1-mesa-dri libglu1-mesa"
        ) from exc


def make_miniworld(
    env_id: str = DEFAULT_ENV, size: int = 224, seed: int = 0, render: str = "auto", **kwargs: Any
):
    """A headless MiniWorld Gymnasium env whose observations are uint8 (size, size, 3).

    The env is reset once with `seed`, so the episodes that follow (reset() without a
    seed) are reproducible too. `render` is auto or cpu (choose_renderer);
    `max_episode_steps` replaces the env's time limit; other kwargs go to the env
    constructor.
    """
    choose_renderer(render)
    _import_headless()
    import gymnasium as gym

    if not env_id.startswith("MiniWorld-"):
        raise ValueError(f"{env_id!r} is not a MiniWorld id (MiniWorld-*-v0)")
    # MiniWorld prints its GL multisampling fallback once per framebuffer: with dozens of
    # envs per process that floods the runner's output, so it goes to the debug log.
    # gym.make would take max_episode_steps for a TimeLimit wrapper of its own, leaving
    # MiniWorld's internal limit in force; the env's attribute is what really counts.
    limit = kwargs.pop("max_episode_steps", None)
    noise = io.StringIO()
    with contextlib.redirect_stdout(noise):
        env = gym.make(env_id, obs_width=size, obs_height=size, **kwargs)
        if limit is not None:
            env.unwrapped.max_episode_steps = int(limit)
        env.reset(seed=seed)
    if noise.getvalue().strip():
        log.debug("%s: %s", env_id, noise.getvalue().strip())
    return env


def goal_entity(env) -> Optional[Any]:
    """The entity the task is about (the box of OneRoom, Hallway, TMaze, ...), if any."""
    u = env.unwrapped
    for name in ("box", "goal"):
        ent = getattr(u, name, None)
        if ent is not None and hasattr(ent, "pos"):
            return ent
    return None


def goal_distance(env) -> Optional[float]:
    ent = goal_entity(env)
    if ent is None:
        return None
    a = np.asarray(env.unwrapped.agent.pos, np.float64)
    return float(np.linalg.norm(a[[0, 2]] - np.asarray(ent.pos, np.float64)[[0, 2]]))


def instruction_for(env) -> str:
    ent = goal_entity(env)
    if ent is None:
        return "explore the environment"
    color = getattr(ent, "color", "")
    kind = type(ent).__name__.lower()
    return f"go to the {color} {kind}".replace("  ", " ")


def action_from_minerl(action: Dict[str, Any], n_actions: int, camera_deadzone: float = 2.0) -> int:
    """A MineRL-style action dict -> one MiniWorld action.

    Camera yaw beyond the dead zone (degrees) turns; otherwise forward/back walk;
    attack/use pick up, drop drops. With nothing pressed the agent moves forward, as a
    MineRL agent idling would leave MiniWorld stuck.
    """
    camera = action.get("camera") or [0.0, 0.0]
    yaw = float(camera[1]) if len(camera) > 1 else 0.0
    wanted = MOVE_FORWARD
    if action.get("left") or yaw < -camera_deadzone:
        wanted = TURN_LEFT
    elif action.get("right") or yaw > camera_deadzone:
        wanted = TURN_RIGHT
    elif action.get("back"):
        wanted = MOVE_BACK
    elif action.get("forward"):
        wanted = MOVE_FORWARD
    elif action.get("attack") or action.get("use"):
        wanted = PICKUP
    elif action.get("drop"):
        wanted = DROP
    return wanted if wanted < n_actions else MOVE_FORWARD


class MiniWorldAdapter(EnvAdapter):
    """MiniWorld for every task kind: chunks, MineRL dicts, text choices and preferences."""

    kinds = ("action_chunk", "structured_action", "text_action", "preference")

    def __init__(self, env_id: str = DEFAULT_ENV, size: int = 224, seed: int = 0, **kwargs: Any) -> None:
        self.env_id = env_id
        self.env = make_miniworld(env_id, size=size, seed=seed, **kwargs)
        self.n_actions = int(self.env.action_space.n)
        self.action_names: List[str] = list(ACTION_NAMES[: self.n_actions])
        self.seed = seed

    def reset(self, seed: Optional[int] = None) -> Observation:
        frame, info = self.env.reset(seed=seed)
        self.instruction = instruction_for(self.env)
        return Observation(frame=frame, text=self.instruction, info=dict(info), progress=self.progress())

    def step(self, action: Any) -> StepResult:
        frame, reward, terminated, truncated, info = self.env.step(int(action))
        # MiniWorld ends an episode with a positive reward exactly when the goal is reached.
        success = bool(terminated and reward > 0)
        obs = Observation(frame=frame, text=self.instruction, info=dict(info), progress=self.progress())
        return StepResult(obs, float(reward), bool(terminated), bool(truncated), success)

    def progress(self) -> Optional[float]:
        d = goal_distance(self.env)
        return None if d is None else -d

    def request(self, kind: str, obs: Observation, **kw: Any) -> Request:
        if kind == "action_chunk":
            return ActionChunkRequest(image=obs.frame, instruction=self.instruction, **kw)
        if kind == "structured_action":
            return StructuredActionRequest(
                image=obs.frame, task_name=self.instruction, messages=structured_messages(obs), **kw
            )
        if kind == "text_action":
            return TextActionRequest(
                messages=choice_messages(obs, self.action_names),
                admissible_commands=self.action_names,
                **kw,
            )
        raise ValueError(f"{self.env_id} does not serve {kind!r} per step (preference uses frame pairs)")

    def preference_request(self, frame_a: np.ndarray, frame_b: np.ndarray, **kw: Any) -> PreferenceRequest:
        return PreferenceRequest(image_a=frame_a, image_b=frame_b, task=self.instruction, **kw)

    def actions(self, kind: str, reply: Reply) -> Sequence[Any]:
        res = reply.result
        if kind == "action_chunk":
            chunk = np.asarray(res.chunk, np.float32)
            if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM:
                raise ValueError(
                    f"action chunk of shape {chunk.shape}: MiniWorld rows have {ACTION_DIM} channels "
                    "(schemas/actions.py); serve a VLA of that layout"
                )
            return list(chunk)
        if kind == "structured_action":
            return [action_from_minerl(res.action, self.n_actions)]
        if kind == "text_action":
            return [self._choice_index(res)]
        raise ValueError(f"no env actions for kind {kind!r}")

    def _choice_index(self, res) -> int:
        if res.choice_index is not None and 0 <= res.choice_index < self.n_actions:
            return int(res.choice_index)
        text = (res.choice or res.text or "").strip().lower()
        for i, name in enumerate(self.action_names):
            if name in text:
                return i
        return MOVE_FORWARD

    def random_action(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.n_actions))

    def to_env_action(self, action: Any) -> int:
        if isinstance(action, np.ndarray):
            return vector_to_action(action, self.n_actions)
        return int(action)

    def close(self) -> None:
        self.env.close()
