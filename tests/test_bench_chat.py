"""`vlmq bench chat` end to end on the tiny model (CPU, a private Redis and real worker
processes): the served figure beside both baselines of the same run, the mixed-length
comparison against `--serving batch`, and the worker options the run used in its records."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from ops.cli import main


def test_chat_bench_records_served_throughput_beside_its_baselines(tmp_path):
    out = tmp_path / "gpu_chat.json"
    rc = main(
        ["--log-level", "WARNING", "bench", "chat", "--device", "cpu", "--dtype", "float32", "--preset",
         "tiny", "--sessions", "4", "--procs", "1", "--runs", "3", "--seconds", "1", "--warmup-s", "2",
         "--max-tokens", "4", "--image-size", "64", "--prompt-tokens", "20", "--baseline-requests", "2",
         "--mixed-lengths", "2,4,8", "--batch-serving-wait-ms", "5", "--max-batch", "4",
         "--parts", "baseline,served,mixed", "--option", "prefill_tokens=4096", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    recs = {r["metric"]: r for r in json.loads(out.read_text())}
    served = recs["throughput_rps_4_sessions"]
    assert served["value"] > 0 and served["runs"] == 3 and served["min"] <= served["value"] <= served["max"]
    assert served["baseline"] == recs["baseline_generate_rps_batch4"]["value"] > 0
    assert (
        recs["throughput_rps_4_sessions_vs_seed"]["baseline"] == recs["baseline_generate_rps_batch1"]["value"]
    )
    mixed = recs["throughput_rps_4_sessions_mixed_lengths"]
    assert mixed["value"] > 0
    assert mixed["baseline"] == recs["throughput_rps_4_sessions_mixed_lengths_batch_serving"]["value"] > 0
    assert "--option prefill_tokens=4096" in served["machine"]
    assert "gpu_utilization_4_sessions" not in recs  # no nvidia-smi here, so no samples
    # the client waits longer than the worker holds a request: Redis, reading, replying
    outside = recs["outside_worker_ms_p50_4_sessions"]
    assert 0 < outside["value"] < recs["latency_p50_4_sessions"]["value"] * 1000
    assert all(r["commit"] for r in recs.values())


def test_worker_starts_pool_their_windows(tmp_path):
    """--starts 2 --runs 2: two worker starts, each warmed up and measured for two windows;
    the served figure is the median of all four."""
    out = tmp_path / "gpu_chat.json"
    rc = main(
        ["--log-level", "WARNING", "bench", "chat", "--device", "cpu", "--dtype", "float32", "--preset",
         "tiny", "--sessions", "2", "--procs", "1", "--runs", "2", "--starts", "2", "--seconds", "0.5",
         "--warmup-s", "1", "--max-tokens", "2", "--image-size", "64", "--prompt-tokens", "10",
         "--max-batch", "2", "--parts", "served", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    recs = {r["metric"]: r for r in json.loads(out.read_text())}
    served = recs["throughput_rps_2_sessions"]
    assert served["runs"] == 4 and served["min"] > 0
    with pytest.raises(SystemExit, match="--starts must be at least 1"):
        main(["bench", "chat", "--device", "cpu", "--starts", "0", "--parts", "served", "--out", str(out)])


def test_gpu_utilization_is_the_mean_of_a_windows_samples(tmp_path):
    from datetime import datetime, timedelta

    from ops.bench.chat import Utilization

    t0 = datetime(2026, 12, 7, 9, 0, 0)
    stamp = [(t0 + timedelta(milliseconds=100 * i)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3] for i in range(4)]
    path = tmp_path / "u.csv"
    # nvidia-smi's lines, a card without the field, and a last line cut off mid-write
    path.write_text(
        "".join(f"{s}, {u}\n" for s, u in zip(stamp, (10, 20, 30, 40))) + f"{stamp[3]}, [N/A]\n2026/12/0"
    )
    u = Utilization(str(path))
    lo = t0.timestamp()
    assert u.mean(lo, lo + 0.25) == 20
    assert u.mean(lo + 0.25, lo + 1) == 40
    assert u.mean(lo + 1, lo + 2) is None
    assert Utilization(str(tmp_path / "none.csv")).mean(lo, lo + 1) is None  # no nvidia-smi: no file


def test_the_ab_script_serves_both_sides_and_traces_each_worker(tmp_path):
    """ops/bench/gpu_chat_ab.sh, the GPU run's A/B command, on the CPU path: A as the worker
    is, B and C with their options (C's --prefill-min a bench flag), each worker's trace summary written before the measured
    windows (TRACES=0: the traces themselves are not kept)."""
    import os
    import subprocess

    from tests.helpers import REPO

    env = {
        **os.environ,
        "DEVICE": "cpu",
        "PROFILE": "1",
        "PROFILE_SKIP": "5",
        # a short window: traced and written well inside the warm-up on a loaded CPU too
        "VLMQ_PROFILE_STEPS": "20",
        "WARMUP_S": "4",
        "OUT": str(tmp_path),
        "TRACES": "0",
        "BENCH_ARGS": "--sessions 4 --procs 1 --image-size 64 --max-tokens 4 --seconds 1 --max-batch 4",
    }
    proc = subprocess.run(
        ["bash", "ops/bench/gpu_chat_ab.sh", "vision_graphs=padded", "prefill_graphs=padded,--prefill-min=3,decode_ahead=off"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sides = {"a": [], "b": ["vision_graphs=padded"], "c": ["prefill_graphs=padded", "decode_ahead=off"]}
    for side, options in sides.items():
        recs = {r["metric"]: r for r in json.loads((tmp_path / f"chat_{side}.json").read_text())}
        served = recs["throughput_rps_4_sessions"]
        assert served["min"] > 0  # every window served: the trace was written before them
        for o in options:
            assert f"--option {o}" in served["machine"]
        assert (side == "a") == ("--option" not in served["machine"])
        assert served["machine"].count("--prefill-min 3 ") == (side == "c")
        (summary,) = os.listdir(tmp_path / f"profile_{side}")  # the summary alone: TRACES=0
        assert (tmp_path / f"profile_{side}" / summary).read_text().startswith("20 steps in ")


def test_the_ab_script_repeats_its_sides_interleaved(tmp_path):
    """REPEAT=2: every side twice, in the order a1 b1 a2 b2, each from its own worker start
    into its own file, B's with its option and its variable."""
    import os
    import subprocess

    from tests.helpers import REPO

    env = {
        **os.environ,
        "DEVICE": "cpu",
        "REPEAT": "2",
        "WARMUP_S": "2",
        "OUT": str(tmp_path),
        "BENCH_ARGS": "--sessions 2 --procs 1 --image-size 64 --max-tokens 2 --seconds 0.5 --max-batch 2 --runs 1",
    }
    proc = subprocess.run(
        ["bash", "ops/bench/gpu_chat_ab.sh", "decode_ahead=off,VLMQ_GIL_SWITCH_MS=0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    order = [line.split(":")[0] for line in proc.stdout.splitlines() if line[:1] in "ab" and ":" in line]
    assert order == ["a1", "b1", "a2", "b2"], proc.stdout
    assert proc.stdout.count("VLMQ_GIL_SWITCH_MS=0.5 --option decode_ahead=off") == 2
    for side in order:
        recs = {r["metric"]: r for r in json.loads((tmp_path / f"chat_{side}.json").read_text())}
        served = recs["throughput_rps_2_sessions"]
        assert served["value"] > 0
        assert ("--option decode_ahead=off" in served["machine"]) == side.startswith("b")
