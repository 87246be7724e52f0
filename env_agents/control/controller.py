"""The control loop of one agent session (the QwenVLA async plan; LeRobot's RobotClient).

Every tick of a fixed control rate the controller (1) merges a reply that has come back
into the action queue, (2) asks for the next chunk when the queue holds <= g x chunk
actions and no request is in flight (the similarity filter may hold a near-duplicate
frame back, never below the must-go level), and (3) executes the action due, or counts
starvation when there is none. It never waits for a reply while it has actions to run.

g is fixed, or adaptive: set from the p90 of the session's recent round trips so the
queue never runs dry (threshold.py). Synchronous mode is the same loop with g = 0: ask
only when the queue is empty, so the agent stands still for every round trip. Rate 0
means free-running: step as soon as an action is there and wait for replies (text games,
throughput runs).

Times come from the event loop's clock (monotonic), so a loop with a virtual clock runs
an episode of minutes in milliseconds (the controller's tests).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from broker.publisher import BacklogFull
from env_agents.control.merge import check_merge, get_merge
from env_agents.control.queue import ActionQueue
from env_agents.control.similarity import SimilarityFilter
from env_agents.control.stats import EpisodeStats
from env_agents.control.threshold import G_MAX, G_MIN, MARGIN, WINDOW, AdaptiveThreshold, FixedThreshold
from env_agents.control.tracer import Tracer
from env_agents.envs.base import EnvAdapter, Observation

log = logging.getLogger("vlmq.agents")

MODES = ("async", "sync")


@dataclass(frozen=True)
class ControlConfig:
    kind: str = "action_chunk"
    mode: str = "async"
    rate_hz: float = 30.0  # 0 = free-running
    threshold: float = 0.5  # g: refill when the queue holds <= g x chunk_size actions
    adaptive: bool = False  # g from the measured latency instead (threshold.py), within:
    g_min: float = G_MIN
    g_max: float = G_MAX
    g_margin: float = MARGIN  # safety factor on the p90 latency
    latency_window: int = WINDOW  # round trips the p90 is taken over
    merge: str = ""  # "" = weighted_average for action_chunk, replace for the discrete kinds
    similarity: float = 0.0  # frame distance below which an observation may be skipped; 0 = off
    max_steps: int = 500  # per episode, on top of the env's own time limit
    request_timeout_s: float = 30.0
    max_errors: int = 20  # per episode, then the episode is abandoned
    rtc: bool = False  # send the queued actions as prev_chunk (real-time chunking)
    request_fields: Dict[str, Any] = field(default_factory=dict)  # e.g. max_tokens, model

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.threshold < 0 or self.rate_hz < 0:
            raise ValueError("threshold and rate must be >= 0")
        if self.adaptive and self.mode == "async":
            self.make_threshold()  # checks rate, clamp and margin before a run starts
        if not self.merge:
            object.__setattr__(
                self, "merge", "weighted_average" if self.kind == "action_chunk" else "replace"
            )
        check_merge(self.merge, self.kind)

    @property
    def g(self) -> float:
        """The fixed g (0 in sync mode); an adaptive threshold has none (see `threshold_label`)."""
        return 0.0 if self.mode == "sync" else self.threshold

    @property
    def threshold_label(self) -> str:
        if self.mode == "async" and self.adaptive:
            return f"adaptive [{self.g_min:g}, {self.g_max:g}], margin {self.g_margin:g}"
        return f"{self.g:g}"

    def make_threshold(self):
        if self.mode == "sync":
            return FixedThreshold(0.0)
        if self.adaptive:
            return AdaptiveThreshold(self.rate_hz, self.g_min, self.g_max, self.g_margin, self.latency_window)
        return FixedThreshold(self.threshold)


@dataclass
class _InFlight:
    future: asyncio.Future
    t0: int
    sent_at: float
    request: Any
    done_at: Optional[float] = None


class Controller:
    def __init__(
        self,
        session_id: str,
        adapter: EnvAdapter,
        client,  # AsyncAgentClient with raise_on_error=False
        config: ControlConfig,
        tracer: Optional[Tracer] = None,
    ) -> None:
        if config.kind not in adapter.kinds or config.kind == "preference":
            raise ValueError(f"{adapter.env_id} cannot be controlled with {config.kind!r}")
        self.session_id = session_id
        self.adapter = adapter
        self.client = client
        self.config = config
        self.tracer = tracer or Tracer()
        self.queue = ActionQueue(get_merge(config.merge))
        self.filter = SimilarityFilter(config.similarity)
        self.threshold = config.make_threshold()  # lives as long as the session, over episodes
        self.chunk_size = 1  # learnt from replies
        self.latency_s: Optional[float] = None  # moving average of round trips

    # ------------------------------------------------------------------ requests

    def _request(self, obs: Observation, t: int, first: bool):
        kw: Dict[str, Any] = {"step": t, **self.config.request_fields}
        kw["deadline"] = time.time() + self.config.request_timeout_s
        if self.config.kind == "action_chunk":
            kw["reset"] = first
            pending = self.queue.pending()
            if self.config.rtc and pending and isinstance(pending[0], np.ndarray):
                kw["prev_chunk"] = np.stack(pending).astype(np.float32)
                ahead = math.ceil((self.latency_s or 0.0) * self.config.rate_hz)
                kw["inference_delay"] = min(ahead, len(pending))
        return self.adapter.request(self.config.kind, obs, **kw)

    async def _send(
        self, obs: Observation, t: int, first: bool, g: float, stats: EpisodeStats
    ) -> Optional[_InFlight]:
        req = self._request(obs, t, first)
        try:
            fut = await self.client.submit(req)
        except BacklogFull as exc:  # the workers are behind: an error, and ask again next tick
            stats.errors += 1
            log.warning("session %s step %d: not sent: %s", self.session_id, t, exc)
            self.tracer.failed(self.session_id, t, req, "backlog_full")
            return None
        loop = asyncio.get_running_loop()
        flight = _InFlight(fut, t, loop.time(), req)

        def _arrived(_f: asyncio.Future, flight: _InFlight = flight) -> None:
            flight.done_at = loop.time()

        fut.add_done_callback(_arrived)
        stats.requests += 1
        stats.g_total += g
        self.filter.sent(obs.frame)
        self.tracer.request(self.session_id, t, obs, req)
        return flight

    def _absorb(self, flight: _InFlight, stats: EpisodeStats) -> None:
        """Merge a finished request's reply into the queue (or count its failure)."""
        rtt = (flight.done_at or asyncio.get_running_loop().time()) - flight.sent_at
        try:
            reply = flight.future.result()
        except Exception as exc:
            stats.errors += 1
            log.warning("session %s step %d: reply failed: %s", self.session_id, flight.t0, exc)
            code = getattr(exc, "code", None)
            self.tracer.failed(
                self.session_id,
                flight.t0,
                flight.request,
                str(getattr(code, "value", code) or "reply_failed"),
            )
            return
        stats.replies += 1
        stats.latencies_ms.append(rtt * 1000.0)
        self.latency_s = rtt if self.latency_s is None else 0.8 * self.latency_s + 0.2 * rtt
        self.threshold.observe(rtt)
        self.tracer.reply(self.session_id, flight.t0, flight.request, reply, rtt * 1000.0)
        if not reply.ok:
            stats.errors += 1
            err = reply.error
            log.warning(
                "session %s step %d: error reply %s: %s",
                self.session_id,
                flight.t0,
                err.code if err else "?",
                err.message if err else "",
            )
            return
        rows = list(self.adapter.actions(self.config.kind, reply))
        self.chunk_size = max(1, len(rows))
        stats.chunk_size = self.chunk_size
        before_d, before_m = self.queue.dropped, self.queue.merged
        self.queue.add_chunk(flight.t0, rows)
        stats.dropped_rows += self.queue.dropped - before_d
        stats.merged_rows += self.queue.merged - before_m

    def _expired(self, flight: _InFlight, stats: EpisodeStats) -> bool:
        waited = asyncio.get_running_loop().time() - flight.sent_at
        if waited <= self.config.request_timeout_s:
            return False
        stats.errors += 1
        stats.timeouts += 1
        log.warning(
            "session %s step %d: no reply within %.1fs; asking again",
            self.session_id,
            flight.t0,
            self.config.request_timeout_s,
        )
        # A late reply is of no use now; cancelling frees the client's slot for it.
        flight.future.cancel()
        # The threshold learns that replies can take this long (it asks earlier from now on).
        self.threshold.observe(waited)
        self.tracer.failed(self.session_id, flight.t0, flight.request, "timeout")
        return True

    # ------------------------------------------------------------------ the loop

    async def run_episode(self, episode: int, seed: int) -> EpisodeStats:
        cfg = self.config
        stats = EpisodeStats(
            self.session_id, episode, seed, env_id=self.adapter.env_id, kind=cfg.kind, mode=cfg.mode
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        stats.started_at = time.time()
        obs = self.adapter.reset(seed)
        self.queue.clear(0)
        self.filter.reset()
        self.tracer.episode_start(self.session_id, episode, seed, obs)
        flight: Optional[_InFlight] = None
        first_request = True
        acting = False  # the first action of the episode has arrived
        period = 1.0 / cfg.rate_hz if cfg.rate_hz > 0 else 0.0
        next_tick = loop.time()
        try:
            while stats.steps < cfg.max_steps and stats.errors < cfg.max_errors:
                if flight is not None and flight.future.done():
                    self._absorb(flight, stats)
                    flight = None
                elif flight is not None and self._expired(flight, stats):
                    flight = None
                if stats.errors >= cfg.max_errors:
                    continue  # abandoned (the loop's else says so): ask for nothing more
                t = self.queue.next_step
                g = self.threshold.g(self.chunk_size)
                if flight is None and len(self.queue) <= g * self.chunk_size:
                    decision = self.filter.decide(obs.frame, len(self.queue), self.latency_s, cfg.rate_hz)
                    if decision.send:
                        flight = await self._send(obs, t, first_request, g, stats)
                        first_request = first_request and flight is None
                    else:
                        stats.skipped += 1
                        log.debug(
                            "session %s step %d: observation skipped: %s (queue %d)",
                            self.session_id,
                            t,
                            decision.reason,
                            len(self.queue),
                        )
                item = self.queue.pop()
                if item is None and period == 0.0:
                    if flight is not None:  # free-running: nothing to do but wait for the reply
                        await asyncio.wait({flight.future}, timeout=cfg.request_timeout_s)
                    continue
                if period:
                    stats.ticks += 1
                if item is None:
                    if acting:
                        stats.starved += 1
                        stats.idle_starved += flight is None
                    else:
                        stats.startup_ticks += 1
                else:
                    acting = True
                    env_action = self.adapter.to_env_action(item)
                    result = self.adapter.step(env_action)
                    stats.steps += 1
                    stats.reward += result.reward
                    self.tracer.step(self.session_id, t, item, env_action, result)
                    obs = result.obs
                    if result.done:
                        stats.success = result.success
                        stats.terminated, stats.truncated = result.terminated, result.truncated
                        break
                if period:
                    next_tick += period
                    delay = next_tick - loop.time()
                    if delay < -period:
                        stats.overruns += 1
                        next_tick = loop.time()
                        delay = 0.0
                    await asyncio.sleep(max(0.0, delay))
                else:
                    await asyncio.sleep(0)
            else:
                stats.truncated = True
                if stats.errors >= cfg.max_errors:
                    stats.error = f"abandoned after {stats.errors} failed requests"
        finally:
            stats.wall_s = loop.time() - started
        self.tracer.episode_end(stats)
        return stats
