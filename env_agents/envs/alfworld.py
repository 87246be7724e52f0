"""ALFWorld's text games, played through ALFWorld's own TextWorld wrappers.

A game is a folder with `game.tw-pddl` and `traj_data.json`, in ALFWorld's data layout
DATA/json_2.1.1/SPLIT/<task>/<trial>/. The splits train, valid_seen and valid_unseen are
ALFRED's, fetched by `alfworld-download` (internet access needed); the split `generated`
is what `vlmq envs alfworld-make` builds offline (env_agents/envs/alfworld_games.py).
Each reset loads the session's next game in TextWorld's PDDL engine with the wrappers
ALFWorld's AlfredTWEnv uses (entity names such as "apple 1", the game file in the infos).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, List, Optional, Sequence

from env_agents.envs.base import Observation
from env_agents.envs.textworld import TextWorldAdapter, play

SPLITS = ("train", "valid_seen", "valid_unseen", "generated")
HOW_TO = (
    "make games offline with `vlmq envs alfworld-make` (split=generated), or fetch ALFRED's with "
    "`pip install alfworld && alfworld-download` (internet access needed); DATA is data=... or "
    "ALFWORLD_DATA (default ~/.cache/alfworld)"
)
TASK_MARK = "Your task is to: "


def data_dir() -> str:
    return os.environ.get("ALFWORLD_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "alfworld")


def split_dir(root: Optional[str], split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"ALFWorld split must be one of {SPLITS}, got {split!r}")
    return os.path.join(root or data_dir(), "json_2.1.1", split)


def find_games(root: Optional[str] = None, split: str = "valid_seen", limit: int = 0) -> List[str]:
    """Game files (*.tw-pddl) of one split, sorted; raises a clear error when there are none."""
    pattern = os.path.join(split_dir(root, split), "**", "game.tw-pddl")
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"no ALFWorld games under {pattern}: {HOW_TO}")
    return files[:limit] if limit > 0 else files


def walkthrough(game_file: str) -> List[str]:
    """The expert plan a game file carries (alfworld-generate and alfworld-make write one)."""
    with open(game_file) as f:
        plan = json.load(f).get("walkthrough")
    if not plan:
        raise ValueError(f"{game_file} has no walkthrough")
    return list(plan)


class ALFWorldAdapter(TextWorldAdapter):
    """Plays the games of a split in sorted order, one per episode, cycling; sessions
    running the same options split the games between them (see `share`)."""

    def __init__(
        self,
        env_id: str = "alfworld",
        seed: int = 0,
        split: str = "valid_seen",
        games: int = 0,
        data: Optional[str] = None,
        game: Optional[str] = None,
        max_episode_steps: int = 50,
        history: int = 4,
        **_: Any,
    ) -> None:
        try:
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        except ImportError as exc:
            raise RuntimeError("ALFWorld is not installed: pip install 'vlmq[envs]'") from exc
        self.env_id = env_id
        self.game_files = [game] if game else find_games(data, split, int(games))
        self._wrappers = lambda: [AlfredDemangler(shuffle=False), AlfredInfos]
        self.max_episode_steps = int(max_episode_steps)
        self.history_len = int(history)
        self.history = []
        self.objective = ""
        self.env = None
        self.game_file = ""
        self._mine: Sequence[str] = self.game_files
        self._played = 0
        self.commands: List[str] = []

    def share(self, index: int, count: int) -> None:
        """Session `index` of `count` plays games index, index + count, ... of the list
        (with fewer games than sessions, game index mod the number of games)."""
        files = self.game_files
        self._mine = files[index::count] if len(files) >= count else [files[index % len(files)]]

    def reset(self, seed: Optional[int] = None) -> Observation:
        self.game_file = self._mine[self._played % len(self._mine)]
        self._played += 1
        if self.env is not None:
            self.env.close()
        self.env = play([self.game_file], self.max_episode_steps, self._wrappers())
        obs = super().reset(seed)
        # ALFWorld states the task in the intro only; later prompts repeat it from here.
        if TASK_MARK in obs.text:
            self.objective = obs.text.split(TASK_MARK, 1)[1].strip()
        return obs

    def expert_plan(self) -> List[str]:
        """The current game's walkthrough (call after reset)."""
        return walkthrough(self.game_file)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
