"""TextWorld games, generated locally (no download), played with admissible commands.

Games are made with TextWorld's own generator (what `tw-make custom` runs, 2-4 s each)
and cached by their parameters under VLMQ_TEXTWORLD_DIR (~/.cache/vlmq/textworld), so a
fleet of sessions shares a few files. TextWorld's gym wrapper returns the old four-tuple;
the adapter turns it into Gymnasium's five.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np

from env_agents.envs.base import EnvAdapter, Observation, StepResult
from env_agents.envs.prompts import choice_messages
from schemas.messages import Reply, Request, TextActionRequest

_MAKE_LOCK = threading.Lock()


def cache_dir() -> str:
    return os.environ.get("VLMQ_TEXTWORLD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "vlmq", "textworld"
    )


@dataclass(frozen=True)
class GameSpec:
    seed: int = 0
    rooms: int = 2
    objects: int = 3
    quest_length: int = 2

    def filename(self) -> str:
        return f"tw-s{self.seed}-r{self.rooms}-o{self.objects}-q{self.quest_length}.z8"


def make_game(spec: GameSpec, directory: Optional[str] = None) -> str:
    """Generate (or reuse) the game of `spec`; returns its .z8 path."""
    directory = directory or cache_dir()
    path = os.path.join(directory, spec.filename())
    if os.path.exists(path):
        return path
    try:
        from textworld import GameOptions
        from textworld.generator import compile_game
        from textworld.generator import make_game as tw_make_game
    except ImportError as exc:
        raise RuntimeError("TextWorld is not installed: pip install 'vlmq[envs]'") from exc
    os.makedirs(directory, exist_ok=True)
    opts = GameOptions()
    opts.seeds = spec.seed
    opts.nb_rooms, opts.nb_objects, opts.quest_length = spec.rooms, spec.objects, spec.quest_length
    # Compile to a private name, then rename: concurrent sessions never see half a file.
    tmp = os.path.join(directory, f".{os.getpid()}-{threading.get_ident()}-{spec.filename()}")
    opts.path, opts.force_recompile = tmp, True
    with _MAKE_LOCK:
        compiled = compile_game(tw_make_game(opts), opts)
        for ext in (".z8", ".json", ".ni"):
            src = os.path.splitext(compiled)[0] + ext
            if os.path.exists(src):
                os.replace(src, os.path.splitext(path)[0] + ext)
    return path


def play(game_files: Sequence[str], max_episode_steps: int, wrappers: Sequence[Any] = ()):
    """A TextWorld gym env over these game files, asking for what the agent needs."""
    import textworld
    import textworld.gym

    infos = textworld.EnvInfos(
        admissible_commands=True, won=True, lost=True, objective=True, max_score=True, extras=["gamefile"]
    )
    env_id = textworld.gym.register_games(
        list(game_files), request_infos=infos, max_episode_steps=max_episode_steps, wrappers=list(wrappers)
    )
    return textworld.gym.make(env_id)


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) and x and not isinstance(x[0], str) else x


class TextWorldAdapter(EnvAdapter):
    """Text games: the observation text and admissible commands -> text_action choices."""

    kinds = ("text_action",)

    def __init__(
        self,
        env_id: str = "textworld",
        seed: int = 0,
        game: Optional[str] = None,
        games: int = 1,
        rooms: int = 2,
        objects: int = 3,
        quest_length: int = 2,
        max_episode_steps: int = 50,
        history: int = 4,
        **_: Any,
    ) -> None:
        self.env_id = env_id
        if game:
            files = [game]
        else:
            files = [
                make_game(GameSpec(seed + i, int(rooms), int(objects), int(quest_length)))
                for i in range(int(games))
            ]
        self.game_files = files
        self.env = play(files, int(max_episode_steps))
        self.history_len = int(history)
        self.history: List[str] = []
        self.commands: List[str] = []  # the admissible commands of the last observation

    def _observation(self, text: str, infos: dict, score: float = 0.0) -> Observation:
        commands = list(infos.get("admissible_commands") or [])
        self.commands = commands
        max_score = float(infos.get("max_score") or 1.0)
        return Observation(
            text=text.strip(),
            commands=commands,
            info={"objective": infos.get("objective", ""), "gamefile": infos.get("extra.gamefile", "")},
            progress=score / max_score if max_score else 0.0,
        )

    def reset(self, seed: Optional[int] = None) -> Observation:
        text, infos = self.env.reset()
        self.history = []
        self.objective = infos.get("objective", "")
        return self._observation(text, infos)

    def step(self, action: Any) -> StepResult:
        text, score, done, infos = self.env.step(str(action))
        self.history = [*self.history, f"> {action}\n{text.strip()[:300]}"][-self.history_len :]
        won, lost = bool(infos.get("won")), bool(infos.get("lost"))
        obs = self._observation(text, infos, float(score))
        # TextWorld's `done` folds the step limit in; won/lost tell a real ending from a cut.
        terminated = won or lost
        return StepResult(obs, float(score), terminated, bool(done) and not terminated, success=won)

    def request(self, kind: str, obs: Observation, **kw: Any) -> Request:
        if kind != "text_action":
            raise ValueError(f"text games serve text_action only, not {kind!r}")
        commands = obs.commands or ["look"]
        messages = choice_messages(obs, commands, self.history)
        if self.objective:
            messages[0]["content"] += f"\nYour task: {self.objective}"
        return TextActionRequest(messages=messages, admissible_commands=commands, **kw)

    def actions(self, kind: str, reply: Reply) -> Sequence[Any]:
        res = reply.result
        return [res.choice if res.choice is not None else res.text.strip()]

    def random_action(self, rng: np.random.Generator) -> Any:
        """One of the last observation's admissible commands, uniformly."""
        return self.commands[int(rng.integers(len(self.commands)))] if self.commands else "look"

    def close(self) -> None:
        self.env.close()
