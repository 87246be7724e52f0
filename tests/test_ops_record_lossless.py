"""`vlmq record` misses nothing: workers copy each answered request in the commit itself.

A no-op worker (the worst case for a tap that reads streams from outside: a request is read,
answered and deleted within microseconds) serves sessions flat out while a recorder runs;
the recording holds every request and its reply. The recorder's own counter of what it
missed goes up when it cannot keep up (a recorder stalled past the tap's length), and a
second recorder is refused while one holds the tap.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.connection import connect_async, connect_sync
from broker.keys import Keys
from env_agents.client import AsyncAgentClient
from ops.commit_tap import CommitTap, TapBusy
from ops.record import record
from ops.recording import read_recording
from ops.tap import TapFilter
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings

pytestmark = pytest.mark.timeout(120)


async def _flood(settings, sessions: int, requests: int) -> set:
    """Closed-loop sessions, each keeping 8 requests in flight; returns the request ids."""
    sent: set = set()

    async def one(i: int) -> None:
        async with AsyncAgentClient(f"flood-{i}", settings=settings) as client:
            for start in range(0, requests, 8):
                reqs = [
                    TextActionRequest(step=j, messages=[ChatMessage(role="user", content=f"{i}/{j}")])
                    for j in range(start, min(requests, start + 8))
                ]
                sent.update(r.request_id for r in reqs)
                futures = [await client.submit(r) for r in reqs]
                await asyncio.gather(*futures)

    await asyncio.gather(*(one(i) for i in range(sessions)))
    return sent


def _recording_run(settings, path: str, sessions: int, requests: int):
    async def main():
        stop = asyncio.Event()
        started = asyncio.Event()
        task = asyncio.create_task(record(settings, path, stop, TapFilter(), on_start=started.set))
        await asyncio.wait_for(started.wait(), 30)
        sent = await _flood(settings, sessions, requests)
        stop.set()
        writer = await task
        return sent, writer

    return asyncio.run(main())


def test_record_captures_every_request_of_a_no_op_worker(settings, tmp_path):
    settings = settings.with_(partitions=2)
    path = str(tmp_path / "all.vlmqrec")
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        sent, writer = _recording_run(settings, path, sessions=8, requests=120)
    rec = read_recording(path)
    assert {e.rid for e in rec.requests()} == sent
    assert len(rec.requests()) == len(sent)  # each once
    assert set(rec.replies_by_rid()) == sent
    assert rec.footer["missed"] == 0 and rec.footer["orphan_replies"] == 0
    assert writer.counts == {"request": len(sent), "reply": len(sent)}
    # let go: the workers copy nothing more, and the tap streams are empty
    r = connect_sync(settings)
    keys = Keys(settings.prefix, settings.partitions)
    for p in range(settings.partitions):
        assert not r.exists(keys.tap_owner(p))
        assert r.xlen(keys.tap(p)) == 0


def test_a_second_recorder_is_refused_and_a_stalled_one_counts_what_it_missed(settings, tmp_path):
    settings = settings.with_(tap_maxlen=10)

    async def main():
        redis = connect_async(settings)
        first = CommitTap(redis, settings)
        await first.start()
        second = CommitTap(redis, settings)
        with pytest.raises(TapBusy, match="holds"):
            await second.start()
        # the first one stalls (reads nothing) while 300 requests are answered: the tap
        # stream is trimmed to ~tap_maxlen and the copies before are gone
        await _flood(settings, sessions=3, requests=100)
        got = []
        stop = asyncio.Event()
        stop.set()  # read what is left, then stop
        await first.run(lambda events: got.extend(events), stop)
        await redis.aclose()
        return first, got

    with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
        tap, got = asyncio.run(main())
    requests = sum(e.type == "request" for e in got)
    assert tap.missed > 0
    assert requests + tap.missed == 300
