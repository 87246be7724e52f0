"""Every committed benchmark result follows the record format of the developers' guide:
the median of its runs with their number, min and max, the commit that ran, and one
meaning per metric name in a file."""

from __future__ import annotations

import glob
import json
import os

import pytest

from tests.helpers import REPO

FILES = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json")))
KEYS = {
    "metric",
    "value",
    "unit",
    "baseline",
    "ratio",
    "machine",
    "date",
    "command",
    "commit",
    "runs",
    "min",
    "max",
}
# Files whose every figure is a repeated measurement (counts and single evaluations live elsewhere).
ALL_REPEATED = ("transport", "scale", "ops", "gpu_kernels")
# The issues' headline figures in the other files, each the median of >= 3 runs.
REPEATED = {
    "gpu_chat.json": ["throughput_rps_128_sessions"],
    "vla.json": ["chunk_latency_p50_ms_batch1", "cache_speedup"],
    "multiworker_1gpu.json": ["throughput_rps_"],
}


def _load(path: str) -> list:
    with open(path) as f:
        return json.load(f)


def _needs_runs(name: str, metric: str) -> bool:
    if name.split(".")[0].startswith(ALL_REPEATED):
        return True
    return any(metric.startswith(m) for m in REPEATED.get(name, ()))


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_result_records(path):
    name = os.path.basename(path)
    records = _load(path)
    assert isinstance(records, list) and records
    metrics = [r.get("metric") for r in records]
    assert len(metrics) == len(set(metrics)), f"{name}: a metric name twice: one meaning per name"
    for r in records:
        assert set(r) == KEYS, f"{name}: {r.get('metric')} has {sorted(set(r) ^ KEYS)} (regenerate it)"
        assert r["min"] <= r["value"] <= r["max"]
        assert isinstance(r["metric"], str) and isinstance(r["value"], (int, float))
        assert r["machine"] and r["date"] and r["command"] and r["unit"] and r["commit"]
        assert isinstance(r["runs"], int) and r["runs"] >= 1
        assert r["min"] <= r["value"] + 1e-3 and r["value"] <= r["max"] + 1e-3, r
        if _needs_runs(name, r["metric"]):
            assert r["runs"] >= 3, f"{name}: {r['metric']} is one run, not the median of >= 3"
        if r["baseline"] is None:
            assert r["ratio"] is None
        elif r["baseline"]:
            # values and baselines are rounded (6 significant digits), the ratio from the unrounded ones
            assert r["ratio"] == pytest.approx(r["value"] / r["baseline"], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(p) for p in FILES])
def test_one_record_per_metric_name(path):
    # A name recorded twice in one file would have two meanings (or a stale figure beside a new one).
    names = [r["metric"] for r in _load(path)]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_the_issues_metrics_are_recorded():
    records = {os.path.basename(p): {r["metric"]: r for r in _load(p)} for p in FILES}
    metrics = {name: set(recs) for name, recs in records.items()}
    assert {"overhead_p50_ms", "throughput_rps_16_clients"} <= metrics["transport.json"]
    # against the same raw bytes over HTTP, and PNG-in-JSON beside it
    assert records["transport.json"]["throughput_rps_16_clients"]["baseline"]
    assert records["transport.json"]["throughput_rps_16_clients_vs_png_json"]["baseline"]
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
    assert {"vllm_hf_greedy_agreement", "vllm_cpu_rps", "hf_cpu_rps"} <= metrics["backends.json"]
