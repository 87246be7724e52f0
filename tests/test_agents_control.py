"""The async control pieces on their own: action queue, merges, similarity filter, RTC."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from env_agents.control.controller import ControlConfig, Controller
from env_agents.control.merge import MERGES, check_merge, get_merge
from env_agents.control.queue import ActionQueue
from env_agents.control.similarity import SimilarityFilter, frame_distance
from env_agents.envs.base import EnvAdapter, Observation
from schemas.actions import ACTION_DIM
from schemas.messages import ActionChunkRequest


def rows(values):
    return [np.full(2, v, np.float32) for v in values]


def test_queue_places_rows_by_timestep_and_drops_late_ones():
    q = ActionQueue(get_merge("replace"))
    assert q.add_chunk(0, list(range(5))) == 5
    assert [q.pop() for _ in range(3)] == [0, 1, 2]
    # A chunk for an observation taken at t=1 arrives when t=3 is next: rows 0, 1 are late.
    q.add_chunk(1, [10, 11, 12, 13, 14, 15])
    assert q.dropped == 2
    assert q.merged == 2  # timesteps 3 and 4 were queued already
    assert [q.pop() for _ in range(5)] == [12, 13, 14, 15, None]
    assert q.next_step == 7


def test_merges():
    old, new = np.ones(3, np.float32), np.zeros(3, np.float32)
    assert np.allclose(MERGES["replace"](old, new), 0.0)
    assert np.allclose(MERGES["keep"](old, new), 1.0)
    assert np.allclose(MERGES["weighted_average"](old, new), 0.3)
    assert np.allclose(MERGES["average"](old, new), 0.5)
    assert np.allclose(MERGES["conservative"](old, new), 0.7)
    q = ActionQueue(get_merge("average"))
    q.add_chunk(0, rows([0, 0, 0]))
    q.add_chunk(1, rows([4, 4, 4]))
    assert [float(q.pop()[0]) for _ in range(4)] == [0.0, 2.0, 2.0, 4.0]


def test_merge_names_are_checked_against_the_kind():
    with pytest.raises(ValueError, match="unknown merge"):
        get_merge("median")
    with pytest.raises(ValueError, match="discrete"):
        check_merge("weighted_average", "text_action")
    check_merge("replace", "text_action")
    with pytest.raises(ValueError, match="mode"):
        ControlConfig(mode="bursty")


def test_similarity_filter_skips_only_above_the_must_go_level():
    frame = np.full((32, 32, 3), 100, np.uint8)
    f = SimilarityFilter(threshold=0.05)
    assert f.decide(frame, queued=40, latency_s=0.1, rate_hz=30).send  # nothing sent yet
    f.sent(frame)
    must_go = SimilarityFilter.must_go(0.1, 30)  # ceil(0.1 * 30 * 1.5) + 1 = 6
    assert must_go == 6
    d = f.decide(frame.copy(), queued=must_go + 1, latency_s=0.1, rate_hz=30)
    assert not d.send and "similar" in d.reason
    for queued in range(must_go + 1):  # at or below the level the frame always goes
        d = f.decide(frame.copy(), queued=queued, latency_s=0.1, rate_hz=30)
        assert d.send and "must go" in d.reason
    # unknown latency or a changed frame: sent
    assert f.decide(frame.copy(), queued=40, latency_s=None, rate_hz=30).send
    other = np.zeros_like(frame)
    assert frame_distance(frame, other) == pytest.approx(100 / 255, abs=1e-3)
    assert f.decide(other, queued=40, latency_s=0.1, rate_hz=30).send


class _Frames(EnvAdapter):
    kinds = ("action_chunk",)
    env_id = "frames"

    def request(self, kind, obs, **kw):
        return ActionChunkRequest(image=obs.frame, **kw)


def test_rtc_sends_the_queued_actions_as_prev_chunk():
    cfg = ControlConfig(kind="action_chunk", rtc=True, rate_hz=30)
    c = Controller("s", _Frames(), client=None, config=cfg)
    c.queue.add_chunk(0, [np.full(ACTION_DIM, i, np.float32) for i in range(10)])
    c.queue.pop()
    c.latency_s = 0.1
    req = c._request(Observation(frame=np.zeros((8, 8, 3), np.uint8)), t=1, first=False)
    assert req.prev_chunk.shape == (9, ACTION_DIM)
    assert req.prev_chunk[0, 0] == 1.0  # row 0 is the action that runs next
    assert req.inference_delay == 3  # ceil(0.1 s x 30 Hz)
    assert req.deadline is not None and not req.reset


def test_env_agents_never_import_torch():
    code = (
        "import sys, env_agents.cli, env_agents.runner.launcher, env_agents.envs.miniworld, "
        "env_agents.envs.textworld, env_agents.envs.crafter, env_agents.envs.alfworld, "
        "env_agents.envs.alfworld_games, env_agents.envs.cli, "
        "env_agents.traces.sft, env_agents.traces.store, env_agents.preference.report, "
        "env_agents.preference.labelling; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
