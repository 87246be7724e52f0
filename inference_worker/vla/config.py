"""The VLA's hyperparameters: one dataclass, saved as config.json in the VLA folder.

Defaults mirror QwenVLA's RTX 3090 plan: 3 frames t-4, t-2, t; chunks of 50;
an 8-layer x 512 expert; 10 Euler steps; 384-px frames; the VLM's middle layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from schemas.actions import ACTION_DIM, channel_names

CONFIG_FILE = "config.json"
EXPERT_FILE = "expert.safetensors"
FORMAT = "vlmq-vla/1"


@dataclass
class VLAConfig:
    vlm_path: str = ""  # the frozen VLM's folder; relative paths are relative to the VLA folder
    vlm_layer: Optional[int] = None  # features after this many decoder layers; None: the middle
    vlm_hidden: int = 0  # filled in from the VLM when the expert is built
    image_size: int = 384  # frames are resized to image_size x image_size before the processor
    num_frames: int = 3
    frame_skip: int = 2  # frames t, t-2, t-4
    chunk_size: int = 50
    action_dim: int = ACTION_DIM
    action_channels: List[str] = field(default_factory=channel_names)
    state_dim: int = 0  # 0: no proprioceptive state input
    expert_layers: int = 8
    expert_dim: int = 512
    expert_heads: int = 8
    mlp_ratio: float = 4.0
    num_steps: int = 10  # Euler steps when sampling
    time_beta: Tuple[float, float] = (1.5, 1.0)  # training timesteps ~ Beta(a, b), noise side heavier
    rtc_max_guidance: float = 5.0  # real-time chunking: the clip on the guidance weight (beta)

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.frame_skip < 1:
            raise ValueError("num_frames and frame_skip must be >= 1")
        if self.expert_dim % self.expert_heads:
            raise ValueError(
                f"expert_dim {self.expert_dim} is not divisible by expert_heads {self.expert_heads}"
            )
        if self.chunk_size < 1 or self.action_dim < 1 or self.num_steps < 1:
            raise ValueError("chunk_size, action_dim and num_steps must be >= 1")
        self.time_beta = tuple(self.time_beta)  # type: ignore[assignment]

    def frame_offsets(self) -> List[int]:
        """Step offsets of the context frames, oldest first: [-4, -2, 0] by default."""
        return [-(self.num_frames - 1 - i) * self.frame_skip for i in range(self.num_frames)]

    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> VLAConfig:
        data = dict(data)
        fmt = data.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"VLA config format {fmt!r} is not {FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VLA config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, folder: str) -> VLAConfig:
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder!r} is not a VLA folder (no {CONFIG_FILE})")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def resolve_vlm_path(self, folder: str) -> str:
        if not self.vlm_path:
            raise ValueError(f"{folder}: the VLA config names no vlm_path")
        return (
            self.vlm_path
            if os.path.isabs(self.vlm_path)
            else os.path.normpath(os.path.join(folder, self.vlm_path))
        )


# A small expert for tests and CPU demos (same structure, 2 layers x 64).
TINY: Dict[str, Any] = {"image_size": 112, "expert_layers": 2, "expert_dim": 64, "expert_heads": 4}
