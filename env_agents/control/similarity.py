"""Observation-similarity filter: skip near-duplicate frames, but never starve the queue.

LeRobot's policy server drops observations too similar to the last one it ran; when the
robot stands still and its queue drains, nothing new is ever accepted and it starves
(the bug its users report). Here the decision is the client's, and a frame is skipped
only while the queue still holds more actions than will run before a reply to a request
sent now could arrive (`must_go`); at or below that, the observation always goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


def frame_distance(a: np.ndarray, b: np.ndarray, side: int = 32) -> float:
    """Mean absolute difference in [0, 1] of grey, strided-down frames (cheap: ~20 us)."""
    if a.shape != b.shape:
        return 1.0
    step = max(1, min(a.shape[0], a.shape[1]) // side)
    ga = a[::step, ::step].astype(np.float32).mean(axis=2)
    gb = b[::step, ::step].astype(np.float32).mean(axis=2)
    return float(np.abs(ga - gb).mean() / 255.0)


@dataclass
class Decision:
    send: bool
    reason: str
    distance: Optional[float] = None


class SimilarityFilter:
    def __init__(self, threshold: float, margin: float = 1.5) -> None:
        self.threshold = threshold  # 0 disables the filter
        self.margin = margin  # safety factor on the expected latency
        self.last_sent: Optional[np.ndarray] = None

    def reset(self) -> None:
        self.last_sent = None

    @staticmethod
    def must_go(latency_s: Optional[float], rate_hz: float, margin: float = 1.5) -> int:
        """Queue length at or below which an observation is always sent."""
        if latency_s is None or rate_hz <= 0:
            return 1 << 30  # no latency seen yet, or free-running: never skip
        return math.ceil(latency_s * rate_hz * margin) + 1

    def decide(
        self, frame: Optional[np.ndarray], queued: int, latency_s: Optional[float], rate_hz: float
    ) -> Decision:
        if self.threshold <= 0 or frame is None or self.last_sent is None:
            return Decision(True, "filter off" if self.threshold <= 0 else "first frame")
        floor = self.must_go(latency_s, rate_hz, self.margin)
        if queued <= floor:
            return Decision(True, f"must go: queue {queued} <= {floor} actions the reply takes")
        dist = frame_distance(frame, self.last_sent)
        if dist < self.threshold:
            return Decision(False, f"similar frame (distance {dist:.4f} < {self.threshold})", dist)
        return Decision(True, f"frame changed (distance {dist:.4f})", dist)

    def sent(self, frame: Optional[np.ndarray]) -> None:
        if frame is not None:
            self.last_sent = frame
