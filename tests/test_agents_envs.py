"""Every env kind runs a few steps through a real worker on a real Redis, with the
runner's own session code; plus the env facts each adapter relies on.

The chat kinds (text_action, structured_action, preference) are served by the `hf`
backend on the tiny random-weight Qwen2-VL checkpoint (the real architecture, built by
the session fixture); action_chunk by the VLA on that checkpoint when the worker serves
it, else by the synthetic handler."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid

import numpy as np
import pytest

from broker.settings import BrokerSettings
from env_agents.control.controller import ControlConfig
from env_agents.runner.launcher import launch
from env_agents.runner.spec import PreferenceConfig, RunSpec
from schemas.actions import ACTION_DIM
from tests.helpers import WorkerThread, synthetic_settings

CHAT_KINDS = ("text_action", "structured_action", "preference")
# Short answers keep the tiny model's CPU time small (text_action choices are scored).
FIELDS = {
    "structured_action": {"max_tokens": 16},
    "preference": {"max_tokens": 8},
    "text_action": {"max_tokens": 8},
}


@pytest.fixture(scope="module")
def tw_game(tmp_path_factory):
    """One TextWorld game generated here, offline (~3 s), shared by the module."""
    from env_agents.envs.textworld import GameSpec, make_game

    return make_game(GameSpec(seed=3, rooms=2, objects=3, quest_length=2), str(tmp_path_factory.mktemp("tw")))


@pytest.fixture(scope="module")
def broker(redis_server):
    """A key prefix of this module's own: its workers live as long as the module."""
    return BrokerSettings(
        url=redis_server.url, prefix=f"agents{uuid.uuid4().hex[:8]}", claim_min_idle_ms=1000
    )


@pytest.fixture(scope="module")
def chat_worker(broker, tiny_qwen2_vl):
    with WorkerThread(
        synthetic_settings(broker, backend="hf", model_path=tiny_qwen2_vl, kinds=CHAT_KINDS)
    ) as w:
        yield w


def _vla_served() -> bool:
    from inference_worker.handlers.model_backed import FACTORIES

    return "action_chunk" in FACTORIES


@pytest.fixture(scope="module")
def chunk_worker(broker, request):
    if _vla_served():
        tiny_qwen2_vl, tiny_vla = (
            request.getfixturevalue("tiny_qwen2_vl"),
            request.getfixturevalue("tiny_vla"),
        )
        settings = synthetic_settings(
            broker, backend="hf", model_path=tiny_qwen2_vl, kinds=("action_chunk",), options={"vla": tiny_vla}
        )
    else:
        settings = synthetic_settings(
            broker, synthetic_latency_ms=5, synthetic_chunk=(10, ACTION_DIM), kinds=("action_chunk",)
        )
    with WorkerThread(settings) as w:
        yield w


def run(broker, env_id, kind, n=1, procs=1, max_steps=8, rate_hz=0.0, mode="sync", **kw):
    control = ControlConfig(
        kind=kind, mode=mode, rate_hz=rate_hz, max_steps=max_steps, request_fields=FIELDS.get(kind, {})
    )
    spec = RunSpec(
        env_id, control, broker, n=n, procs=procs, size=32, session_prefix=f"{kind}-{time.time_ns()}", **kw
    )
    result = launch(spec, progress=False, in_process=True)
    assert not result.failures, result.failures
    assert len(result.episodes) == n * spec.episodes
    for ep in result.episodes:
        assert ep["errors"] == 0 and ep["steps"] > 0 and ep["requests"] > 0, ep
    return result


@pytest.mark.parametrize("kind", ["action_chunk", "structured_action", "text_action"])
def test_miniworld_every_kind(broker, request, kind):
    worker = request.getfixturevalue("chunk_worker" if kind == "action_chunk" else "chat_worker")
    res = run(
        broker, "MiniWorld-OneRoom-v0", kind, n=2, rate_hz=60 if kind == "action_chunk" else 0, mode="async"
    )
    assert all(ep["steps"] == 8 for ep in res.episodes)
    assert worker.worker.stats["requests"] >= 2


def test_textworld_plays_admissible_commands_and_records_traces(broker, chat_worker, tw_game, tmp_path):
    db = str(tmp_path / "traces.db")
    opts = {"game": tw_game}
    res = run(broker, "textworld", "text_action", n=2, max_steps=4, env_options=opts, traces=db, episodes=2)
    total = sum(ep["steps"] for ep in res.episodes)
    con = sqlite3.connect(db)
    reqs = con.execute("SELECT request, reply FROM requests").fetchall()
    assert len(reqs) == total  # text play: one request per step
    for req, reply in reqs:
        req, reply = json.loads(req), json.loads(reply)
        assert reply["choice"] in req["admissible_commands"]  # a legal move was played
    assert con.execute("SELECT COUNT(*) FROM steps").fetchone()[0] == total
    assert con.execute("SELECT COUNT(*) FROM episodes WHERE stats IS NOT NULL").fetchone()[0] == 4


def test_textworld_success_comes_from_the_game(tw_game):
    from textworld import Game

    from env_agents.envs import make_adapter

    adapter = make_adapter("textworld", game=tw_game)
    try:
        obs = adapter.reset()
        assert obs.commands and obs.text
        walkthrough = Game.load(os.path.splitext(tw_game)[0] + ".json").walkthrough
        for cmd in walkthrough:
            res = adapter.step(cmd)
        assert res.success and res.terminated and not res.truncated
        assert res.obs.progress == pytest.approx(1.0)
    finally:
        adapter.close()


def test_crafter_text_action(broker, chat_worker):
    pytest.importorskip("crafter")
    res = run(broker, "crafter", "text_action", max_steps=5)
    assert res.episodes[0]["steps"] == 5


def test_alfworld_plays_generated_games_through_the_queue_into_sft_data(
    broker, chat_worker, alfworld_data, tmp_path
):
    from env_agents.traces.sft import export_sft

    db = str(tmp_path / "alfworld.db")
    opts = {"split": "generated", "data": alfworld_data}
    res = run(broker, "alfworld", "text_action", n=3, max_steps=3, env_options=opts, traces=db)
    con = sqlite3.connect(db)
    tasks = {row[0] for row in con.execute("SELECT task FROM episodes")}
    assert len(tasks) == 3  # three sessions, one game each
    for req, reply in con.execute("SELECT request, reply FROM requests"):
        req, reply = json.loads(req), json.loads(reply)
        assert reply["choice"] in req["admissible_commands"]  # the worker scored ALFWorld's commands
        assert "Your task: " in req["messages"][0]["content"]
    counts = export_sft(db, str(tmp_path / "sft"), val_fraction=0.0)
    assert counts.train_samples == sum(ep["steps"] for ep in res.episodes)
    with open(tmp_path / "sft" / "train.jsonl") as f:
        sample = json.loads(f.readline())
    assert sample["metadata"]["env_id"] == "alfworld"
    assert sample["messages"][-1]["role"] == "assistant" and sample["messages"][-1]["content"]


def test_miniworld_progress_and_success_come_from_the_env():
    from env_agents.envs.miniworld import MOVE_FORWARD, TURN_LEFT, MiniWorldAdapter

    adapter = MiniWorldAdapter("MiniWorld-OneRoom-v0", size=32, seed=1)
    try:
        obs = adapter.reset(seed=1)
        assert obs.frame.shape == (32, 32, 3) and obs.frame.dtype == np.uint8
        assert "box" in obs.text and obs.progress < 0
        # Steer at the box: turn until it is ahead, walk; the env says when it is reached.
        res = None
        for _ in range(400):
            u = adapter.env.unwrapped
            to_box = u.box.pos - u.agent.pos
            ahead = np.dot(to_box[[0, 2]], u.agent.dir_vec[[0, 2]]) / np.linalg.norm(to_box[[0, 2]])
            res = adapter.step(MOVE_FORWARD if ahead > 0.97 else TURN_LEFT)
            if res.done:
                break
        assert res.success and res.terminated and res.reward > 0
    finally:
        adapter.close()


def test_preference_labels_csv_and_plot(broker, chat_worker, tmp_path):
    from env_agents.preference.report import plot_accuracy, read_csv, write_csv

    res = run(
        broker, "MiniWorld-OneRoom-v0", "preference", max_steps=30, preference=PreferenceConfig(pairs=6)
    )
    rows = res.preference_rows
    assert len(rows) == 6
    for r in rows:
        assert r["ok"] == 1 and r["vlm_predicted_label"] in (-1, 0, 1)
        assert r["ground_truth_score_1"] != r["ground_truth_score_2"]
    csv_path, png = str(tmp_path / "vlm_query_log.csv"), str(tmp_path / "acc.png")
    write_csv(csv_path, rows)
    back = read_csv(csv_path)
    assert list(back[0])[:5] == [
        "ground_truth_score_1",
        "ground_truth_score_2",
        "vlm_predicted_label",
        "timestamp",
        "train_iter",
    ]
    data = plot_accuracy(back, png)
    assert data["n"] == 6
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_accuracy_by_difficulty_counts_outcomes():
    from env_agents.preference.report import accuracy_by_difficulty

    rows = [
        {"ground_truth_score_1": 1.0, "ground_truth_score_2": 0.0, "vlm_predicted_label": 0},  # correct
        {"ground_truth_score_1": 0.0, "ground_truth_score_2": 0.1, "vlm_predicted_label": 0},  # incorrect
        {"ground_truth_score_1": 0.0, "ground_truth_score_2": 0.9, "vlm_predicted_label": 1},  # correct
        {"ground_truth_score_1": 0.5, "ground_truth_score_2": 0.4, "vlm_predicted_label": -1},  # none
        {
            "ground_truth_score_1": 0.5,
            "ground_truth_score_2": 0.4,
            "vlm_predicted_label": -1,
            "ok": 0,
        },  # failed
    ]
    data = accuracy_by_difficulty(rows, bins=2)
    assert data["n"] == 4
    assert data["counts"] == {"correct": [0, 2], "incorrect": [1, 0], "no_preference": [1, 0]}
    assert data["accuracy"] == pytest.approx(0.5)


def test_minerl_dict_maps_to_miniworld_actions():
    from env_agents.envs.miniworld import (
        MOVE_BACK,
        MOVE_FORWARD,
        PICKUP,
        TURN_LEFT,
        TURN_RIGHT,
        action_from_minerl,
    )

    assert action_from_minerl({"camera": [0.0, -10.0]}, 8) == TURN_LEFT
    assert action_from_minerl({"camera": [0.0, 10.0]}, 8) == TURN_RIGHT
    assert action_from_minerl({"camera": [0.0, 1.0], "forward": 1}, 8) == MOVE_FORWARD
    assert action_from_minerl({"back": 1}, 8) == MOVE_BACK
    assert action_from_minerl({"attack": 1}, 8) == PICKUP
    assert action_from_minerl({"attack": 1}, 3) == MOVE_FORWARD  # OneRoom has 3 actions
    assert action_from_minerl({}, 3) == MOVE_FORWARD


def _render_in_fresh_process(code: str) -> str:
    """Run `code` in a new interpreter without EGL loaded (glvnd's vendor choice is
    process-wide and made once) and no vendor variable of the caller's; its stdout.
    Skips where Mesa's EGL vendor library is missing."""
    import subprocess
    import sys

    from env_agents.envs.miniworld import EGL_VENDORS, MESA_EGL_VENDOR

    if not os.path.exists(MESA_EGL_VENDOR):
        pytest.skip("no Mesa EGL vendor library here")
    env = {k: v for k, v in os.environ.items() if k not in (EGL_VENDORS, "LP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_miniworld_render_cpu_picks_mesa_before_egl_loads():
    from env_agents.envs.miniworld import MESA_EGL_VENDOR

    out = _render_in_fresh_process(
        "import os\n"
        "from env_agents.envs.miniworld import make_miniworld\n"
        "env = make_miniworld('MiniWorld-OneRoom-v0', size=32, render='cpu')\n"
        "from pyglet.gl import gl_info\n"
        "print(gl_info.get_renderer()); print(os.environ['__EGL_VENDOR_LIBRARY_FILENAMES'])\n"
        "print(os.environ['LP_NUM_THREADS'])\n"
        "try:\n"
        "    make_miniworld('MiniWorld-OneRoom-v0', size=32, render='cpu')\n"
        "    print('again ok')\n"
        "except RuntimeError as exc:\n"
        "    print('again', exc)\n"
    )
    renderer, vendors, threads, again = out.strip().splitlines()[-4:]
    assert "llvmpipe" in renderer and vendors == MESA_EGL_VENDOR and threads == "1"
    assert again == "again ok"  # the same choice again is no change


def test_miniworld_render_cpu_after_egl_loaded_or_unknown_is_refused():
    from env_agents.envs.miniworld import choose_renderer

    with pytest.raises(ValueError, match="render='gpu0': use one of auto, cpu"):
        choose_renderer("gpu0")
    out = _render_in_fresh_process(
        "from env_agents.envs.miniworld import make_miniworld\n"
        "make_miniworld('MiniWorld-OneRoom-v0', size=32)\n"
        "try:\n"
        "    make_miniworld('MiniWorld-OneRoom-v0', size=32, render='cpu')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    assert "before this process's first MiniWorld env" in out


def test_miniworld_render_cpu_without_mesa_says_what_to_install(monkeypatch):
    import env_agents.envs.miniworld as mw

    monkeypatch.delenv(mw.EGL_VENDORS, raising=False)
    monkeypatch.setattr(mw, "MESA_EGL_VENDOR", "/nonexistent/50_mesa.json")
    with pytest.raises(RuntimeError, match="apt-get install -y libegl-mesa0"):
        mw.choose_renderer("cpu")
    assert mw.EGL_VENDORS not in os.environ
