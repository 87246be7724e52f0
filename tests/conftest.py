"""Fixtures: real redis-server processes on free ports (never the machine's shared 6379)."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from broker.embedded import EmbeddedRedis
from broker.settings import BrokerSettings


def _ensure_redis_server() -> None:
    if shutil.which("redis-server"):
        return
    # Fresh CI machines: install Debian's redis-server (the tests start their own instances).
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False, capture_output=True)
    if not shutil.which("redis-server"):
        pytest.exit("redis-server is not installed and apt-get could not install it", returncode=3)


@pytest.fixture(scope="session")
def redis_server():
    """One private redis-server for the whole session; tests isolate by key prefix."""
    _ensure_redis_server()
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def fresh_redis():
    """A redis-server of this test's own, for tests that restart, kill or reconfigure it."""
    _ensure_redis_server()
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def settings(redis_server) -> BrokerSettings:
    """Broker settings on the session server with a prefix unique to this test."""
    return BrokerSettings(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}", claim_min_idle_ms=1000)


def _tiny_checkpoint(tmp_path_factory, arch: str) -> str:
    from inference_worker.models import make_model

    return make_model(arch, str(tmp_path_factory.mktemp(f"tiny-{arch}")), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> str:
    """Path of a tiny random-weight Qwen2-VL checkpoint (real architecture), built once."""
    return _tiny_checkpoint(tmp_path_factory, "qwen2-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> str:
    """Path of a tiny random-weight Qwen2.5-VL checkpoint (real architecture), built once."""
    return _tiny_checkpoint(tmp_path_factory, "qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory) -> str:
    """Path of a tiny random-weight Qwen3-VL checkpoint (real architecture), built once."""
    return _tiny_checkpoint(tmp_path_factory, "qwen3-vl")


@pytest.fixture(scope="session")
def tiny_vla(tiny_qwen2_vl, tmp_path_factory) -> str:
    """Path of a VLA folder: a tiny random-weight action expert on the tiny Qwen2-VL."""
    from inference_worker.vla.config import TINY, VLAConfig
    from inference_worker.vla.model import QwenVLA

    folder = str(tmp_path_factory.mktemp("tiny-vla"))
    QwenVLA.build(VLAConfig(vlm_path=tiny_qwen2_vl, **TINY), seed=0).save(folder)
    return folder


@pytest.fixture(scope="session")
def alfworld_data(tmp_path_factory) -> str:
    """An ALFWorld data folder holding three small generated games (json_2.1.1/generated/),
    made once (~3 s): pick and place, look at in light, clean and place."""
    pytest.importorskip("alfworld")
    from env_agents.envs.alfworld import split_dir
    from env_agents.envs.alfworld_games import make_games

    root = str(tmp_path_factory.mktemp("alfworld"))
    types = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep")
    make_games(
        split_dir(root, "generated"), 3, seed=0, task_types=types, floor_plans=(302, 401), distractors=3
    )
    return root
