"""The client's side of "nothing accepted is lost": a request that Redis no longer holds and
that nobody answered is found and published again (same request_id); a request nobody
answers ends in a clear RequestTimeout instead of a wait forever; AsyncAgentClient takes a
url like AgentClient. (A restart of Redis without persistence, where the epoch token
changes: tests/test_faults_redis_restart.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from env_agents.client import AgentClient, AsyncAgentClient, RequestTimeout
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import GatedHandler, WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(120)


def _text(content: str) -> TextActionRequest:
    return TextActionRequest(messages=[ChatMessage(role="user", content=content)])


def test_a_request_acked_without_a_reply_is_found_and_published_again(settings) -> None:
    """Lost without an epoch change: the entry of a queued request is acked and deleted
    behind the worker's back (as a failover to a replica that never had it, or a faulty
    consumer, would leave it). The worker's commit for it is fenced off, so no reply comes;
    the client finds the entry neither waiting nor pending, reads its reply stream to the
    end, and publishes the request again. It is answered once."""
    settings = settings.with_(presence_check_s=0.5, lost_check_s=0.2)
    keys = Keys(settings.prefix)
    stream = keys.request_stream("text_action", 0)
    admin = connect_sync(settings)
    gated = GatedHandler("text_action")
    worker = synthetic_settings(settings, kinds=("text_action",), max_batch=1, prefetch=2)
    with WorkerThread(worker, handlers={"text_action": gated}) as w:
        with AgentClient("lossy", settings=settings) as client:
            first = client.submit(_text("first"))
            assert gated.running.wait(30)
            second = client.submit(_text("second"))
            assert wait_for(lambda: w.worker.core.waiting() == 1, 30)  # read, queued
            entry = admin.xpending_range(stream, settings.group, "-", "+", 10)[-1]["message_id"]
            admin.xack(stream, settings.group, entry)
            admin.xdel(stream, entry)
            gated.gate.set()
            assert first.result(30).result.text == "first"
            assert second.result(30).result.text == "second"
            assert client.republished == 1 and client.duplicates == 0
    assert w.worker.stats["fenced"] == 1  # the lost copy's reply was dropped, not written
    assert [r.messages[-1].text() for r in gated.seen] == ["first", "second", "second"]


def test_answered_requests_are_not_published_again(settings) -> None:
    """The presence check runs on requests that wait long (a slow model): they are pending,
    so nothing is published twice."""
    settings = settings.with_(presence_check_s=0.2, lost_check_s=0.1)
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",), synthetic_latency_ms=800.0)):
        with AgentClient("patient", settings=settings) as client:
            replies = [client.request(_text(f"{i}"), timeout=30) for i in range(3)]
            assert client.republished == 0
    assert [r.result.text for r in replies] == ["0", "1", "2"]


def test_request_timeout_is_the_default_and_says_what_to_check(settings) -> None:
    with AgentClient("unserved", settings=settings, request_timeout_s=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout, match="VLMQ_REQUEST_TIMEOUT_S") as info:
            client.request(_text("anyone?"))
        assert 0.4 < time.monotonic() - t0 < 5
        assert "text_action" in str(info.value) and "vlmq inspect" in str(info.value)
        assert isinstance(info.value, asyncio.TimeoutError)
        assert client._client.outstanding == 0


def test_async_client_takes_a_url_like_the_blocking_one(settings) -> None:
    async def main() -> str:
        async with AsyncAgentClient(
            "by-url", url=settings.url, settings=settings.with_(url="redis://nowhere:1")
        ) as c:
            return (await c.request(_text("hello"), timeout=30)).result.text

    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        assert asyncio.run(main()) == "hello"
