"""The CPU benchmarks run end to end (tiny windows): every configuration measured, every
record in the results format, the fair baselines present."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", "--log-level", "WARNING", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(path) -> dict:
    records = json.loads(path.read_text())
    for r in records:
        assert r["commit"] and r["runs"] >= 1 and r["min"] <= r["value"] <= r["max"], r
    return {r["metric"]: r for r in records}


def test_bench_transport_measures_vlmq_and_both_http_baselines(tmp_path):
    out = tmp_path / "transport.json"
    proc = _bench(
        "transport", "--clients", "2", "--sessions-per-process", "1", "--rounds", "2",
        "--duration", "0.5", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = _records(out)
    assert recs["throughput_rps_2_clients"]["runs"] == 2
    for metric in (
        "throughput_rps_2_clients",
        "round_trip_p50_ms_1_client",
        "throughput_rps_2_clients_vs_png_json",
    ):
        assert recs[metric]["value"] > 0 and recs[metric]["baseline"] > 0, metric


def test_bench_scale_measures_every_configuration(tmp_path):
    out = tmp_path / "scale.json"
    proc = _bench(
        "scale", "--procs", "1,4", "--workers", "1", "--repeats", "1", "--duration", "0.5", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = _records(out)
    assert {"rps_1_procs_1_workers", "rps_4_procs_1_workers", "redis_cpu_4_procs_1_workers"} <= set(recs)
    assert recs["scaling_efficiency_4_procs_1_worker"]["value"] > 0
    assert (tmp_path / "scale.png").stat().st_size > 0
