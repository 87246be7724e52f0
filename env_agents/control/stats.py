"""Per-episode metrics of one agent session, and their summary over many."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np


@dataclass
class EpisodeStats:
    session: str
    episode: int
    seed: int
    env_id: str = ""
    kind: str = ""
    mode: str = "async"
    steps: int = 0  # env steps taken
    ticks: int = 0  # control ticks (fixed rate), steps or not
    startup_ticks: int = 0  # ticks before the episode's first action arrived
    starved: int = 0  # ticks after that with an action due and the queue empty
    idle_starved: int = 0  # ... of which no request was in flight (what a filter must never cause)
    overruns: int = 0  # ticks that started more than one period late (the process was too slow)
    requests: int = 0
    replies: int = 0
    errors: int = 0  # error replies, failed replies and timeouts
    timeouts: int = 0  # ... of which requests that got no reply within the timeout
    skipped: int = 0  # observations the similarity filter held back
    dropped_rows: int = 0  # chunk rows that arrived after their timestep
    merged_rows: int = 0
    chunk_size: int = 0  # rows of the last chunk received
    g_total: float = 0.0  # sum over requests of the threshold g each was sent at
    reward: float = 0.0
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    started_at: float = 0.0  # wall clock (time.time()) at the episode's start
    wall_s: float = 0.0
    latencies_ms: List[float] = field(default_factory=list)
    error: str = ""

    @property
    def starvation_fraction(self) -> float:
        due = self.ticks - self.startup_ticks
        return self.starved / due if due > 0 else 0.0

    @property
    def mean_g(self) -> float:
        return self.g_total / self.requests if self.requests else 0.0

    def to_dict(self, include_latencies: bool = False) -> Dict[str, Any]:
        d = asdict(self)
        d["starvation_fraction"] = round(self.starvation_fraction, 5)
        d["mean_g"] = round(self.mean_g, 4)
        d.update(latency_percentiles(self.latencies_ms))
        if not include_latencies:
            del d["latencies_ms"]
        return d


def fixed_g_requests_per_step(g: float, chunk: int) -> float:
    """Requests per env step of a fixed threshold g in steady state without starvation:
    one request per (1 - g) x chunk actions run (every action, for g near 1)."""
    return 1.0 / max(1.0, (1.0 - g) * chunk)


def latency_percentiles(latencies_ms: Sequence[float]) -> Dict[str, float]:
    if not latencies_ms:
        return {"latency_p50_ms": 0.0, "latency_p90_ms": 0.0, "latency_p99_ms": 0.0}
    p50, p90, p99 = np.percentile(np.asarray(latencies_ms, np.float64), [50, 90, 99])
    return {
        "latency_p50_ms": round(float(p50), 3),
        "latency_p90_ms": round(float(p90), 3),
        "latency_p99_ms": round(float(p99), 3),
    }


def summarize(episodes: Sequence[Dict[str, Any]], wall_s: float) -> Dict[str, Any]:
    """Totals and means over episodes (EpisodeStats.to_dict(include_latencies=True));
    rates use the run's wall time."""
    n = len(episodes)

    def total(key: str) -> int:
        return sum(int(e[key]) for e in episodes)

    steps, starved, requests = total("steps"), total("starved"), total("requests")
    episode_s = sum(float(e["wall_s"]) for e in episodes)
    due = total("ticks") - total("startup_ticks")
    lat: List[float] = [x for e in episodes for x in e.get("latencies_ms", ())]
    out: Dict[str, Any] = {
        "episodes": n,
        "sessions": len({e["session"] for e in episodes}),
        "steps": steps,
        "ticks": total("ticks"),
        "requests": requests,
        # What asking early costs: requests per env step (1 / actions run per chunk).
        "requests_per_step": round(requests / steps, 5) if steps else 0.0,
        # The threshold the requests were sent at, averaged over requests (adaptive g moves).
        "mean_g": round(sum(float(e.get("g_total", 0.0)) for e in episodes) / requests, 4)
        if requests
        else 0.0,
        "errors": total("errors"),
        "timeouts": total("timeouts"),
        "skipped": total("skipped"),
        "starved": starved,
        "idle_starved": total("idle_starved"),
        "overruns": total("overruns"),
        "starvation_fraction": round(starved / due, 5) if due > 0 else 0.0,
        "success_rate": round(total("success") / n, 4) if n else 0.0,
        "mean_return": round(float(np.mean([e["reward"] for e in episodes])), 4) if n else 0.0,
        "mean_length": round(steps / n, 2) if n else 0.0,
        "wall_s": round(wall_s, 3),
        "env_steps_per_s": round(steps / wall_s, 3) if wall_s > 0 else 0.0,
        # Per session, over the episodes' own wall time (env creation excluded): the
        # control rate an agent actually achieved.
        "session_steps_per_s": round(steps / episode_s, 3) if episode_s > 0 else 0.0,
    }
    out.update(latency_percentiles(lat))
    return out
