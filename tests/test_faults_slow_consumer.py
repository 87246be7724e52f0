"""A slow consumer must not make memory grow without bound, in Redis or in the worker.

Three bounds hold it: the request backlog (max_backlog: publishers are refused or wait),
the worker's prefetch (it reads at most read_ahead requests ahead of the model), and the
reply streams (trimmed to reply_maxlen, expiring after reply_ttl_s) for agents that stop
reading. Dead letters are capped by dlq_maxlen. Each test floods a slow worker and checks
the bound with Redis's own numbers on a private redis-server.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from broker.connection import connect_async, connect_sync
from broker.keys import Keys
from broker.publisher import BacklogFull, Publisher
from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from inference_worker.events import WorkerObserver
from schemas.messages import ActionChunkRequest, ChatMessage, TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(180)

FRAME = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)  # 48 KiB raw


class Sampler:
    """Samples a value in a background thread and keeps the maximum."""

    def __init__(self, read, period: float = 0.01) -> None:
        self.read, self.period, self.max = read, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max = max(self.max, self.read())
            time.sleep(self.period)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


class HeldCount(WorkerObserver):
    """Requests the worker holds in memory (queued + in the model), at every admission."""

    def __init__(self) -> None:
        self.worker = None
        self.max = 0

    def on_admitted(self, kind, item) -> None:
        w = self.worker
        self.max = max(self.max, len(w.core) + len(w.in_flight) + 1)


def _used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


def test_flood_against_a_slow_worker_is_bounded_everywhere(fresh_redis) -> None:
    broker = BrokerSettings(url=fresh_redis.url, prefix="slow", max_backlog=40, claim_min_idle_ms=2000)
    r = connect_sync(broker)
    stream = Keys(broker.prefix).request_stream("action_chunk", 0)
    held = HeldCount()
    settings = synthetic_settings(
        broker, kinds=("action_chunk",), max_batch=4, prefetch=8, synthetic_latency_ms=40
    )
    worker = WorkerThread(settings, observers=[held])
    held.worker = worker.worker
    baseline = _used_memory(r)

    async def flood(session: str) -> tuple:
        accepted, refused = [], 0
        async with AsyncAgentClient(session, settings=broker) as client:
            for step in range(150):
                try:
                    accepted.append(await client.submit(ActionChunkRequest(step=step, image=FRAME)))
                except BacklogFull:
                    refused += 1
                    await asyncio.sleep(0.005)
            replies = await asyncio.wait_for(asyncio.gather(*accepted), 120)
        return len(accepted), refused, replies

    async def main():
        return await asyncio.gather(*(flood(f"flood-{i}") for i in range(4)))

    with worker, Sampler(lambda: r.xlen(stream)) as backlog, Sampler(lambda: _used_memory(r)) as memory:
        results = asyncio.run(main())
    accepted = sum(a for a, _, _ in results)
    refused = sum(f for _, f, _ in results)
    assert refused > 0, "the flood never reached the backlog bound"
    assert all(rep.ok for _, _, replies in results for rep in replies)
    assert accepted + refused == 4 * 150
    # The bound is soft by one request per concurrent publisher (see broker/publisher.py).
    assert backlog.max <= broker.max_backlog + 4, backlog.max
    assert held.max <= settings.read_ahead, held.max
    # 600 frames of 48 KiB unbounded would be ~29 MiB; the bound keeps ~44 of them.
    grown = (memory.max - baseline) / 2**20
    assert grown < 12, f"Redis grew by {grown:.1f} MiB"
    assert r.xlen(stream) == 0


def test_replies_nobody_reads_are_trimmed_and_expire(fresh_redis) -> None:
    broker = BrokerSettings(url=fresh_redis.url, prefix="deaf", reply_maxlen=50, reply_ttl_s=120)
    r = connect_sync(broker)
    reply_stream = Keys(broker.prefix).reply_stream("deaf-agent")

    async def publish(n: int) -> None:
        redis = connect_async(broker)
        pub = Publisher(redis, broker)
        for step in range(n):
            msg = TextActionRequest(
                session_id="deaf-agent", step=step, messages=[ChatMessage(role="user", content="x" * 2000)]
            )
            await pub.publish(msg)
        await redis.aclose()

    with WorkerThread(synthetic_settings(broker, kinds=("text_action",))) as worker:
        asyncio.run(publish(400))
        assert wait_for(lambda: worker.worker.stats["requests"] >= 400, 60)
        after_first = _used_memory(r)
        assert r.xlen(reply_stream) == broker.reply_maxlen
        asyncio.run(publish(400))
        assert wait_for(lambda: worker.worker.stats["requests"] >= 800, 60)
        after_second = _used_memory(r)
    assert r.xlen(reply_stream) == broker.reply_maxlen  # exact trim, not approximate
    assert 0 < r.ttl(reply_stream) <= broker.reply_ttl_s
    # Steady state: 400 more replies of ~2 KiB each left no trace beyond the 50 kept.
    assert after_second - after_first < 512 * 1024, (after_first, after_second)


def test_dead_letters_are_capped(fresh_redis) -> None:
    """Expired requests are copied to dead letters (full body, for inspection and replay):
    dlq_maxlen caps how many stay, so a lagging session cannot fill Redis with them."""
    broker = BrokerSettings(url=fresh_redis.url, prefix="dlq", dlq_maxlen=20)
    r = connect_sync(broker)
    dlq = Keys(broker.prefix).dead_letters("action_chunk", 0)

    async def publish_expired(n: int) -> None:
        redis = connect_async(broker)
        pub = Publisher(redis, broker)
        for step in range(n):
            req = ActionChunkRequest(session_id="lagging", step=step, image=FRAME, deadline=time.time() - 1)
            await pub.publish(req)
        await redis.aclose()

    with WorkerThread(synthetic_settings(broker, kinds=("action_chunk",))) as worker:
        asyncio.run(publish_expired(300))
        assert wait_for(lambda: worker.worker.stats["dead_letters"] >= 300, 60)
    # XADD MAXLEN ~ trims whole radix-tree nodes: the cap is approximate, never far over.
    assert broker.dlq_maxlen <= r.xlen(dlq) <= broker.dlq_maxlen + 100, r.xlen(dlq)
    assert _used_memory(r) < 40 * 2**20
