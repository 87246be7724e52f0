"""What the agents runner reports while it runs: live sessions and timeouts in the agent
metrics, a progress bar that moves with env steps, and an export that refuses traces it
has nothing to export from."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from broker.connection import connect_async
from env_agents.control.controller import ControlConfig, Controller
from env_agents.control.tracer import Tracer, Tracers
from env_agents.runner.launcher import launch
from env_agents.runner.progress import ProgressBar
from env_agents.runner.session import make_session_adapter, run_session
from env_agents.runner.spec import RunSpec
from ops.metrics import names as n
from tests.helpers import WorkerThread, synthetic_settings

pc = pytest.importorskip("prometheus_client")


def _metrics():
    from ops.metrics.agents import AgentMetrics, MetricsTracer

    registry = pc.CollectorRegistry()
    return registry, MetricsTracer("Frames-v0", AgentMetrics(registry=registry))


def test_sessions_gauge_counts_the_sessions_running(settings):
    registry, metrics = _metrics()
    seen = []

    class Probe(Tracer):
        def step(self, session, t, item, env_action, result) -> None:
            seen.append(registry.get_sample_value(n.AGENT_SESSIONS.name))

    control = ControlConfig(kind="action_chunk", mode="sync", rate_hz=0, max_steps=10)
    spec = RunSpec("Frames-v0", control, settings, n=3, size=16, session_prefix=f"gauge-{time.time_ns()}")

    async def main():
        redis = connect_async(settings)
        try:
            await asyncio.gather(
                *(
                    run_session(spec, i, make_session_adapter(spec, i), redis, lambda *a: None,
                                Tracers([metrics, Probe()]))
                    for i in range(3)
                )
            )  # fmt: skip
        finally:
            await redis.aclose()

    with WorkerThread(synthetic_settings(settings, kinds=("action_chunk",))):
        asyncio.run(main())
    assert len(seen) == 30 and max(seen) == 3  # all three live while they stepped
    assert registry.get_sample_value(n.AGENT_SESSIONS.name) == 0  # and none after


def test_timeouts_are_errors_in_the_stats_the_metrics_and_the_traces(settings, tmp_path):
    # No worker serves this prefix: every request times out; after two the episode is abandoned.
    from env_agents.traces.store import TraceStore

    registry, metrics = _metrics()
    traces = TraceStore(str(tmp_path / "t.db"))
    control = ControlConfig(
        kind="action_chunk", rate_hz=30, max_steps=30, request_timeout_s=0.3, max_errors=2
    )

    async def main():
        from env_agents.client import AsyncAgentClient
        from env_agents.envs.frames import FramesAdapter

        async with AsyncAgentClient("t-0", settings=settings, raise_on_error=False) as client:
            ctl = Controller("t-0", FramesAdapter(size=16), client, control, Tracers([metrics, traces]))
            return await ctl.run_episode(0, 0)

    stats = asyncio.run(main())
    assert stats.timeouts == 2 and stats.errors == 2 and "abandoned" in stats.error
    assert registry.get_sample_value(n.AGENT_ERRORS.name, {"kind": "action_chunk", "code": "timeout"}) == 2
    assert registry.get_sample_value(n.AGENT_REQUESTS.name, {"kind": "action_chunk"}) == 2
    rows = traces.db.execute("SELECT kind, ok, reply FROM requests").fetchall()
    assert rows == [("action_chunk", 0, '{"code": "timeout"}')] * 2
    traces.close()


def test_progress_counts_env_steps_while_episodes_run(settings):
    # Episodes end at the env's 40 steps, before max_steps = 90: the bar's total shrinks to fit.
    control = ControlConfig(kind="action_chunk", rate_hz=30, max_steps=90)
    spec = RunSpec(
        "Frames-v0", control, settings, n=2, size=16, env_options={"max_episode_steps": 40},
        session_prefix=f"progress-{time.time_ns()}",
    )  # fmt: skip
    events = []
    with WorkerThread(synthetic_settings(settings, kinds=("action_chunk",), synthetic_latency_ms=5)):
        result = launch(spec, progress=False, in_process=True, on_event=lambda w, p: events.append((w, p)))
    assert not result.failures
    first_episode = next(i for i, (w, _) in enumerate(events) if w == "episode")
    early = [p for w, p in events[:first_episode] if w == "progress"]
    assert early and sum(p["steps"] for p in early) > 0  # the bar moved before any episode ended
    progress = [p for w, p in events if w == "progress"]
    assert sum(p["steps"] for p in progress) == result.summary["steps"] == 80
    assert sum(p["requests"] for p in progress) == result.summary["requests"]

    bar = ProgressBar(spec, file=io.StringIO())
    assert bar.total == 180
    for what, payload in events:
        bar.take(what, payload)
    assert bar.n == bar.total == 80 and bar.episodes == 2
    bar.close()


def test_traces_export_refuses_action_chunk_traces_and_empty_selections(settings, tmp_path):
    from env_agents.traces.sft import NothingToExport, export_sft
    from ops.cli import main

    db = tmp_path / "chunks.db"
    control = ControlConfig(kind="action_chunk", mode="sync", rate_hz=0, max_steps=5)
    spec = RunSpec(
        "Frames-v0", control, settings, n=1, size=16, traces=str(db), session_prefix=f"tr-{time.time_ns()}"
    )
    with WorkerThread(synthetic_settings(settings, kinds=("action_chunk",))):
        assert not launch(spec, progress=False, in_process=True).failures
    out = tmp_path / "sft"
    with pytest.raises(SystemExit) as exc:
        main(["traces", "export", "--db", str(db), "--out-dir", str(out)])
    message = str(exc.value.code)
    assert "action_chunk" in message and "vlmq vla record" in message
    assert not out.exists()  # nothing written

    # Chat traces, but a filter that leaves no episode: an error too, and no empty files.
    chat_db = tmp_path / "chat.db"
    chat = ControlConfig(
        kind="text_action", mode="sync", rate_hz=0, max_steps=2, request_fields={"max_tokens": 4}
    )
    spec = RunSpec(
        "MiniWorld-OneRoom-v0", chat, settings, n=1, size=16, traces=str(chat_db),
        session_prefix=f"trc-{time.time_ns()}",
    )  # fmt: skip
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        assert not launch(spec, progress=False, in_process=True).failures
    with pytest.raises(NothingToExport, match="no sample left"):
        export_sft(str(chat_db), str(out), min_steps=100)
    assert not (out / "train.jsonl").exists() and not (out / "val.jsonl").exists()
    counts = export_sft(str(chat_db), str(out), val_fraction=0.0)
    assert counts.train_samples == 2
