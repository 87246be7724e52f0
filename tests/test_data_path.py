"""The one data path on a real redis-server: client -> stream -> batcher -> handler -> reply."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import List, Sequence

import numpy as np
import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.publisher import BacklogFull, Publisher, request_fields
from env_agents.client import AgentClient, AsyncAgentClient, ReplyError
from inference_worker.handlers.base import Handler, HandlerOutput
from inference_worker.handlers.synthetic import SyntheticHandler
from schemas.codec import packb
from schemas.errors import ErrorCode
from schemas.messages import ActionChunkRequest, Request, TextActionRequest, decode_reply
from tests.helpers import WorkerThread, synthetic_settings, wait_for

FRAME = np.zeros((16, 16, 3), np.uint8)


def text(i: int = 0, **kw) -> TextActionRequest:
    return TextActionRequest(messages=[{"role": "user", "content": f"hello {i}"}], step=i, **kw)


class Recording(Handler):
    """Records the size of every batch; can be held closed to let requests pile up."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.inner = SyntheticHandler(kind)
        self.batches: List[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        self.entered.set()
        self.gate.wait(30)
        self.batches.append(len(requests))
        return self.inner.run(requests)


async def gather_requests(settings, session: str, reqs, timeout: float = 30.0):
    async with AsyncAgentClient(session, settings=settings) as client:
        futs = [await client.submit(r) for r in reqs]
        return await asyncio.wait_for(asyncio.gather(*futs), timeout), client


def test_request_reply_every_kind(settings):
    with WorkerThread(synthetic_settings(settings)):
        with AgentClient("agent-1", settings=settings) as client:
            r1 = client.request(ActionChunkRequest(image=FRAME, step=3), timeout=20)
            assert r1.ok and r1.result.chunk.shape == (50, 7) and r1.step == 3 and r1.session_id == "agent-1"
            r2 = client.request(text(admissible_commands=["north", "south"]), timeout=20)
            assert r2.result.choice == "north"
            assert r2.worker and r2.received_at >= r2.created_at and r2.replied_at >= r2.received_at
            assert "queue_ms" in r2.timings and "model" in r2.timings
            assert 0.0 <= r1.timings["intake_ms"] <= r1.timings["queue_ms"]  # a batch kind's too


def test_batches_respect_max_batch(settings):
    handler = Recording("text_action")
    ws = synthetic_settings(settings, kinds=("text_action",), max_batch=4, max_wait_ms=50.0)
    handler.gate.clear()
    with WorkerThread(ws, {"text_action": handler}):

        async def main():
            async with AsyncAgentClient("batcher", settings=settings) as client:
                first = await client.submit(text(0))
                assert await asyncio.to_thread(handler.entered.wait, 20)
                futs = [await client.submit(text(i)) for i in range(1, 11)]
                await asyncio.sleep(0.5)  # all ten wait behind the held batch
                handler.gate.set()
                return await asyncio.wait_for(asyncio.gather(first, *futs), 30)

        replies = asyncio.run(main())
    assert all(r.ok for r in replies)
    assert handler.batches[0] == 1
    assert max(handler.batches) == 4 and sum(handler.batches) == 11
    assert {r.batch_size for r in replies[1:]} <= {1, 2, 3, 4}


def test_max_wait_gathers_a_batch_then_stops_waiting(settings):
    handler = Recording("text_action")
    ws = synthetic_settings(settings, kinds=("text_action",), max_batch=64, max_wait_ms=400.0)
    with WorkerThread(ws, {"text_action": handler}):

        async def main():
            async with AsyncAgentClient("waiter", settings=settings) as client:
                t0 = time.monotonic()
                futs = [await client.submit(text(i)) for i in range(3)]
                replies = await asyncio.wait_for(asyncio.gather(*futs), 30)
                return replies, time.monotonic() - t0

        _, elapsed = asyncio.run(main())
    # Three requests sent within the 400 ms window ride in one batch, far below max_batch:
    # the batch was closed by the wait bound, not by size.
    assert handler.batches == [3]
    assert elapsed >= 0.4


def test_ack_only_after_reply(settings):
    handler = Recording("text_action")
    handler.gate.clear()
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    stream = keys.request_stream("text_action", 0)
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",)), {"text_action": handler}):
        with AgentClient("acker", settings=settings) as client:
            fut = client.submit(text())
            assert handler.entered.wait(20)
            # The model holds it: pending in the group, still in the stream, no reply yet.
            assert r.xpending(stream, settings.group)["pending"] == 1
            assert r.xlen(stream) == 1
            assert r.xlen(keys.reply_stream("acker")) == 0
            handler.gate.set()
            assert fut.result(20).ok
            # Reply written and entry acked and deleted together.
            assert wait_for(lambda: r.xpending(stream, settings.group)["pending"] == 0)
            assert r.xlen(stream) == 0
            assert r.xlen(keys.reply_stream("acker")) == 1


def test_exactly_one_reply_per_request(settings):
    with WorkerThread(synthetic_settings(settings, max_batch=8)):
        replies, client = asyncio.run(gather_requests(settings, "counter", [text(i) for i in range(200)]))
    assert [r.step for r in replies] == list(range(200))
    assert len({r.request_id for r in replies}) == 200
    assert client.duplicates == 0
    assert connect_sync(settings).xlen(Keys(settings.prefix).reply_stream("counter")) == min(
        200, settings.reply_maxlen
    )


def test_malformed_input_gets_an_error_reply_a_dead_letter_and_the_worker_stays_up(settings):
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    with WorkerThread(synthetic_settings(settings)):
        with AgentClient("victim", settings=settings, raise_on_error=False) as client:
            client.request(text(), timeout=20)  # the reader is positioned; now inject garbage
            r.xadd(
                keys.request_stream("text_action", 0),
                {"v": "1", "kind": "text_action", "rid": "bad1", "sid": "victim", "body": b"\xc1\xc1"},
            )
            assert wait_for(lambda: r.xlen(keys.dead_letters("text_action", 0)) == 1)
            reply = r.xrange(keys.reply_stream("victim"))[-1][1]
            err = decode_reply(reply[b"body"])
            assert err.request_id == "bad1" and not err.ok and err.error.code == ErrorCode.MALFORMED
            dead = r.xrange(keys.dead_letters("text_action", 0))[0][1]
            assert dead[b"code"] == b"malformed" and dead[b"rid"] == b"bad1"
            # wrong shape through the real client: a clean error reply
            bad = packb({**text().to_wire(), "session_id": "victim", "messages": "not a list"})
            req = text(session_id="victim")
            fields = request_fields(req, bad)
            fields["rid"] = req.request_id
            r.xadd(keys.request_stream("text_action", 0), fields)
            # the worker keeps serving
            assert client.request(text(1), timeout=20).ok
    assert r.xlen(keys.dead_letters("text_action", 0)) == 2


def _delivered_three_times(settings, session: str) -> str:
    """A request that three consumers took and died holding (delivery counts 1..3)."""
    r = connect_sync(settings)
    stream = Keys(settings.prefix).request_stream("text_action", 0)
    r.xgroup_create(stream, settings.group, id="0", mkstream=True)
    entry_id = r.xadd(stream, request_fields(text(session_id=session))).decode()
    r.xreadgroup(settings.group, "dead-1", {stream: ">"})
    for name in ("dead-2", "dead-3"):
        r.xclaim(stream, settings.group, name, 0, [entry_id])
    return entry_id


def test_poison_message_goes_to_dead_letters_after_max_deliveries(settings):
    """Delivered three times, and the two workers that ran it alone both died running it
    (their runs are counted in the suspects hash): dead-lettered, unrun."""
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    stream = keys.request_stream("text_action", 0)
    entry_id = _delivered_three_times(settings, "poisoned")
    r.hset(keys.suspects(0), f"{stream} {entry_id}", 2)
    time.sleep(settings.claim_min_idle_ms / 1000 + 0.1)
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        assert wait_for(lambda: r.xlen(keys.dead_letters("text_action", 0)) == 1, 20)
        assert wait_for(lambda: r.xlen(keys.reply_stream("poisoned")) == 1)
    reply = decode_reply(r.xrange(keys.reply_stream("poisoned"))[0][1][b"body"])
    assert reply.error.code == ErrorCode.DEAD_LETTER and reply.delivery == 4
    assert reply.error.detail == {"deliveries": 4, "runs_alone": 2, "max_deliveries": 3}
    assert r.xpending(stream, settings.group)["pending"] == 0 and r.xlen(stream) == 0
    assert not r.exists(keys.suspects(0))  # the commit dropped its count


def test_message_redelivered_without_running_alone_is_run_not_dead_lettered(settings):
    """Delivered three times but never run alone (it was only held by workers that died of
    something else): it runs alone and is answered; nothing goes to dead letters."""
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    _delivered_three_times(settings, "bystander")
    time.sleep(settings.claim_min_idle_ms / 1000 + 0.1)
    worker = WorkerThread(synthetic_settings(settings, kinds=("text_action",)))
    with worker:
        assert wait_for(lambda: r.xlen(keys.reply_stream("bystander")) == 1, 20)
    reply = decode_reply(r.xrange(keys.reply_stream("bystander"))[0][1][b"body"])
    assert reply.ok and reply.delivery == 4 and reply.batch_size == 1
    assert worker.worker.stats["runs_alone"] == 1
    assert r.xlen(keys.dead_letters("text_action", 0)) == 0
    assert not r.exists(keys.suspects(0))


def test_reply_streams_are_trimmed_and_expire(settings):
    settings = settings.with_(reply_maxlen=5, reply_ttl_s=1)
    r = connect_sync(settings)
    key = Keys(settings.prefix).reply_stream("shortlived")
    with WorkerThread(synthetic_settings(settings)):
        with AgentClient("shortlived", settings=settings) as client:
            for i in range(12):  # more than reply_maxlen, one in flight at a time
                client.request(text(i), timeout=20)
    assert r.xlen(key) == 5
    assert 0 < r.pttl(key) <= 1000
    assert wait_for(lambda: not r.exists(key), 5)


def test_backpressure_error_then_wait(settings):
    settings = settings.with_(max_backlog=3)

    async def fill():
        from broker.connection import connect_async

        redis = connect_async(settings)
        pub = Publisher(redis, settings)
        for i in range(3):
            await pub.publish(text(i, session_id="pressure"))
        with pytest.raises(BacklogFull) as err:
            await pub.publish(text(9, session_id="pressure"))
        await redis.aclose()
        return err.value

    err = asyncio.run(fill())
    assert err.code == ErrorCode.BACKLOG_FULL and "VLMQ_MAX_BACKLOG" in err.message
    waiting = settings.with_(backlog_policy="wait")

    async def wait_then_publish():
        async with AsyncAgentClient("pressure", settings=waiting) as client:
            client.publisher._full[client.keys.stream_for("text_action", "pressure")] = True
            fut = await client.submit(text(10), wait_timeout=30)  # waits until the worker drains
            return await asyncio.wait_for(fut, 30)

    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        assert asyncio.run(wait_then_publish()).ok


def test_error_replies_raise_reply_error_on_the_client(settings):
    with WorkerThread(synthetic_settings(settings)):
        with AgentClient("late", settings=settings) as client:
            with pytest.raises(ReplyError) as err:
                client.request(text(deadline=time.time() - 1), timeout=20)
    assert err.value.code == ErrorCode.EXPIRED


def test_stale_replies_of_an_earlier_life_are_ignored(settings):
    with WorkerThread(synthetic_settings(settings)):
        with AgentClient("phoenix", settings=settings) as first:
            first.request(text(1), timeout=20)
        with AgentClient("phoenix", settings=settings) as second:  # same session, new process
            reply = second.request(text(2), timeout=20)
            assert reply.step == 2 and second.stale == 0
