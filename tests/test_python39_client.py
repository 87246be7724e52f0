"""The env side installs with `pip install vlmq` (no extras) and runs on Python 3.9."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO, WorkerThread, synthetic_settings


def _python39() -> str:
    candidates = [*glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9"), shutil.which("python3.9")]
    for found in filter(None, candidates):
        if subprocess.run([found, "--version"], capture_output=True).returncode == 0:
            return found
    pytest.skip("no Python 3.9 on this machine")


CLIENT = """
import sys
import numpy as np
from env_agents import AgentClient
from schemas import ActionChunkRequest, TextActionRequest
assert sys.version_info[:2] == (3, 9)
assert "torch" not in sys.modules
with AgentClient("py39-agent") as client:
    reply = client.request(TextActionRequest(messages=[{"role": "user", "content": "hi"}], admissible_commands=["a", "b"]), timeout=30)
    assert reply.result.choice == "a"
    chunk = client.request(ActionChunkRequest(image=np.zeros((8, 8, 3), np.uint8)), timeout=30).result.chunk
    assert chunk.shape == (50, 7)
print("py39 ok")
"""


def test_core_install_on_python_39_talks_to_a_worker(settings, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([_python39(), "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # Binary wheels only: the core install must not need a compiler.
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--only-binary=:all:", REPO],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env = {**os.environ, "VLMQ_REDIS_URL": settings.url, "VLMQ_PREFIX": settings.prefix}
    with WorkerThread(synthetic_settings(settings)):
        out = subprocess.run(
            [python, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path)
        )
    assert out.returncode == 0, out.stderr
    assert "py39 ok" in out.stdout
