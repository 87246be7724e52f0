"""Per-stage wall-clock timings, in milliseconds: `with sw("prefill"): ...`."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Iterator


class Stopwatch:
    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0
