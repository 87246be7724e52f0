"""`vlmq demo` end to end: embedded Redis, a worker on the tiny Qwen2-VL, agents of every kind."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def test_demo_runs_every_kind_on_the_tiny_model_and_cleans_up(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("VLMQ_REDIS_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "demo", "--agents", "3", "--requests", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    table = out.stdout.split("mean batch")[1]
    for kind in ("action_chunk", "preference", "structured_action", "text_action"):
        row = next(line for line in table.splitlines() if line.startswith(kind))
        assert row.split()[1:3] == ["3", "0"]  # 3 requests of the kind, 0 errors
    assert "worker exited with 0" in out.stdout
    assert os.path.exists(tmp_path / "vlmq" / "demo-tiny-qwen2-vl" / "config.json")
