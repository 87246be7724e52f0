"""`vlmq agents` end to end: N sessions over P spawned processes against a real worker,
traces to SQLite, then `vlmq traces export` to SFT train/val JSONL."""

from __future__ import annotations

import json
import subprocess
import sys

from env_agents.traces.sft import read_jsonl
from schemas.actions import ACTION_DIM
from tests.helpers import REPO, WorkerThread, synthetic_settings


def vlmq(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_agents_over_processes_then_sft_export(settings, tmp_path):
    out, db, sft = tmp_path / "run.json", tmp_path / "traces.db", tmp_path / "sft"
    broker = ["--redis-url", settings.url, "--prefix", settings.prefix]
    with WorkerThread(synthetic_settings(settings, synthetic_latency_ms=5, synthetic_chunk=(10, ACTION_DIM))):
        proc = vlmq(
            "agents", *broker, "--env", "MiniWorld-OneRoom-v0", "--task", "text_action",
            "--n", "4", "--procs", "2", "--episodes", "2", "--size", "32", "--max-steps", "3",
            "--rate-hz", "0", "--out", str(out), "--traces", str(db), "--no-progress",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["episodes"] == 8 and s["sessions"] == 4 and s["failed_sessions"] == 0
    assert s["steps"] == 24 and s["requests"] == 24 and s["errors"] == 0
    assert s["latency_p50_ms"] > 0
    assert "starvation_fraction" in proc.stdout  # the summary table

    proc = vlmq("traces", "export", "--db", str(db), "--out-dir", str(sft), "--val-fraction", "0.25")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["episodes"] == 8 and counts["val_episodes"] == 2 and counts["train_episodes"] == 6
    train, val = read_jsonl(str(sft / "train.jsonl")), read_jsonl(str(sft / "val.jsonl"))
    assert len(train) + len(val) == 24
    key = lambda s: (s["metadata"]["session"], s["metadata"]["episode"])  # noqa: E731
    assert not {key(s) for s in train} & {key(s) for s in val}  # split by episode
    sample = train[0]
    roles = [m["role"] for m in sample["messages"]]
    assert roles == ["system", "user", "assistant"]
    parts = sample["messages"][1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith(
        "data:image/jpeg;base64,"
    )
    assert sample["messages"][2]["content"] in ("turn left", "turn right", "move forward")
