"""`vlmq bench structured` end to end on the tiny model (CPU, a private Redis and real
workers): every constrained MineRL action parses, the free-text baseline of a random-weight
model does not, and streaming records its time to the first piece against the whole reply."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("xgrammar")

from ops.cli import main


def test_structured_bench_records_valid_actions_and_time_to_first_piece(tmp_path):
    out = tmp_path / "structured.json"
    rc = main(
        ["--log-level", "WARNING", "bench", "structured", "--device", "cpu", "--preset", "tiny",
         "--sessions", "4", "--procs", "1", "--requests", "8", "--runs", "3", "--seconds", "1",
         "--warmup-s", "1", "--max-tokens", "8", "--action-max-tokens", "64", "--image-size", "64",
         "--prompt-tokens", "20", "--parts", "valid,stream", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    records = {r["metric"]: r for r in json.loads(out.read_text())}
    valid = records["structured_action_valid_fraction"]
    assert valid["value"] == 1.0 and valid["runs"] == 3
    assert valid["baseline"] == 0.0  # random weights: free text never parses
    ttft = records["stream_ttft_ms_p50_4_sessions"]
    assert 0 < ttft["value"] < ttft["baseline"]  # the first piece comes before the whole reply
    assert all(r["commit"] for r in records.values())
