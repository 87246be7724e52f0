"""`vlmq bench agents`: one metric name has one meaning (mode, env, worker and chat load are
in the name), the baselines are the right runs, and a short real run (synthetic worker,
chat load beside it) writes the records it names."""

from __future__ import annotations

import argparse
import json

from ops.bench import agents
from ops.cli import build_parser


def _args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "agents", *extra])


def test_metric_names_carry_everything_that_changes_their_meaning():
    gpu = _args("--worker", "external", "--redis-url", "redis://x")
    assert (
        agents.metric_name("starvation_fraction", gpu, 64, "fixed") == "starvation_fraction_30hz_64_sessions"
    )
    assert agents.metric_name("starvation_fraction", gpu, 64, "adaptive").endswith("_64_sessions_adaptive")
    assert agents.metric_name("starvation_fraction", gpu, 64, "sync").endswith("_64_sessions_sync")
    mixed = _args("--worker", "external", "--chat-sessions", "16", "--chat-max-tokens", "256")
    assert agents.metric_name("chunk_latency_p99_ms", mixed, 64, "fixed") == (
        "chunk_latency_p99_ms_30hz_64_sessions_mixed"
    )
    other = _args(
        "--worker", "external", "--chat-sessions", "8", "--chat-max-tokens", "32", "--threshold", "0.7"
    )
    assert agents.metric_name("chat_rps", other, 64, "fixed") == "chat_rps_30hz_64_sessions_mixed_8x32_g0p7"
    frames = _args("--env", "Frames-v0", "--latency-ms", "100")
    assert agents.metric_name("starvation_fraction", frames, 16, "fixed") == (
        "starvation_fraction_30hz_16_sessions_frames_synthetic_100ms"
    )
    tagged = _args("--worker", "external", "--tag", "_gl_on_gpu", "--chat-sessions", "16")
    assert agents.metric_name("starvation_fraction", tagged, 64, "adaptive") == (
        "starvation_fraction_30hz_64_sessions_gl_on_gpu_mixed_adaptive"
    )


def _summary(starved: float, rps: float) -> dict:
    keys = {k for _, k, _ in agents.FAMILIES + agents.CHAT_FAMILIES} | {"mean_g"}
    out = dict.fromkeys(keys, 1.0)
    out.update(starvation_fraction=starved, requests_per_step=rps)
    return out


def test_fixed_and_adaptive_are_measured_against_sync_and_adaptive_requests_against_fixed():
    args = _args("--worker", "external")
    runs = {
        "sync": [_summary(0.3, 0.02), _summary(0.4, 0.02), _summary(0.5, 0.02)],
        "fixed": [_summary(0.0, 0.04), _summary(0.1, 0.04), _summary(0.0, 0.04)],
        "adaptive": [_summary(0.0, 0.05), _summary(0.0, 0.06), _summary(0.0, 0.07)],
    }
    recs = {r.metric: r for r in agents.build_records(args, 64, runs, "test machine")}
    assert len(recs) == 3 * len(agents.FAMILIES) + 1  # + mean_g of the adaptive mode
    fixed = recs["starvation_fraction_30hz_64_sessions"]
    assert (fixed.value, fixed.min, fixed.max, fixed.runs, fixed.baseline) == (0.0, 0.0, 0.1, 3, 0.4)
    assert recs["starvation_fraction_30hz_64_sessions_sync"].baseline is None
    cost = recs["requests_per_env_step_30hz_64_sessions_adaptive"]
    assert cost.baseline == 0.04 and cost.ratio == 1.5  # adaptive asked 1.5x as often as fixed g
    assert recs["requests_per_env_step_30hz_64_sessions"].baseline == 0.02  # fixed vs sync


def test_no_chat_latency_where_no_chat_request_finished_in_a_window():
    done = [(10.5, 2.0, True), (11.0, 3.0, True), (11.5, 9.0, False)]  # (finished at, seconds, ok)
    assert agents.chat_figures(done, (10.0, 12.0)) == {
        "chat_rps": 1.0,
        "chat_errors": 1.0,
        "chat_latency_p50_s": 2.5,
    }
    starved = agents.chat_figures(done, (20.0, 22.0))  # the control traffic had the worker
    assert starved["chat_rps"] == 0.0 and starved["chat_latency_p50_s"] is None

    args = _args("--worker", "external", "--chat-sessions", "16", "--chat-max-tokens", "256")
    runs = {"fixed": [_summary(0.0, 0.04) | starved for _ in range(3)]}
    names = {r.metric for r in agents.build_records(args, 64, runs, "test machine")}
    assert "chat_rps_30hz_64_sessions_mixed" in names  # 0 requests/s is a measurement
    assert "chat_latency_p50_s_30hz_64_sessions_mixed" not in names  # 0 s would not be


def test_a_short_run_with_a_chat_load_writes_what_it_names(tmp_path):
    out = tmp_path / "agents.json"
    out.write_text(json.dumps([{"metric": "kept", "value": 1.0, "unit": "x", "machine": "m"}]))
    args = _args(
        "--env", "Frames-v0", "--size", "16", "--sessions", "4", "--procs", "1", "--seconds", "3",
        "--runs", "1", "--warmup-s", "0", "--latency-ms", "20", "--chunk", "20", "--chat-sessions", "2",
        "--chat-procs", "1", "--chat-max-tokens", "8", "--chat-prompt-tokens", "20", "--out", str(out),
    )  # fmt: skip
    assert agents.run(args) == 0
    recs = {r["metric"]: r for r in json.loads(out.read_text())}
    assert "kept" in recs  # the records of other metrics stay
    suffix = "_30hz_4_sessions_frames_synthetic_20ms_mixed_2x8"
    for mode in ("", "_adaptive", "_sync"):
        assert recs["starvation_fraction" + suffix + mode]["runs"] == 1
        assert recs["chat_rps" + suffix + mode]["value"] > 0  # the chat sessions were answered
    assert "Frames-v0 16 px (synthetic frames)" in recs["chat_rps" + suffix]["machine"]
    assert "beside 2 closed-loop chat sessions" in recs["chat_rps" + suffix]["machine"]
