"""ALFWorld (the text side), when its game files are present.

ALFWorld ships no games: `alfworld-download` fetches them into $ALFWORLD_DATA, and it
needs the internet. Without them ALFWorld's reset() spins forever instead of raising, so
this adapter looks for the files first and bounds the first reset with a timeout, and
says what to do in either case.
"""

from __future__ import annotations

import glob
import os
import threading
from typing import Any, Callable, List, Optional, TypeVar

from env_agents.envs.textworld import TextWorldAdapter, play

T = TypeVar("T")
SPLITS = ("train", "valid_seen", "valid_unseen")
HOW_TO = (
    "ALFWorld needs its game files: `pip install alfworld && alfworld-download` "
    "(internet access needed), then set ALFWORLD_DATA to the folder it filled "
    "(default ~/.cache/alfworld)"
)


def data_dir() -> str:
    return os.environ.get("ALFWORLD_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "alfworld")


def find_games(root: Optional[str] = None, split: str = "valid_seen", limit: int = 0) -> List[str]:
    """Game files (*.tw-pddl) of one split, sorted; raises a clear error when there are none."""
    if split not in SPLITS:
        raise ValueError(f"ALFWorld split must be one of {SPLITS}, got {split!r}")
    root = root or data_dir()
    pattern = os.path.join(root, "json_2.1.1", split, "**", "game.tw-pddl")
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"no ALFWorld games under {pattern}. {HOW_TO}")
    return files[:limit] if limit > 0 else files


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run fn in a daemon thread; raise TimeoutError if it has not returned in time (a hung
    call cannot be killed, but the caller is no longer stuck behind it)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    th = threading.Thread(target=target, daemon=True, name=f"vlmq-{what}")
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(f"{what} did not return within {timeout_s:.0f}s. {HOW_TO}")
    if "error" in box:
        raise box["error"]
    return box["value"]


class ALFWorldAdapter(TextWorldAdapter):
    def __init__(
        self,
        env_id: str = "alfworld",
        seed: int = 0,
        split: str = "valid_seen",
        games: int = 0,
        data: Optional[str] = None,
        max_episode_steps: int = 50,
        reset_timeout_s: float = 120.0,
        history: int = 4,
        **_: Any,
    ) -> None:
        files = find_games(data, split, int(games))
        try:
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        except ImportError as exc:
            raise RuntimeError(f"ALFWorld is not installed. {HOW_TO}") from exc
        self.env_id = env_id
        self.game_files = files
        self.env = play(files, int(max_episode_steps), [AlfredDemangler(shuffle=False), AlfredInfos])
        self.history_len = int(history)
        self.history = []
        self.reset_timeout_s = float(reset_timeout_s)
        self._seed = seed

    def reset(self, seed: Optional[int] = None):
        reset = super().reset
        return call_with_timeout(lambda: reset(seed), self.reset_timeout_s, "ALFWorld reset()")
