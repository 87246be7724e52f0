"""When to ask for the next chunk: the threshold g, fixed or from the measured latency.

The controller asks when its queue holds <= g x chunk actions. A reply that takes L
seconds at a control rate of r Hz arrives after L x r more actions have run, so the queue
never runs dry while g x chunk >= L x r. A fixed g is right for one latency only; the
adaptive threshold sets

    g = (ceil(margin x p90(L) x r) + 1) / chunk,   clamped to [g_min, g_max]

from the session's recent round trips (a sliding window; the p90 so a slow batch now and
then does not starve it, the margin for what the window has not seen yet, the extra action
because a reply is merged at the tick after it arrives). Asking early costs requests:
between two requests the agent runs (1 - g) x chunk actions, so g = 0.75 asks twice as
often as g = 0.5 and g = 0.9 five times. That load feeds back into the latency every agent
of the worker measures: g_max bounds the loop (when no g covers the latency, more requests
only make the worker later), g_min keeps a fast worker from being asked only when the
queue is nearly empty.
"""

from __future__ import annotations

import collections
import math
from typing import Deque, Optional

# The defaults of `vlmq agents --threshold adaptive` (docs/AGENTS.md explains the choice).
G_MIN = 0.1
G_MAX = 0.75
MARGIN = 1.5
WINDOW = 32
QUANTILE = 0.9


class LatencyWindow:
    """The last `size` round trips of one session, and a quantile of them."""

    def __init__(self, size: int = WINDOW) -> None:
        if size < 1:
            raise ValueError("the latency window needs at least one sample")
        self._samples: Deque[float] = collections.deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, latency_s: float) -> None:
        self._samples.append(float(latency_s))

    def quantile(self, q: float = QUANTILE) -> Optional[float]:
        """The nearest-rank q-quantile (an observed value, never an interpolation), or None."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class FixedThreshold:
    """g as configured (0 for synchronous control)."""

    adaptive = False

    def __init__(self, g: float) -> None:
        self._g = g

    def observe(self, latency_s: float) -> None:
        pass

    def g(self, chunk_size: int) -> float:
        return self._g


class AdaptiveThreshold:
    """g from the p90 of the session's recent round trips (module docstring)."""

    adaptive = True

    def __init__(
        self,
        rate_hz: float,
        g_min: float = G_MIN,
        g_max: float = G_MAX,
        margin: float = MARGIN,
        window: int = WINDOW,
        quantile: float = QUANTILE,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError("an adaptive threshold needs a control rate (rate_hz > 0, --rate-hz)")
        if not 0.0 <= g_min <= g_max <= 1.0:
            raise ValueError(f"need 0 <= g_min <= g_max <= 1, got g_min={g_min}, g_max={g_max}")
        if margin < 1.0:
            raise ValueError(f"the latency margin must be >= 1, got {margin}")
        self.rate_hz = rate_hz
        self.g_min, self.g_max = g_min, g_max
        self.margin = margin
        self.q = quantile
        self.window = LatencyWindow(window)

    def observe(self, latency_s: float) -> None:
        self.window.add(latency_s)

    def actions_ahead(self) -> Optional[int]:
        """Actions that run before a reply to a request sent now is merged (with the margin)."""
        p = self.window.quantile(self.q)
        if p is None:
            return None
        return math.ceil(self.margin * p * self.rate_hz) + 1

    def g(self, chunk_size: int) -> float:
        ahead = self.actions_ahead()
        if ahead is None:
            return self.g_max  # nothing measured yet: ask as early as allowed
        return min(self.g_max, max(self.g_min, ahead / max(1, chunk_size)))
