"""ALFWorld games made here (vlmq envs alfworld-make) load and play in ALFWorld's own
TextWorld env and its hand-coded expert, and in vlmq's adapter; the benchmark merges its
records. (Playing them through the queue: tests/test_agents_envs.py.)"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from env_agents.envs.alfworld import find_games, walkthrough


def _alfworld_config(games_dir: str) -> dict:
    """The parts of ALFWorld's base_config.yaml that AlfredTWEnv reads."""
    return {
        "env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6],
                "domain_randomization": False, "expert_type": "handcoded"},
        "dataset": {"data_path": games_dir, "eval_id_data_path": games_dir, "eval_ood_data_path": games_dir,
                    "num_train_games": -1, "num_eval_games": -1},
        "general": {"training_method": "dagger"},
        "dagger": {"training": {"max_nb_steps_per_episode": 50}},
    }  # fmt: skip


def test_alfworlds_own_env_loads_the_games_unchanged_and_walkthroughs_win(alfworld_data):
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    games_dir = os.path.join(alfworld_data, "json_2.1.1", "generated")
    tw = AlfredTWEnv(_alfworld_config(games_dir), train_eval="eval_out_of_distribution")
    assert tw.num_games == 3  # solvable, task type known, traj_data.json beside each game
    env = tw.init_env(batch_size=1)
    try:
        seen = set()
        for _ in range(3):
            obs, infos = env.reset()
            game = infos["extra.gamefile"][0]
            seen.add(game)
            assert obs[0].startswith("-= Welcome to TextWorld, ALFRED! =-") and "Your task is to: " in obs[0]
            for i, cmd in enumerate(walkthrough(game)):
                assert not infos["won"][0], f"won before step {i}"
                assert cmd in infos["admissible_commands"][0]
                obs, scores, dones, infos = env.step([cmd])
            assert infos["won"][0] and dones[0] and scores[0] == 1
        assert len(seen) == 3
    finally:
        env.close()


def test_alfworlds_handcoded_expert_solves_the_games(alfworld_data):
    """ALFWorld's own expert reads traj_data.json and the game's facts, not our walkthrough."""
    import textworld
    import textworld.gym
    from alfworld.agents.environment.alfred_tw_env import (
        AlfredDemangler,
        AlfredExpert,
        AlfredExpertType,
        AlfredInfos,
    )

    infos = textworld.EnvInfos(admissible_commands=True, won=True, extras=["gamefile", "expert_plan"])
    for game in find_games(alfworld_data, "generated"):
        wrappers = [AlfredDemangler(shuffle=False), AlfredInfos, AlfredExpert(AlfredExpertType.HANDCODED)]
        env = textworld.gym.make(
            textworld.gym.register_games([game], infos, max_episode_steps=60, wrappers=wrappers)
        )
        try:
            _, info = env.reset()
            done = False
            while not done:
                _, _, done, info = env.step(info["extra.expert_plan"][0])
            assert info["won"], game
        finally:
            env.close()


def test_the_games_are_what_their_task_says(alfworld_data):
    from alfworld.gen.constants import GOALS_VALID, SCENE_TYPE

    for game in find_games(alfworld_data, "generated"):
        with open(os.path.join(os.path.dirname(game), "traj_data.json")) as f:
            traj = json.load(f)
        with open(game) as f:
            data = json.load(f)
        assert data["solvable"] is True and data["walkthrough"] == traj["vlmq"]["expert_plan"]
        params = traj["pddl_params"]
        assert f"(objectType ?o {params['object_target']}Type)" in data["pddl_problem"]
        task = traj["turk_annotations"]["anns"][0]["task_desc"].rstrip(".").lower()
        assert f"Your task is to: {task}." in data["grammar"]
        scene = traj["scene"]["scene_num"]
        assert any(scene in SCENE_TYPE[room] for room in GOALS_VALID[traj["task_type"]])
        assert os.path.basename(os.path.dirname(os.path.dirname(game))).startswith(traj["task_type"])


def test_generation_is_deterministic_and_refuses_what_it_cannot_make(tmp_path):
    from env_agents.envs.alfworld_games import make_game

    a = make_game(str(tmp_path / "a"), 6, seed=7, floor_plans=(302,), distractors=2)
    b = make_game(str(tmp_path / "b"), 6, seed=7, floor_plans=(302,), distractors=2)
    with open(a.path) as fa, open(b.path) as fb:
        assert json.load(fa) == json.load(fb)
    assert a.task_type == "pick_and_place_simple" and a.floor_plan == 302  # task types in turn
    with pytest.raises(ValueError, match="suits"):
        make_game(str(tmp_path / "c"), 0, task_type="pick_heat_then_place_in_recep", floor_plans=(301,))
    with pytest.raises(ValueError, match="task type"):
        make_game(str(tmp_path / "c"), 0, task_type="slice_and_dice")


def test_adapter_plays_expert_and_random_and_splits_games_between_sessions(alfworld_data):
    from env_agents.envs import make_adapter

    adapter = make_adapter("alfworld", split="generated", data=alfworld_data, max_episode_steps=20)
    try:
        assert len(adapter.game_files) == 3
        for _ in range(3):
            obs = adapter.reset()
            assert obs.commands and adapter.objective and adapter.objective in obs.text
            req = adapter.request("text_action", obs)
            assert req.admissible_commands == obs.commands
            assert f"Your task: {adapter.objective}" in req.messages[0].content
            for cmd in adapter.expert_plan():
                res = adapter.step(cmd)
            assert res.success and res.terminated and not res.truncated and res.obs.progress == 1.0
        rng = np.random.default_rng(0)
        obs = adapter.reset()
        for _ in range(20):
            cmd = adapter.random_action(rng)
            assert cmd in adapter.commands
            res = adapter.step(cmd)
            if res.done:
                break
        assert res.done and (res.truncated or res.success)  # the step limit ends an episode
    finally:
        adapter.close()
    shares = []
    for i in range(2):
        a = make_adapter("alfworld", split="generated", data=alfworld_data)
        a.share(i, 2)
        shares.append([(a.reset(), a.game_file)[1] for _ in range(2)])
        a.close()
    files = sorted(a.game_files)
    assert shares == [[files[0], files[2]], [files[1], files[1]]]


def test_missing_games_say_how_to_make_or_fetch_them(tmp_path):
    from env_agents.envs import make_adapter

    with pytest.raises(FileNotFoundError, match=r"alfworld-make.*alfworld-download"):
        make_adapter("alfworld", data=str(tmp_path), split="generated")
    with pytest.raises(ValueError, match="split"):
        make_adapter("alfworld", data=str(tmp_path), split="test")


def test_alfworld_make_cli_refuses_to_mix_and_replaces_its_own(tmp_path, capsys):
    from ops.cli import main

    data = str(tmp_path)
    args = [
        "envs",
        "alfworld-make",
        "--data",
        data,
        "--games",
        "1",
        "--floor-plans",
        "301",
        "--distractors",
        "2",
    ]
    assert main(args) == 0
    assert len(find_games(data, "generated")) == 1
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    games = find_games(data, "generated")
    assert len(games) == 1 and "trial_vlmq_s1_" in games[0]
    assert len(glob.glob(os.path.join(data, "json_2.1.1", "generated", "*"))) == 2  # one task folder + list
    with pytest.raises(SystemExit, match="task-types"):
        main(["envs", "alfworld-make", "--data", data, "--task-types", "juggle"])


def test_bench_merges_its_records_into_agents_json(tmp_path):
    from ops.bench.alfworld import merge_results
    from ops.bench.records import record

    path = str(tmp_path / "agents.json")
    other = {"metric": "starvation_fraction_30hz_64_sessions", "value": 0.1}
    with open(path, "w") as f:
        json.dump([other, {"metric": "alfworld_success_rate", "value": 0.5}], f)
    merge_results(
        path, [record("alfworld_success_rate", [0.0, 0.25, 0.5], "fraction of games", baseline=0.1)]
    )
    with open(path) as f:
        out = json.load(f)
    assert out[0] == other and len(out) == 2
    assert out[1]["metric"] == "alfworld_success_rate" and out[1]["value"] == 0.25 and out[1]["runs"] == 3
