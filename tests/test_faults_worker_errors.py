"""How the worker meets its own failures (inference_worker/failures.py): out of memory splits
the batch; a fatal device error stops the worker (non-zero exit) and another one answers what
it held, each suspect alone; a reply that cannot be written is retried within bounds, then
the worker stops instead of holding its requests forever; the keep-alive never takes back
what another worker reclaimed; a request that kills every worker that runs it is the only one
dead-lettered; a stuck worker's health says so. (A busy worker's takeover on time:
tests/test_bench_counters.py, beside the old reclaimer that was late.)"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import List, Optional, Sequence

import pytest
from redis.exceptions import ConnectionError, ResponseError

from broker.connection import connect_async, connect_sync
from broker.consumer import GroupReader
from broker.keys import Keys
from broker.publisher import request_fields
from broker.replies import ReplyWriter
from broker.settings import BrokerSettings
from env_agents.client import AgentClient
from inference_worker.failures import FatalDeviceError
from inference_worker.handlers.base import HandlerOutput
from inference_worker.handlers.synthetic import Faults, SyntheticHandler
from inference_worker.worker import WorkerFailure, _run_safely
from ops.inspect import snapshot
from ops.metrics import names as n
from ops.metrics.worker import WorkerMetrics
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ChatMessage, Request, TextActionRequest
from tests.helpers import (
    GatedHandler,
    WorkerThread,
    start_worker_process,
    stop_process,
    synthetic_settings,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)
KIND = "text_action"


def _text(content: str, **kw) -> TextActionRequest:
    return TextActionRequest(messages=[ChatMessage(role="user", content=content)], **kw)


class Recording(SyntheticHandler):
    """The synthetic handler (with faults) remembering the size of every batch it was given."""

    def __init__(self, faults: Optional[Faults] = None) -> None:
        super().__init__(KIND, faults=faults)
        self.blocking = True
        self.sizes: List[int] = []

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        self.sizes.append(len(requests))
        return super().run(requests)


def test_out_of_memory_runs_the_batch_in_halves() -> None:
    handler = Recording(Faults(oom_over=2))
    out = _run_safely(handler, [_text(f"{i}") for i in range(8)])
    assert [r.text for r in out.results] == [f"{i}" for i in range(8)]
    assert handler.sizes == [8, 4, 2, 2, 4, 2, 2]


def test_a_request_that_fails_alone_fails_alone() -> None:
    class Picky(Recording):
        def run(self, requests):
            self.sizes.append(len(requests))
            if any(r.messages[-1].text() == "bad" for r in requests):
                raise ValueError("cannot take this one")
            return SyntheticHandler.run(self, requests)

    out = _run_safely(Picky(), [_text("a"), _text("bad"), _text("c"), _text("d")])
    assert [getattr(r, "text", None) for r in out.results] == ["a", None, "c", "d"]
    assert isinstance(out.results[1], ProtocolError) and out.results[1].code == ErrorCode.INTERNAL


def test_a_fatal_device_error_is_raised_not_retried() -> None:
    handler = Recording(Faults(device_assert_on="boom"))
    with pytest.raises(FatalDeviceError, match="device-side assert"):
        _run_safely(handler, [_text("a"), _text("boom")])
    assert handler.sizes == [2]  # not run again: nothing more can run on that device


def test_device_assert_stops_the_worker_and_another_answers_each_request_alone(settings) -> None:
    keys = Keys(settings.prefix)
    stream = keys.request_stream(KIND, 0)
    r = connect_sync(settings)
    doomed = WorkerThread(
        synthetic_settings(settings, kinds=(KIND,), max_batch=4, max_wait_ms=300.0),
        handlers={KIND: Recording(Faults(device_assert_on="boom"))},
    )
    with AgentClient("assert", settings=settings) as client:
        futures = [client.submit(_text(t)) for t in ("a", "boom", "c", "d")]
        doomed.thread.start()
        doomed.thread.join(30)
        assert not doomed.thread.is_alive()
        assert isinstance(doomed.error, FatalDeviceError)
        assert r.xpending(stream, settings.group)["pending"] == 4  # left for another worker
        assert not r.exists(keys.worker(doomed.worker.name))
        healthy = Recording()
        with WorkerThread(synthetic_settings(settings, kinds=(KIND,)), handlers={KIND: healthy}) as w:
            replies = [f.result(30) for f in futures]
            assert w.worker.stats["runs_alone"] == 4
    assert [rep.result.text for rep in replies] == ["a", "boom", "c", "d"]
    assert all(rep.delivery == 2 and rep.batch_size == 1 for rep in replies)
    assert healthy.sizes == [1, 1, 1, 1]


def test_the_worker_process_exits_non_zero_on_a_device_assert(settings) -> None:
    proc = start_worker_process(
        settings, "--backend", "synthetic", "--kinds", KIND, "--option", "fault_device_assert_on=boom"
    )
    try:
        with AgentClient("assert-cli", settings=settings, request_timeout_s=5) as client:
            client.submit(_text("boom"))
            assert proc.wait(60) == 1
        out = proc.stdout.read()
        assert "vlmq worker stopped:" in out and "device-side assert" in out
        assert "Traceback" not in out
    finally:
        stop_process(proc, signal.SIGKILL)


def test_a_transient_commit_error_is_retried_and_counted(settings, monkeypatch) -> None:
    real = ReplyWriter.commit
    failures = [ConnectionError("cut"), ConnectionError("cut again")]

    async def flaky(self, outcomes):
        if failures:
            raise failures.pop(0)
        return await real(self, outcomes)

    monkeypatch.setattr(ReplyWriter, "commit", flaky)
    with WorkerThread(synthetic_settings(settings, kinds=(KIND,))) as w:
        with AgentClient("flaky", settings=settings) as client:
            assert client.request(_text("through"), timeout=30).result.text == "through"
        assert w.worker.stats["redis_errors"] == 2 and w.worker.failure is None


def test_a_reply_that_cannot_be_written_stops_the_worker(settings, monkeypatch) -> None:
    """A permanent error (here: the ACL refuses the write) does not leave the worker holding
    its requests forever behind a live heartbeat: after a few tries it stops, non-zero, and
    its requests stay pending for another worker."""

    async def refused(self, outcomes):
        raise ResponseError("NOPERM this user has no permissions to run the 'evalsha' command")

    monkeypatch.setattr(ReplyWriter, "commit", refused)
    keys = Keys(settings.prefix)
    r = connect_sync(settings)
    w = WorkerThread(synthetic_settings(settings, kinds=(KIND,)))
    with AgentClient("refused", settings=settings) as client:
        client.submit(_text("never written"))
        w.thread.start()
        w.thread.join(30)
        assert not w.thread.is_alive()
    assert isinstance(w.error, WorkerFailure) and "NOPERM" in str(w.error)
    assert r.xpending(keys.request_stream(KIND, 0), settings.group)["pending"] == 1
    assert not r.exists(keys.worker(w.worker.name))


def test_keep_alive_does_not_take_back_what_another_worker_reclaimed(settings) -> None:
    async def main() -> None:
        redis = connect_async(settings)
        stream = Keys(settings.prefix).request_stream(KIND, 0)
        stalled = GroupReader(redis, settings, [stream], "stalled")
        await stalled.ensure_groups()
        await redis.xadd(stream, request_fields(_text("x", session_id="s")))
        (held,) = await stalled.read(10, 100)
        assert await stalled.keep_alive([held]) == []  # still its own: kept
        await redis.xclaim(stream, settings.group, "survivor", 0, [held.entry_id])  # reclaimed
        assert await stalled.keep_alive([held]) == [held]  # not its own any more: left alone
        owner = (await redis.xpending_range(stream, settings.group, "-", "+", 1))[0]["consumer"]
        assert owner == b"survivor"
        await redis.aclose()

    asyncio.run(main())


@pytest.fixture
def poison_broker(redis_server) -> BrokerSettings:
    return BrokerSettings(url=redis_server.url, prefix=f"ps{uuid.uuid4().hex[:8]}", claim_min_idle_ms=500)


def test_only_the_request_that_kills_its_workers_is_dead_lettered(poison_broker) -> None:
    """Real worker processes that SIGKILL themselves when the poison reaches their model, one
    after the other (a supervisor restarting them). 11 valid requests were read together with
    the poison, and died with it the first time; each is answered (run alone after the first
    crash). The poison is delivered max_deliveries times, runs alone and kills its worker each
    time, and then goes to dead letters: it is the only dead letter."""
    settings = poison_broker
    keys = Keys(settings.prefix)
    r = connect_sync(settings)
    stream = keys.request_stream(KIND, 0)
    r.xgroup_create(stream, settings.group, id="0", mkstream=True)
    with AgentClient("victims", settings=settings, raise_on_error=False) as client:
        requests = (
            [_text(f"valid {i}") for i in range(6)]
            + [_text("poison")]
            + [_text(f"valid {i}") for i in range(6, 11)]
        )
        futures = [client.submit(q) for q in requests]
        starts = 0
        while not all(f.done() for f in futures) and starts < 8:
            proc = start_worker_process(
                settings,
                "--backend", "synthetic", "--kinds", KIND, "--name", f"w{starts}", "--max-batch", "16",
                "--max-wait-ms", "50", "--option", "fault_kill_on=poison",
            )  # fmt: skip
            starts += 1
            give_up = time.monotonic() + 30
            while proc.poll() is None and not all(f.done() for f in futures) and time.monotonic() < give_up:
                time.sleep(0.05)
            stop_process(proc, signal.SIGKILL)
        replies = {q.request_id: f.result(5) for q, f in zip(requests, futures)}
    poison = requests[6].request_id
    assert not replies[poison].ok and replies[poison].error.code == ErrorCode.DEAD_LETTER
    assert replies[poison].error.detail["runs_alone"] == 2
    assert all(rep.ok for rid, rep in replies.items() if rid != poison)
    letters = r.xrange(keys.dead_letters(KIND, 0))
    assert [f[b"rid"].decode() for _, f in letters] == [poison]  # collateral: 0
    assert starts == 4  # 3 crashes (a batch, then alone twice), then one that finishes
    assert r.xlen(stream) == 0 and r.xpending(stream, settings.group)["pending"] == 0


def test_health_is_the_time_since_the_last_commit_while_holding_requests(settings) -> None:
    """A worker whose model is stuck keeps its heartbeat alive; its health says it is
    stalled: `stalled_s` in the heartbeat (what `vlmq inspect` and `vlmq top` show) and the
    vlmq_worker_stalled_seconds gauge grow while it holds requests, and drop to 0 once it
    writes their replies and holds nothing."""
    gated = GatedHandler(KIND)
    worker_settings = synthetic_settings(settings, kinds=(KIND,), heartbeat_s=0.2)
    metrics = WorkerMetrics(worker_settings, sample_redis=False)
    r = connect_sync(settings)

    def stalled() -> float:
        workers = snapshot(r, settings)["workers"]
        return workers[0]["stalled_s"] if workers else -1.0

    with WorkerThread(worker_settings, handlers={KIND: gated}, observers=[metrics]):
        with AgentClient("stuck", settings=settings) as client:
            reply = client.submit(_text("waits"))
            assert gated.running.wait(30)
            assert wait_for(lambda: stalled() >= 1.0, 30)
            assert metrics.m[n.WORKER_STALLED.name]._value.get() >= 0.8
            gated.gate.set()
            assert reply.result(30).ok
            assert wait_for(lambda: stalled() == 0.0, 30)
            assert metrics.m[n.WORKER_LAST_COMMIT.name]._value.get() > 0
