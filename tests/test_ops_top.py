"""`vlmq top` against a real worker with metrics under live traffic."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from broker.embedded import free_port
from env_agents.client import AsyncAgentClient
from ops.cli import build_parser
from ops.metrics import WorkerMetrics
from ops.top import Top
from schemas.messages import TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings, wait_for

pytest.importorskip("prometheus_client")
pytest.importorskip("rich")


class Traffic(threading.Thread):
    """Requests from two sessions, back to back, until stopped."""

    def __init__(self, settings) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.done = threading.Event()
        self.sent = 0

    def run(self) -> None:
        async def session(name: str) -> None:
            async with AsyncAgentClient(name, settings=self.settings) as client:
                while not self.done.is_set():
                    msg = [{"role": "user", "content": f"step {self.sent}"}]
                    await client.request(TextActionRequest(messages=msg, step=self.sent), timeout=30)
                    self.sent += 1

        async def main() -> None:
            await asyncio.gather(session("top-a"), session("top-b"))

        asyncio.run(main())


def test_top_shows_rates_latency_streams_and_workers(settings, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes its tables to the terminal
    port = free_port()
    ws = synthetic_settings(settings, metrics_port=port, synthetic_latency_ms=2.0, max_wait_ms=2.0)
    metrics = WorkerMetrics(ws).serve(port, "127.0.0.1")
    traffic = Traffic(settings)
    try:
        with WorkerThread(ws, observers=[metrics]) as worker:
            traffic.start()
            assert wait_for(lambda: traffic.sent > 5, 30)
            top = Top(settings, [])
            try:
                top.sample()
                time.sleep(1.5)  # longer than the heartbeat (0.5 s): worker counters move too
                frame = top.sample()
            finally:
                top.close()

            (kind,) = [k for k in frame.kinds if k.kind == "text_action"]
            assert kind.requests_per_s > 0
            assert kind.mean_batch is not None and kind.mean_batch >= 1
            p50, p95, p99 = kind.latency_ms
            assert p50 is not None and 0 < p50 <= p95 <= p99
            assert kind.model_ms is not None and kind.model_ms > 0
            (row,) = frame.workers
            assert row.name == worker.worker.name and row.metrics == "ok"
            assert row.requests_per_s is not None and row.requests_per_s > 0
            assert any(s["kind"] == "text_action" for s in frame.streams)

            # The command itself, one frame.
            args = build_parser().parse_args(
                ["top", "--redis-url", settings.url, "--prefix", settings.prefix, "--once", "--interval", "1"]
            )
            assert args.func(args) == 0
            out = capsys.readouterr().out
            assert "vlmq top" in out and "text_action" in out and worker.worker.name in out
            traffic.done.set()
            traffic.join(30)
    finally:
        traffic.done.set()
        metrics.close()
