"""The one retry policy of Redis I/O (broker/retry.py): bounded delays, jitter within its
range, giving up when asked, and the loops and redis-py's Retry that use it."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.retry import RetryPolicy
from broker.settings import BrokerSettings


def test_delays_double_from_the_base_up_to_the_cap():
    policy = RetryPolicy(base_s=0.01, cap_s=0.5, jitter=0.0)
    assert [policy.delay(n) for n in range(8)] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5]
    assert policy.delay(10_000) == 0.5  # no overflow, however long the outage


def test_jitter_stays_in_its_range_and_spreads():
    for jitter in (0.25, 1.0):
        policy = RetryPolicy(base_s=0.1, cap_s=100.0, jitter=jitter)
        for n in range(5):
            full = 0.1 * 2**n
            got = [policy.delay(n) for _ in range(300)]
            assert all((1 - jitter) * full <= d <= full for d in got), (jitter, n)
            assert max(got) - min(got) > 0.5 * jitter * full  # not one fixed value
    capped = RetryPolicy(base_s=1.0, cap_s=2.0, jitter=1.0)
    assert all(0.0 <= capped.delay(6) <= 2.0 for _ in range(100))


def test_bad_bounds_are_refused():
    for bad in (dict(jitter=1.5), dict(base_s=-1.0), dict(attempts=-1)):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_attempts_bound_the_delays():
    assert len(list(RetryPolicy(attempts=5).delays())) == 5
    assert list(RetryPolicy(attempts=0).delays()) == []
    endless = RetryPolicy().delays()
    assert len([next(endless) for _ in range(1000)]) == 1000


def test_no_delay_ends_past_the_deadline():
    policy = RetryPolicy(base_s=0.02, cap_s=1.0, jitter=0.0, deadline_s=0.15)
    t0 = time.monotonic()
    slept = []
    for delay in policy.delays():
        time.sleep(delay)
        slept.append(delay)
    assert slept == [0.02, 0.04, 0.08]  # the next, 0.16, would end past 0.15
    assert time.monotonic() - t0 < 0.15 + 0.05
    assert list(RetryPolicy(deadline_s=0.0).delays()) == []


class Flaky:
    def __init__(self, failures: int, error: Optional[Exception] = None) -> None:
        self.failures, self.calls = failures, 0
        self.error = error or RedisConnectionError("down")

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_run_retries_until_it_succeeds():
    fn = Flaky(3)
    assert asyncio.run(RetryPolicy(base_s=0.001, attempts=5).run(fn)) == "ok"
    assert fn.calls == 4


def test_run_gives_up_when_the_attempts_run_out():
    fn = Flaky(10)
    with pytest.raises(RedisConnectionError):
        asyncio.run(RetryPolicy(base_s=0.001, attempts=2).run(fn))
    assert fn.calls == 3  # the first try and two retries


def test_run_gives_up_when_retry_if_says_no():
    fn = Flaky(10, ValueError("a bug, not Redis"))
    seen = []

    def retry_if(exc: Exception) -> bool:
        seen.append(exc)
        return not isinstance(exc, ValueError)

    with pytest.raises(ValueError):
        asyncio.run(RetryPolicy(base_s=0.001).run(fn, retry_if=retry_if))
    assert fn.calls == 1 and len(seen) == 1


def test_run_gives_up_at_the_deadline():
    fn = Flaky(10**6)
    t0 = time.monotonic()
    with pytest.raises(RedisConnectionError):
        asyncio.run(RetryPolicy(base_s=0.01, cap_s=0.05, deadline_s=0.3).run(fn))
    assert time.monotonic() - t0 < 0.3 + 0.1
    assert fn.calls > 3


def test_the_bounds_come_from_the_broker_settings(monkeypatch):
    assert BrokerSettings().retry == RetryPolicy(base_s=0.01, cap_s=2.0, jitter=1.0, attempts=20)
    monkeypatch.setenv("VLMQ_RETRY_BASE_S", "0.05")
    monkeypatch.setenv("VLMQ_RETRY_CAP_S", "1")
    monkeypatch.setenv("VLMQ_RETRY_ATTEMPTS", "4")
    assert BrokerSettings.from_env().retry == RetryPolicy(base_s=0.05, cap_s=1.0, attempts=4)


def test_redis_py_retries_by_the_policy():
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.retry import Retry

    from broker.connection import _kwargs

    policy = RetryPolicy(base_s=0.01, cap_s=2.0, attempts=20)
    for use_asyncio, cls in ((False, Retry), (True, AsyncRetry)):
        retry = policy.redis_retry(use_asyncio)
        assert isinstance(retry, cls) and retry._retries == 20
        assert all(0.0 <= retry._backoff.compute(1) <= 0.02 for _ in range(100))  # redis-py counts from 1
        assert retry._backoff.compute(50) <= 2.0
    assert RetryPolicy(attempts=None).redis_retry(False)._retries == -1  # redis-py's "forever"
    settings = BrokerSettings(retry_attempts=3, retry_cap_s=0.5)
    retry = _kwargs(settings, asyncio=True)["retry"]
    assert retry._retries == 3 and retry._backoff.policy == settings.retry


def test_a_connection_without_retries_fails_at_once():
    from broker.connection import connect_sync

    settings = BrokerSettings(url="redis://127.0.0.1:1/0", retry_attempts=0)
    t0 = time.monotonic()
    with pytest.raises(RedisConnectionError):
        connect_sync(settings).ping()
    assert time.monotonic() - t0 < 2.0


def test_partitioned_reads_back_off_by_the_policy():
    from broker.partitioned_reads import PartitionedReads

    calls = {0: 0, 1: 0}

    async def read_one(streams, count, block_ms):
        p = int(streams[0])
        calls[p] += 1
        if p == 0:
            raise RedisConnectionError("node down")
        await asyncio.sleep(0.01)
        return []

    async def go():
        reads = PartitionedReads(
            read_one, {0: ["0"], 1: ["1"]}, RetryPolicy(base_s=0.1, cap_s=0.1, jitter=0.0)
        )
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.55:
            await reads.read(10, 10)
        await reads.settle()

    asyncio.run(go())
    assert 4 <= calls[0] <= 7  # one try per 0.1 s while its node is down
    assert calls[1] > 2 * calls[0]  # the healthy partition kept being read


def _worker_with_writer(commit, commit_retry_s: float):
    from inference_worker.handlers.synthetic import SyntheticHandler
    from inference_worker.settings import WorkerSettings
    from inference_worker.worker import Worker

    broker = BrokerSettings(retry_base_s=0.01, retry_cap_s=0.05)
    worker = Worker(
        WorkerSettings(broker=broker, backend="synthetic", commit_retry_s=commit_retry_s),
        {"text_action": SyntheticHandler("text_action")},
    )

    class Writer:
        async def commit(self, outcomes):
            return await commit()

    worker.writer = Writer()
    return worker


def test_reply_commits_retry_transient_errors_until_commit_retry_s():
    fn = Flaky(10**6)
    worker = _worker_with_writer(fn, commit_retry_s=0.3)
    t0 = time.monotonic()
    asyncio.run(worker._commit([]))
    assert worker.failure and "ConnectionError" in worker.failure
    assert time.monotonic() - t0 < 0.3 + 0.1 and fn.calls > 3


def test_reply_commits_give_up_after_three_permanent_errors():
    fn = Flaky(10**6, ValueError("NOSCRIPT-ish"))
    worker = _worker_with_writer(fn, commit_retry_s=60)
    asyncio.run(worker._commit([]))
    assert worker.failure and fn.calls == 3


def test_reply_commits_go_through_after_transient_errors():
    async def commit():
        fn.calls += 1
        if fn.calls <= 2:
            raise RedisConnectionError("restarting")
        return 0

    fn = Flaky(0)
    worker = _worker_with_writer(commit, commit_retry_s=60)
    asyncio.run(worker._commit([]))
    assert worker.failure is None and fn.calls == 3 and worker.last_commit_at > 0
