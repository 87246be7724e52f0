"""Every committed benchmark result follows the record format of the developers' guide."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.helpers import REPO

FILES = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json")))
KEYS = {"metric", "value", "unit", "baseline", "ratio", "machine", "date", "command"}
RUNS = {"commit", "runs", "min", "max"}  # records written since runs were recorded


def _load(path: str) -> list:
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_result_records(path):
    records = _load(path)
    assert isinstance(records, list) and records
    for r in records:
        assert set(r) in (KEYS, KEYS | RUNS), r
        if "runs" in r:
            assert r["runs"] >= 1 and r["min"] <= r["value"] <= r["max"] and r["commit"], r
        assert isinstance(r["metric"], str) and isinstance(r["value"], (int, float))
        assert r["machine"] and r["date"] and r["command"] and r["unit"]
        if r["baseline"] is None:
            assert r["ratio"] is None
        elif r["baseline"]:
            # values and baselines are rounded to 4 decimals, the ratio from the unrounded ones
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline"], rel=1e-2, abs=1e-3)


def test_the_issues_metrics_are_recorded():
    metrics = {os.path.basename(p): {r["metric"] for r in _load(p)} for p in FILES}
    assert {"overhead_p50_ms", "throughput_rps_16_clients"} <= metrics["transport.json"]
    assert "throughput_rps_128_sessions" in metrics["gpu_chat.json"]
    assert {"chunk_latency_p50_ms_batch1", "cache_speedup", "success_rate"} <= metrics["vla.json"]
    assert "starvation_fraction_30hz_64_sessions" in metrics["agents.json"]
    assert {"lost_requests", "duplicate_replies", "requests_answered"} <= metrics["reliability.json"]
    assert {
        "lost_requests_redis_restart_no_persistence",
        "dlq_bytes_after_bad_input_sweep",
        "max_good_wait_s_bad_input",
        "collateral_dead_letters_poison",
        "takeover_s_p95_under_load",
        "record_capture_fraction_max_rate",
    } <= metrics["reliability.json"]
    assert "scaling_efficiency_4_procs" in metrics["scale.json"]
