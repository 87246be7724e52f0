"""Every committed benchmark result follows the record format of the developers' guide."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.helpers import REPO

FILES = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json")))
KEYS = {"metric", "value", "unit", "baseline", "ratio", "machine", "date", "command"}


def _load(path: str) -> list:
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_result_records(path):
    records = _load(path)
    assert isinstance(records, list) and records
    for r in records:
        assert set(r) == KEYS, r
        assert isinstance(r["metric"], str) and isinstance(r["value"], (int, float))
        assert r["machine"] and r["date"] and r["command"] and r["unit"]
        if r["baseline"] is None:
            assert r["ratio"] is None
        elif r["baseline"]:
            # values and baselines are rounded to 4 decimals, the ratio from the unrounded ones
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline"], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_one_record_per_metric_name(path):
    # A name recorded twice in one file would have two meanings (or a stale figure beside a new one).
    names = [r["metric"] for r in _load(path)]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_the_issues_metrics_are_recorded():
    metrics = {os.path.basename(p): {r["metric"] for r in _load(p)} for p in FILES}
    assert {"overhead_p50_ms", "throughput_rps_16_clients"} <= metrics["transport.json"]
    assert "throughput_rps_128_sessions" in metrics["gpu_chat.json"]
    assert {"chunk_latency_p50_ms_batch1", "cache_speedup", "success_rate"} <= metrics["vla.json"]
    assert "starvation_fraction_30hz_64_sessions" in metrics["agents.json"]
    assert {"lost_requests", "duplicate_replies", "requests_answered"} <= metrics["reliability.json"]
    assert "scaling_efficiency_4_procs" in metrics["scale.json"]
