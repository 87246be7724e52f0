"""Deadlines and "newest observation only" through a real worker.

The model is a gated synthetic handler (tests/helpers.py): it records what reaches it and,
while the gate is closed, holds the first batch in the model thread. That makes "a batch is
running while these requests arrive" a fact the test controls, not a race it hopes to win.
"""

from __future__ import annotations

import time
import uuid
from typing import Dict, List

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient
from schemas.errors import ErrorCode
from schemas.messages import ChatMessage, TextActionRequest
from tests.helpers import GatedHandler, WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(120)

KIND = "text_action"


def _texts(gated: GatedHandler) -> List[str]:
    return [r.messages[-1].text() for r in gated.seen]


def _req(text: str, **kw) -> TextActionRequest:
    return TextActionRequest(messages=[ChatMessage(role="user", content=text)], **kw)


@pytest.fixture
def served(settings: BrokerSettings):
    gated = GatedHandler(KIND)
    worker = WorkerThread(
        synthetic_settings(settings, kinds=(KIND,), max_batch=1, prefetch=16), handlers={KIND: gated}
    )
    with worker, AgentClient(f"dl-{uuid.uuid4().hex[:6]}", settings=settings, raise_on_error=False) as client:
        yield worker, gated, client
        gated.gate.set()


def _block_the_model(client: AgentClient, gated: GatedHandler):
    first = client.submit(_req("blocker"))
    assert gated.running.wait(30), "the first batch never started"
    return first


def _queued(worker: WorkerThread, n: int) -> bool:
    return worker.worker.core.waiting() == n


def test_expired_on_arrival_gets_expired_reply_without_the_model(served) -> None:
    _, gated, client = served
    gated.gate.set()
    late = _req("too late", deadline=time.time() - 1.0)
    reply = client.submit(late).result(30)
    assert not reply.ok and reply.error.code == ErrorCode.EXPIRED
    assert "deadline passed" in reply.error.message
    assert client.submit(_req("on time", deadline=time.time() + 60)).result(30).ok
    assert _texts(gated) == ["on time"]


def test_request_expiring_in_the_queue_never_reaches_the_model(served) -> None:
    worker, gated, client = served
    blocker = _block_the_model(client, gated)
    doomed = client.submit(_req("doomed", deadline=time.time() + 0.3, latest_only=True))
    assert wait_for(lambda: _queued(worker, 1), 30)
    time.sleep(0.4)  # past its deadline while the model is still busy with the blocker
    gated.gate.set()
    assert blocker.result(30).ok
    reply = doomed.result(30)
    assert reply.error.code == ErrorCode.EXPIRED
    assert _texts(gated) == ["blocker"]
    assert worker.worker.core.scheduler._latest == {}  # no frame kept for a session that expired


def test_batcher_runs_earliest_deadline_first(served) -> None:
    worker, gated, client = served
    blocker = _block_the_model(client, gated)
    now = time.time()
    order = [
        ("late", 600),
        ("none-1", None),
        ("soon", 200),
        ("later", 400),
        ("none-2", None),
        ("sooner", 100),
    ]
    futures = [client.submit(_req(t, deadline=None if d is None else now + d)) for t, d in order]
    assert wait_for(lambda: _queued(worker, len(order)), 30)
    gated.gate.set()
    assert blocker.result(30).ok and all(f.result(30).ok for f in futures)
    # max_batch=1: one request per batch, in deadline order; no deadline last, by arrival
    assert _texts(gated) == ["blocker", "sooner", "soon", "later", "late", "none-1", "none-2"]


def test_latest_only_skips_stale_frames_even_across_a_running_batch(served, settings) -> None:
    worker, gated, client = served
    running = client.submit(_req("frame 1", step=1, latest_only=True))
    assert gated.running.wait(30)
    # Frame 1 is in the model. Frames 2 and 3 arrive; 3 supersedes 2 while both wait.
    # Frame 2 again (a late duplicate step) loses to 3. Another session is untouched.
    f2 = client.submit(_req("frame 2", step=2, latest_only=True))
    f3 = client.submit(_req("frame 3", step=3, latest_only=True))
    stale = client.submit(_req("frame 2 again", step=2, latest_only=True))
    with AgentClient(f"other-{uuid.uuid4().hex[:6]}", settings=settings, raise_on_error=False) as other:
        o1 = other.submit(_req("other 1", step=1, latest_only=True))
        replies: Dict[str, object] = {"f2": f2.result(30), "stale": stale.result(30)}
        assert wait_for(lambda: _queued(worker, 2), 30)  # frame 3 and the other session's frame
        gated.gate.set()
        replies.update(running=running.result(30), f3=f3.result(30), o1=o1.result(30))
    assert replies["running"].ok  # already running: it finishes and is answered
    assert replies["f3"].ok and replies["o1"].ok
    for key in ("f2", "stale"):
        assert replies[key].error.code == ErrorCode.SUPERSEDED
    assert _texts(gated) == ["frame 1", "frame 3", "other 1"]
    # superseded is an answer, not a failure: nothing went to dead letters
    r = connect_sync(settings)
    assert r.xlen(Keys(settings.prefix).dead_letters(KIND, 0)) == 0
    assert worker.worker.core.scheduler._latest == {}
