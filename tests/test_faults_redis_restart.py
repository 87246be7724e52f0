"""Redis itself fails under load: restarted (SIGTERM) with AOF on, and SIGKILLed with
`appendfsync always`. A real worker process and a real agent process ride it out on their
own retries with backoff; every request whose XADD returned is answered, exactly once to
the application."""

from __future__ import annotations

import signal
import uuid
from typing import Any, Dict, List

import pytest
import redis

from broker.connection import connect_sync
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import (
    GatedHandler,
    WorkerThread,
    agent_summary,
    kill_process,
    start_agent_process,
    start_text_worker_process,
    stop_process,
    synthetic_settings,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

SESSIONS = 4
REQUESTS = 150


def _run_with_outage(server: EmbeddedRedis, outage: str) -> Dict[str, Any]:
    broker = BrokerSettings(url=server.url, prefix=f"rr{uuid.uuid4().hex[:6]}", claim_min_idle_ms=1500)
    keys = Keys(broker.prefix)
    worker = start_text_worker_process(broker)
    agent = None
    try:
        r = connect_sync(broker)
        agent = start_agent_process(broker, "rr-", SESSIONS, REQUESTS, timeout=90)
        # Under way: the first session has replies, and most of the load is still to come.
        assert wait_for(lambda: r.xlen(keys.reply_stream("rr-0")) >= 15, 60), "no load"
        answered_before = r.xlen(keys.reply_stream("rr-0"))
        r.close()
        if outage == "restart":
            server.restart()  # SIGTERM: Redis writes its AOF and exits; same port and dir
        else:
            server.kill()  # SIGKILL: only what was fsynced survives
            server.start()
        summary = agent_summary(agent, timeout=180)
        assert worker.poll() is None, "the worker must survive the outage"
        r = connect_sync(broker)
        stream = keys.request_stream("text_action", 0)
        assert wait_for(lambda: r.xpending(stream, broker.group)["pending"] == 0, 30)
        assert r.xlen(stream) == 0
        assert answered_before < REQUESTS <= r.xlen(keys.reply_stream("rr-0")), "the outage missed the load"
        return summary
    finally:
        kill_process(agent)
        stop_process(worker, signal.SIGKILL)


def _assert_nothing_lost(summary: Dict[str, Any]) -> None:
    assert summary["not_accepted"] == 0, summary["errors"]
    assert summary["sent"] == SESSIONS * REQUESTS
    assert summary["lost"] == []
    assert summary["answered"] == summary["sent"]
    assert summary["codes"] == {"ok": summary["sent"]}
    assert summary["duplicates_delivered"] == 0 and summary["misdelivered"] == 0


def _text(content: str) -> TextActionRequest:
    return TextActionRequest(messages=[ChatMessage(role="user", content=content)])


def _server(extra: List[str]) -> EmbeddedRedis:
    return EmbeddedRedis(appendonly=True, args=extra)


def test_redis_restart_with_aof_loses_nothing(redis_server) -> None:
    with _server([]) as server:
        summary = _run_with_outage(server, "restart")
    _assert_nothing_lost(summary)


def test_redis_sigkill_with_appendfsync_always_loses_nothing(redis_server) -> None:
    with _server(["--appendfsync", "always"]) as server:
        summary = _run_with_outage(server, "kill")
    _assert_nothing_lost(summary)


def test_redis_restart_without_persistence_loses_nothing(fresh_redis) -> None:
    """Without AOF a restart empties Redis. What the worker had already read is answered: its
    commit finds no consumer group and writes the reply anyway. The request still waiting in
    the stream is gone with the data: the client sees the partition's epoch token change and
    publishes it again (same request_id). The worker recreates its group and serves it and
    new requests; each is answered once to the application."""
    broker = BrokerSettings(url=fresh_redis.url, prefix="nopersist", claim_min_idle_ms=1500)
    gated = GatedHandler("text_action")
    # max_batch 1, prefetch 2: one request in the model, one queued, the third in the stream
    settings = synthetic_settings(broker, kinds=("text_action",), max_batch=1, prefetch=2)
    with WorkerThread(settings, handlers={"text_action": gated}) as worker:
        with AgentClient("amnesia", settings=broker, raise_on_error=False) as client:
            held = [client.submit(_text(f"held {i}")) for i in range(2)]
            waiting = client.submit(_text("waiting"))
            assert gated.running.wait(30)
            assert wait_for(lambda: worker.worker.core.waiting() == 1, 30)
            fresh_redis.restart()  # no AOF, no RDB: an empty Redis on the same port
            gated.gate.set()
            assert [f.result(60).result.text for f in held] == ["held 0", "held 1"]
            again = waiting.result(60)
            after = client.request(_text("after the restart"), timeout=60)
            # the waiting one at least (the held ones too, if their replies came after the
            # client saw the token change: then their second replies are dropped)
            assert client.republished >= 1
    assert again.ok and again.result.text == "waiting"
    assert after.ok and after.result.text == "after the restart"
    assert [r.messages[-1].text() for r in gated.seen] == ["held 0", "held 1", "waiting", "after the restart"]


def test_data_lost_and_group_recreated_by_another_worker_before_the_commit(fresh_redis) -> None:
    """Redis loses its data while a request is in the model, and another worker recreates the
    consumer group before this worker commits: the entry is pending for nobody, which alone
    would look like "someone else answered it". The partition's epoch token changed with the
    data, so the commit writes the reply instead of dropping it."""
    broker = BrokerSettings(url=fresh_redis.url, prefix="epoch", claim_min_idle_ms=1500)
    keys = Keys(broker.prefix)
    admin = connect_sync(broker)
    gated = GatedHandler("text_action")
    with WorkerThread(synthetic_settings(broker, kinds=("text_action",)), handlers={"text_action": gated}):
        with AgentClient("survivor", settings=broker, raise_on_error=False) as client:
            held = client.submit(_text("in the model"))
            assert gated.running.wait(30)
            admin.flushall()  # the data is gone ...
            stream = keys.request_stream("text_action", 0)
            try:  # ... another worker came first
                admin.xgroup_create(stream, broker.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                # this worker's reader saw NOGROUP and recreated it first, as another worker
                # would (id 0, broker/consumer.py): the held entry is pending for nobody either way
                assert "BUSYGROUP" in str(exc), exc
            gated.gate.set()
            reply = held.result(60)
    assert reply.ok and reply.result.text == "in the model"
