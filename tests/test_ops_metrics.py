"""Metrics: a real `vlmq worker --metrics-port` scraped over HTTP before and after traffic,
and the agent-side metrics (one process and several processes behind one endpoint)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from broker.connection import connect_sync
from broker.embedded import free_port
from broker.keys import Keys
from env_agents.client import AsyncAgentClient
from ops.metrics import names as n
from ops.metrics.agents import AgentMetrics, start_agent_metrics
from ops.metrics.scrape import fetch, quantile
from schemas.messages import TextActionRequest
from tests.helpers import REPO, WorkerThread, start_worker_process, stop_process, synthetic_settings, wait_for

pytest.importorskip("prometheus_client")


def _text(i: int) -> TextActionRequest:
    return TextActionRequest(messages=[{"role": "user", "content": f"go {i}"}], step=i)


async def _traffic(settings, session: str, count: int, metrics: AgentMetrics = None) -> None:
    async with AsyncAgentClient(session, settings=settings) as client:
        for i in range(count):
            if metrics:
                metrics.sent("text_action")
            reply = await client.request(_text(i), timeout=30)
            if metrics:
                metrics.observe(reply)


def test_worker_metrics_appear_and_move_under_traffic(settings):
    port = free_port()
    proc = start_worker_process(
        settings, "--backend", "synthetic", "--metrics-port", str(port), "--max-wait-ms", "5"
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def scrapable() -> bool:
            try:
                return fetch(url, timeout=1).value(n.WORKERS_ALIVE.name) >= 1
            except OSError:
                return False

        assert wait_for(scrapable, 60, 0.2), "worker /metrics never came up"
        before = fetch(url)
        # Every declared worker and Redis metric is exported, even before its first sample.
        for spec in n.WORKER_METRICS + n.REDIS_METRICS:
            assert before.types.get(spec.name.removesuffix("_total")) == spec.type, spec.name
        assert before.value(n.REQUESTS.name) == 0

        asyncio.run(_traffic(settings, "m1", 12))
        # One poison message: not msgpack. It gets an error reply and a dead letter.
        r = connect_sync(settings)
        keys = Keys(settings.prefix, settings.partitions)
        r.xadd(
            keys.stream_for("text_action", "m1"),
            {"v": "1", "kind": "text_action", "rid": "bad1", "sid": "m1", "body": b"\xc1"},
        )

        def moved() -> bool:
            s = fetch(url)
            return s.value(n.ERRORS.name, code="malformed") >= 1 and s.value(n.DEAD_LETTER_ENTRIES.name) >= 1

        assert wait_for(moved, 30, 0.3)
        after = fetch(url)
        kind = {"kind": "text_action"}
        assert after.value(n.REQUESTS.name, **kind) == 12
        assert after.value(n.REPLIES.name, status="ok", **kind) == 12
        assert after.value(n.REPLIES.name, status="error", **kind) == 1
        assert after.value(n.DEAD_LETTERS.name, code="malformed", **kind) == 1
        assert after.value(n.BATCH_SIZE.name + "_sum", **kind) == 12
        assert 1 <= after.value(n.BATCHES.name, **kind) <= 12
        for spec in (n.STREAM_WAIT, n.SCHEDULE_WAIT, n.REQUEST_LATENCY):  # valid requests only
            assert after.value(spec.name + "_count", **kind) == 12, spec.name
        assert after.value(n.WORKER_LATENCY.name + "_count", **kind) == 13  # every reply
        assert after.value(n.STAGE_SECONDS.name + "_count", stage="model", **kind) >= 1
        assert after.value(n.STAGE_SECONDS.name + "_count", stage="reply", **kind) >= 1
        assert quantile(0.5, after.buckets(n.REQUEST_LATENCY.name, **kind)) > 0
        assert after.value(n.REDIS_UP.name) == 1
        assert after.value(n.WORKERS_ALIVE.name) == 1
        assert after.value(n.STREAM_CONSUMERS.name, **kind) == 1
        assert after.value(n.WORKER_INFO.name, backend="synthetic") == 1
        # The heartbeat tells `vlmq top` where to scrape.
        (hb_key,) = r.scan_iter(match=keys.workers_pattern())
        assert r.hget(hb_key, "metrics_port") == str(port).encode()
    finally:
        assert stop_process(proc) == 0


def test_agent_metrics_latency_and_legs(settings):
    metrics = AgentMetrics().serve(0, "127.0.0.1")
    try:
        with WorkerThread(synthetic_settings(settings)):
            asyncio.run(_traffic(settings, "a1", 8, metrics))
        metrics.failed("text_action", "timeout")
        s = fetch(metrics.server.url)
        assert s.value(n.AGENT_REQUESTS.name, kind="text_action") == 8
        assert s.value(n.AGENT_REPLIES.name, kind="text_action", status="ok") == 8
        assert s.value(n.AGENT_LATENCY.name + "_count", kind="text_action") == 8
        for leg in ("to_worker", "in_worker", "to_agent"):
            assert s.value(n.AGENT_TRANSIT.name + "_count", kind="text_action", leg=leg) == 8
        assert s.value(n.AGENT_ERRORS.name, code="timeout") == 1
        # The legs add up to the whole (same clock on one host).
        total = s.value(n.AGENT_LATENCY.name + "_sum")
        legs = s.value(n.AGENT_TRANSIT.name + "_sum")
        assert legs == pytest.approx(total, rel=1e-6, abs=1e-6)
    finally:
        metrics.close()


_CHILD = """
import sys
from ops.metrics.agents import AgentMetrics
m = AgentMetrics()
m.sent("action_chunk", int(sys.argv[1]))
m.step("miniworld", int(sys.argv[1]))
"""


def test_agent_metrics_from_several_processes_on_one_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for count in (3, 4):
        subprocess.run([sys.executable, "-c", _CHILD, str(count)], cwd=REPO, check=True, env=dict(os.environ))
    metrics = start_agent_metrics(0, "127.0.0.1", multiprocess=True)
    try:
        s = fetch(metrics.server.url)
        assert s.value(n.AGENT_REQUESTS.name, kind="action_chunk") == 7
        assert s.value(n.AGENT_STEPS.name, env="miniworld") == 7
    finally:
        metrics.close()


def test_metric_names_follow_conventions():
    for spec in n.ALL.values():
        assert spec.name.startswith("vlmq_")
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        if spec.type == "histogram":
            assert spec.name.endswith(("_seconds", "_requests")), spec.name


def test_vlmq_agents_metrics_port_exports_what_its_processes_did(settings, tmp_path, monkeypatch):
    """`vlmq agents --metrics-port`: two agent processes, one endpoint, real worker."""
    from env_agents.cli import spec_from_args
    from env_agents.runner.launcher import launch
    from ops.cli import build_parser
    from tests.helpers import WorkerThread, synthetic_settings

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    args = build_parser().parse_args(
        ["agents", "--env", "Frames-v0", "--task", "action_chunk", "--n", "2", "--procs", "2", "--size", "32",
         "--rate-hz", "0", "--max-steps", "40", "--metrics-port", "1", "--redis-url", settings.url,
         "--prefix", settings.prefix]
    )  # fmt: skip
    spec = spec_from_args(args)
    assert spec.metrics
    with WorkerThread(synthetic_settings(settings, kinds=("action_chunk",))):
        result = launch(spec, progress=False)
    assert not result.failures
    metrics = start_agent_metrics(0, "127.0.0.1", multiprocess=True)
    try:
        s = fetch(metrics.server.url)
        assert s.value(n.AGENT_STEPS.name, env="Frames-v0") == 80
        assert s.value(n.AGENT_REQUESTS.name, kind="action_chunk") >= 2
        assert s.value(n.AGENT_REPLIES.name, kind="action_chunk", status="ok") >= 2
        assert s.value(n.AGENT_EPISODES.name, env="Frames-v0") == 2
    finally:
        metrics.close()
