"""Training samples from converted shards: frame triplets (t-4, t-2, t) and action chunks.

Frames before an episode's first are the first (padding at episode starts, as the
serving cache does); action rows past an episode's end repeat its last row and are
masked out of the loss (`action_mask`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ops.vla.convert import MANIFEST


@dataclass
class Episode:
    name: str
    frames: np.ndarray  # uint8 [N, H, W, 3]
    actions: np.ndarray  # float32 [N, A]
    instruction: str
    timestamp_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


def load_split(root: str, split: str) -> List[Episode]:
    with open(os.path.join(root, MANIFEST)) as f:
        manifest = json.load(f)
    episodes = []
    for rel in manifest["splits"].get(split, []):
        with np.load(os.path.join(root, rel), allow_pickle=False) as d:
            episodes.append(
                Episode(
                    name=os.path.splitext(os.path.basename(rel))[0],
                    frames=d["frames"],
                    actions=d["actions"].astype(np.float32),
                    instruction=str(d["instruction"]),
                    timestamp_ms=d["timestamp_ms"],
                )
            )
    return episodes


def frame_steps(t: int, num_frames: int, frame_skip: int) -> List[int]:
    """Frame indices of the context of step t, oldest first, clamped at 0."""
    return [max(0, t - (num_frames - 1 - i) * frame_skip) for i in range(num_frames)]


def action_chunk(actions: np.ndarray, t: int, chunk: int) -> Tuple[np.ndarray, np.ndarray]:
    idx = np.minimum(np.arange(t, t + chunk), len(actions) - 1)
    mask = np.arange(t, t + chunk) < len(actions)
    return actions[idx], mask


class MiniworldVLADataset(Dataset):
    """Every step of every episode of a split is a sample."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        num_frames: int = 3,
        frame_skip: int = 2,
        chunk_size: int = 50,
        episodes: Optional[List[Episode]] = None,
    ) -> None:
        self.episodes = episodes if episodes is not None else load_split(root, split)
        self.num_frames, self.frame_skip, self.chunk_size = num_frames, frame_skip, chunk_size
        self.index: List[Tuple[int, int]] = [
            (e, t) for e, ep in enumerate(self.episodes) for t in range(len(ep))
        ]

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, i: int) -> Tuple[int, int, List[int]]:
        """(episode, step, context frame indices) of sample i."""
        e, t = self.index[i]
        return e, t, frame_steps(t, self.num_frames, self.frame_skip)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        e, t, steps = self.locate(i)
        ep = self.episodes[e]
        chunk, mask = action_chunk(ep.actions, t, self.chunk_size)
        return {
            "images": torch.from_numpy(ep.frames[steps]).permute(0, 3, 1, 2),  # [F, 3, H, W] uint8
            "text_instruction": ep.instruction,
            "action_chunk": torch.from_numpy(chunk),
            "action_mask": torch.from_numpy(mask),
            "frame_idx": torch.tensor(steps),
            "timestamp_ms": torch.from_numpy(ep.timestamp_ms[steps]),
            "episode": e,
            "step": t,
        }
