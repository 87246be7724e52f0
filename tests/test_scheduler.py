"""The batcher as plain data: size and wait bounds, deadline order, fairness, supersession."""

from __future__ import annotations

import time

from broker.consumer import Delivery
from inference_worker.scheduler import Item, Scheduler
from schemas.messages import TextActionRequest


def item(kind="text_action", session="s", step=0, deadline=None, latest_only=False, arrived=0.0) -> Item:
    req = TextActionRequest(
        session_id=session,
        step=step,
        deadline=deadline,
        latest_only=latest_only,
        messages=[{"role": "user", "content": "x"}],
    )
    req.kind = kind  # the scheduler only looks at kind, deadline, session, step
    d = Delivery(stream="s", entry_id="0-1", kind=kind, model=None, partition=0, fields={})
    return Item(d, req, arrived=arrived)


def sched(max_batch=4, max_wait_ms=10.0) -> Scheduler:
    return Scheduler(lambda kind: max_batch, max_wait_ms)


def test_waits_for_max_wait_then_releases_a_partial_batch():
    s = sched(max_batch=4, max_wait_ms=10.0)
    s.add(item(arrived=100.0))
    s.add(item(arrived=100.002))
    batch, ready_at = s.take(now=100.005)
    assert batch is None and abs(ready_at - 100.010) < 1e-9
    batch, _ = s.take(now=100.010)
    assert batch is not None and len(batch.items) == 2


def test_a_full_batch_goes_at_once_and_the_rest_waits():
    s = sched(max_batch=4, max_wait_ms=1000.0)
    for i in range(6):
        s.add(item(step=i, arrived=100.0))
    batch, _ = s.take(now=100.0)
    assert [i.request.step for i in batch.items] == [0, 1, 2, 3]
    batch, _ = s.take(now=100.0)
    assert batch is None and len(s) == 2


def test_earlier_deadlines_first_then_arrival_order():
    s = sched(max_batch=3, max_wait_ms=0.0)
    far, near = time.time() + 100, time.time() + 10
    s.add(item(step=0, arrived=1.0))
    s.add(item(step=1, deadline=far, arrived=1.0))
    s.add(item(step=2, deadline=near, arrived=1.0))
    s.add(item(step=3, arrived=1.0))
    batch, _ = s.take(now=2.0)
    assert [i.request.step for i in batch.items] == [2, 1, 0]


def test_expired_requests_are_handed_back_without_a_batch_slot():
    s = sched(max_batch=8, max_wait_ms=0.0)
    s.add(item(step=0, deadline=time.time() - 1, arrived=1.0))
    s.add(item(step=1, arrived=1.0))
    batch, _ = s.take(now=2.0)
    assert [i.request.step for i in batch.expired] == [0]
    assert [i.request.step for i in batch.items] == [1]


def test_kinds_take_turns_by_oldest_request():
    s = sched(max_batch=2, max_wait_ms=0.0)
    s.add(item(kind="text_action", step=0, arrived=1.0))
    s.add(item(kind="preference", step=1, arrived=1.0))
    s.add(item(kind="text_action", step=2, arrived=1.0))
    s.add(item(kind="text_action", step=3, arrived=1.0))
    first, _ = s.take(now=2.0)
    second, _ = s.take(now=2.0)
    assert first.kind == "text_action" and second.kind == "preference"


def test_latest_only_supersedes_the_older_waiting_request_of_the_session():
    s = sched(max_batch=8, max_wait_ms=0.0)
    assert s.add(item(session="a", step=1, latest_only=True)) is None
    assert s.add(item(session="b", step=1, latest_only=True)) is None
    old = s.add(item(session="a", step=2, latest_only=True))
    assert old is not None and old.request.step == 1
    stale = s.add(item(session="a", step=0, latest_only=True))  # arrives late, is older
    assert stale is not None and stale.request.step == 0
    batch, _ = s.take(now=1e9)
    assert sorted((i.request.session_id, i.request.step) for i in batch.items) == [("a", 2), ("b", 1)]


def _regrouping(window_ms=20.0) -> Scheduler:
    """A scheduler whose sessions a and b have come back 5 ms after their replies before."""
    s = Scheduler(lambda kind: 4, max_wait_ms=1.0, regroup_ms=window_ms)
    s.answered("text_action", ["a", "b"], now=90.0)
    s.replied("text_action", ["a", "b"], now=90.0)
    s.add(item(session="a", arrived=90.005))
    s.add(item(session="b", arrived=90.005))
    assert len(s.take(now=90.006)[0].items) == 2
    return s


def test_regroup_waits_for_the_sessions_of_the_last_batch():
    """After a batch, a partial queue waits (up to regroup_ms from the replies) for the
    answered sessions to come back, so closed-loop clients form one full batch, not two
    alternating halves."""
    s = _regrouping()
    s.answered("text_action", ["a", "b"], now=100.0)
    s.add(item(session="c", arrived=100.0))
    s.add(item(session="d", arrived=100.0))
    s.replied("text_action", ["a", "b"], now=100.001)
    batch, ready_at = s.take(now=100.005)
    assert batch is None and abs(ready_at - 100.021) < 1e-9  # a and b are still out
    s.add(item(session="a", arrived=100.006))
    assert s.take(now=100.007)[0] is None
    s.add(item(session="b", arrived=100.008))  # everyone is back: no reason to wait
    batch, _ = s.take(now=100.009)
    assert sorted(i.request.session_id for i in batch.items) == ["a", "b", "c", "d"]


def test_regroup_gives_up_after_regroup_ms_and_can_be_off():
    s = _regrouping()
    s.answered("text_action", ["a"], now=100.0)
    s.replied("text_action", ["a"], now=100.0)
    s.add(item(session="c", arrived=100.0))
    assert s.take(now=100.010)[0] is None
    assert len(s.take(now=100.020)[0].items) == 1
    off = sched(max_batch=4, max_wait_ms=1.0)
    off.answered("text_action", ["a"], now=100.0)
    off.add(item(session="c", arrived=100.0))
    assert len(off.take(now=100.001)[0].items) == 1


def test_regroup_ignores_sessions_that_come_back_slowly_or_never_came_back():
    """An agent that sends at its own pace (a gap above the window) or a session not seen
    returning yet never holds a batch back."""
    s = Scheduler(lambda kind: 4, max_wait_ms=1.0, regroup_ms=20.0)
    s.answered("text_action", ["slow"], now=90.0)
    s.replied("text_action", ["slow"], now=90.0)
    s.add(item(session="slow", arrived=90.5))  # came back after 500 ms
    assert len(s.take(now=91.0)[0].items) == 1
    s.answered("text_action", ["slow", "new"], now=100.0)
    s.replied("text_action", ["slow", "new"], now=100.0)
    s.add(item(session="c", arrived=100.0))
    assert len(s.take(now=100.001)[0].items) == 1
