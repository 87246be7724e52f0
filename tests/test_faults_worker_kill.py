"""Worker faults with real processes: SIGKILL mid-batch, a stalled (SIGSTOPped) worker, and
a poison message that kills every worker that takes it.

The worker under test is a real `vlmq worker` subprocess (synthetic backend, so the model
is a fixed latency); the survivor is a real Worker in a thread. What must hold: every
request gets exactly one reply in its session's reply stream, nothing stays pending, and
a message that never completes ends in dead letters after max_deliveries.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from typing import Dict

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient
from schemas.errors import ErrorCode
from schemas.messages import ChatMessage, TextActionRequest, decode_reply
from tests.helpers import (
    GatedHandler,
    WorkerThread,
    start_worker_process,
    stop_process,
    synthetic_settings,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

KIND = "text_action"


def _counting() -> GatedHandler:
    """The synthetic handler, remembering which requests reached the model (gate left open)."""
    handler = GatedHandler(KIND)
    handler.gate.set()
    return handler


@pytest.fixture
def broker(redis_server) -> BrokerSettings:
    return BrokerSettings(url=redis_server.url, prefix=f"wk{uuid.uuid4().hex[:8]}", claim_min_idle_ms=600)


def _request(i: int) -> TextActionRequest:
    return TextActionRequest(step=i, messages=[ChatMessage(role="user", content=f"obs {i}")])


def _start(broker: BrokerSettings, name: str, latency_ms: float, *extra: str) -> subprocess.Popen:
    proc = start_worker_process(
        broker,
        "--backend",
        "synthetic",
        "--synthetic-latency-ms",
        str(latency_ms),
        "--kinds",
        KIND,
        "--name",
        name,
        "--max-batch",
        "4",
        "--max-wait-ms",
        "20",
        *extra,
    )
    r = connect_sync(broker)
    up = wait_for(lambda: r.exists(Keys(broker.prefix).worker(name)) or proc.poll() is not None, 60)
    if not up or proc.poll() is not None:
        out = proc.stdout.read() if proc.poll() is not None else ""
        stop_process(proc, signal.SIGKILL)
        raise AssertionError(f"worker {name} did not start: {out}")
    return proc


def _held_by(r, broker: BrokerSettings, consumer: str) -> int:
    stream = Keys(broker.prefix).request_stream(KIND, 0)
    for c in r.xinfo_consumers(stream, broker.group) if r.exists(stream) else []:
        if c["name"] in (consumer, consumer.encode()):
            return int(c["pending"])
    return 0


def _replies(r, broker: BrokerSettings, session: str) -> Dict[str, int]:
    """request_id -> how many replies to it are in the session's reply stream."""
    counts: Dict[str, int] = {}
    for _, fields in r.xrange(Keys(broker.prefix).reply_stream(session)):
        rid = fields[b"rid"].decode()
        counts[rid] = counts.get(rid, 0) + 1
    return counts


def _runs_alone(r, broker: BrokerSettings) -> int:
    return sum(int(v) for v in r.hvals(Keys(broker.prefix).suspects(0)))


def _nothing_pending(r, broker: BrokerSettings) -> bool:
    stream = Keys(broker.prefix).request_stream(KIND, 0)
    return r.xlen(stream) == 0 and r.xpending(stream, broker.group)["pending"] == 0


def test_sigkill_mid_batch_another_worker_answers_each_request_once(broker) -> None:
    r = connect_sync(broker)
    victim = _start(broker, "victim", latency_ms=30_000)
    try:
        with AgentClient("kill-session", settings=broker) as client:
            reqs = [_request(i) for i in range(8)]
            futures = [client.submit(q) for q in reqs]
            # The victim reads all 8 (prefetch 2 x max-batch) and runs a batch of 4 for 30 s.
            assert wait_for(lambda: _held_by(r, broker, "victim") == 8, 30)
            time.sleep(0.3)
            stop_process(victim, signal.SIGKILL)

            counting = _counting()
            survivor = WorkerThread(synthetic_settings(broker, kinds=(KIND,)), handlers={KIND: counting})
            with survivor:
                replies = [f.result(timeout=60) for f in futures]
                assert wait_for(lambda: _nothing_pending(r, broker), 30)
            assert survivor.worker.stats["reclaimed"] == 8
        assert all(rep.ok for rep in replies)
        assert [rep.request_id for rep in replies] == [q.request_id for q in reqs]
        assert {rep.worker for rep in replies} == {survivor.worker.name}
        assert all(rep.delivery >= 2 for rep in replies)  # 2, unless a loaded CI box delays keep-alive
        assert sorted(r.request_id for r in counting.seen) == sorted(q.request_id for q in reqs)
        assert client.duplicates == 0
        assert _replies(r, broker, "kill-session") == {q.request_id: 1 for q in reqs}
    finally:
        stop_process(victim, signal.SIGKILL)


def test_stalled_worker_that_wakes_up_does_not_reply_twice(broker) -> None:
    """SIGSTOP (a frozen VM, a long GC pause) past claim_min_idle_ms: another worker takes the
    batch over and answers; when the stalled worker wakes and finishes the same batch, its
    replies are fenced off because it no longer holds the messages."""
    r = connect_sync(broker)
    sleeper = _start(broker, "sleeper", latency_ms=1500)
    try:
        with AgentClient("stall-session", settings=broker) as client:
            reqs = [_request(i) for i in range(4)]
            futures = [client.submit(q) for q in reqs]
            assert wait_for(lambda: _held_by(r, broker, "sleeper") == 4, 30)
            time.sleep(0.2)  # the batch of 4 is in the model thread
            sleeper.send_signal(signal.SIGSTOP)
            survivor = WorkerThread(synthetic_settings(broker, kinds=(KIND,)))
            with survivor:
                replies = [f.result(timeout=60) for f in futures]
                assert {rep.worker for rep in replies} == {survivor.worker.name}
                sleeper.send_signal(signal.SIGCONT)
                # The sleeper finishes its batch and tries to commit it; give it the time.
                time.sleep(2.5)
                assert wait_for(lambda: _nothing_pending(r, broker), 30)
        assert client.duplicates == 0
        assert _replies(r, broker, "stall-session") == {q.request_id: 1 for q in reqs}
        assert sleeper.poll() is None, "the stalled worker must survive losing its batch"
        stop_process(sleeper)
        assert "dropped: their messages were taken over" in sleeper.stdout.read()
    finally:
        sleeper.send_signal(signal.SIGCONT)
        stop_process(sleeper, signal.SIGKILL)


def test_poison_message_goes_to_dead_letters_after_max_deliveries(broker) -> None:
    """A request that kills every worker that runs it (here: each holder is SIGKILLed once
    the request is in its model; from delivery 2 on it runs alone, and the run is counted
    first) is delivered max_deliveries times, then dead-lettered with an error reply, unrun."""
    r = connect_sync(broker)
    keys = Keys(broker.prefix)
    max_deliveries = 2
    with AgentClient("poison-session", settings=broker, raise_on_error=False) as client:
        poison = _request(0)
        future = client.submit(poison)
        for attempt in range(max_deliveries):
            name = f"doomed-{attempt}"
            proc = _start(broker, name, 60_000, "--max-deliveries", str(max_deliveries))
            try:
                # delivery 1 by XREADGROUP, then by reclaim once the last holder is idle
                assert wait_for(lambda n=name: _held_by(r, broker, n) == 1, 30)
                # from delivery 2 on it runs alone, and the run is counted before it starts
                assert wait_for(lambda a=attempt: _runs_alone(r, broker) == a, 30)
            finally:
                stop_process(proc, signal.SIGKILL)

        counting = _counting()
        survivor = WorkerThread(
            synthetic_settings(broker.with_(max_deliveries=max_deliveries), kinds=(KIND,)),
            handlers={KIND: counting},
        )
        with survivor:
            reply = future.result(timeout=60)
            assert wait_for(lambda: _nothing_pending(r, broker), 30)
            time.sleep(1.5)  # several reclaim rounds: it is not delivered again
            assert _nothing_pending(r, broker)
    assert not reply.ok and reply.error.code == ErrorCode.DEAD_LETTER
    assert reply.delivery == max_deliveries + 1
    assert counting.seen == []  # dead-lettered without reaching the model
    letters = r.xrange(keys.dead_letters(KIND, 0))
    assert len(letters) == 1
    fields = letters[0][1]
    assert fields[b"rid"].decode() == poison.request_id
    assert fields[b"code"] == ErrorCode.DEAD_LETTER.value.encode()
    assert int(fields[b"deliveries"]) == max_deliveries + 1
    assert (
        decode_reply(r.xrange(keys.reply_stream("poison-session"))[0][1][b"body"]).error.code == "dead_letter"
    )
