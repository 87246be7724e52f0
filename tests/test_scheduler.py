"""The scheduler as plain data: batch size and wait bounds, deadline order, fairness,
supersession, latency classes, continuous admission into the decode, suspects alone."""

from __future__ import annotations

import time

from broker.consumer import Delivery
from inference_worker.handlers.base import Generate, Score
from inference_worker.scheduler import Batch, EngineState, Item, Policy, Scheduler
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


def sched(max_batch=4, max_wait_ms=10.0, **policy) -> Scheduler:
    return Scheduler(Policy(lambda kind: max_batch, max_wait_ms, **policy))


def take(s: Scheduler, now: float):
    """(batch or None, ready_at) of the next step with no chat engine; expired requests
    ride along on the batch (an empty one if nothing else is ready)."""
    plan = s.schedule(now, time.time())
    if plan.batch is not None:
        plan.batch.expired = plan.expired
        return plan.batch, plan.ready_at
    return (Batch("", [], plan.expired) if plan.expired else None), plan.ready_at


def test_waits_for_max_wait_then_releases_a_partial_batch():
    s = sched(max_batch=4, max_wait_ms=10.0)
    s.add(item(arrived=100.0))
    s.add(item(arrived=100.002))
    batch, ready_at = take(s, 100.005)
    assert batch is None and abs(ready_at - 100.010) < 1e-9
    batch, _ = take(s, 100.010)
    assert batch is not None and len(batch.items) == 2


def test_a_full_batch_goes_at_once_and_the_rest_waits():
    s = sched(max_batch=4, max_wait_ms=1000.0)
    for i in range(6):
        s.add(item(step=i, arrived=100.0))
    batch, _ = take(s, 100.0)
    assert [i.request.step for i in batch.items] == [0, 1, 2, 3]
    batch, _ = take(s, 100.0)
    assert batch is None and len(s) == 2


def test_earlier_deadlines_first_then_arrival_order():
    s = sched(max_batch=3, max_wait_ms=0.0)
    far, near = time.time() + 100, time.time() + 10
    s.add(item(step=0, arrived=1.0))
    s.add(item(step=1, deadline=far, arrived=1.0))
    s.add(item(step=2, deadline=near, arrived=1.0))
    s.add(item(step=3, arrived=1.0))
    batch, _ = take(s, 2.0)
    assert [i.request.step for i in batch.items] == [2, 1, 0]


def test_expired_requests_are_handed_back_without_a_batch_slot():
    s = sched(max_batch=8, max_wait_ms=0.0)
    s.add(item(step=0, deadline=time.time() - 1, arrived=1.0))
    s.add(item(step=1, arrived=1.0))
    batch, _ = take(s, 2.0)
    assert [i.request.step for i in batch.expired] == [0]
    assert [i.request.step for i in batch.items] == [1]


def test_kinds_take_turns_by_oldest_request():
    s = sched(max_batch=2, max_wait_ms=0.0)
    s.add(item(kind="text_action", step=0, arrived=1.0))
    s.add(item(kind="preference", step=1, arrived=1.0))
    s.add(item(kind="text_action", step=2, arrived=1.0))
    s.add(item(kind="text_action", step=3, arrived=1.0))
    first, _ = take(s, 2.0)
    second, _ = take(s, 2.0)
    assert first.kind == "text_action" and second.kind == "preference"


def test_latest_only_supersedes_the_older_waiting_request_of_the_session():
    s = sched(max_batch=8, max_wait_ms=0.0)
    assert s.add(item(session="a", step=1, latest_only=True)) is None
    assert s.add(item(session="b", step=1, latest_only=True)) is None
    old = s.add(item(session="a", step=2, latest_only=True))
    assert old is not None and old.request.step == 1
    stale = s.add(item(session="a", step=0, latest_only=True))  # arrives late, is older
    assert stale is not None and stale.request.step == 0
    batch, _ = take(s, 1e9)
    assert sorted((i.request.session_id, i.request.step) for i in batch.items) == [("a", 2), ("b", 1)]


def _regrouping(window_ms=20.0) -> Scheduler:
    """A scheduler whose sessions a and b have come back 5 ms after their replies before."""
    s = sched(max_batch=4, max_wait_ms=1.0, regroup_ms=window_ms)
    s.answered("text_action", ["a", "b"], now=90.0)
    s.replied("text_action", ["a", "b"], now=90.0)
    s.add(item(session="a", arrived=90.005))
    s.add(item(session="b", arrived=90.005))
    assert len(take(s, 90.006)[0].items) == 2
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
    batch, ready_at = take(s, 100.005)
    assert batch is None and abs(ready_at - 100.021) < 1e-9  # a and b are still out
    s.add(item(session="a", arrived=100.006))
    assert take(s, 100.007)[0] is None
    s.add(item(session="b", arrived=100.008))  # everyone is back: no reason to wait
    batch, _ = take(s, 100.009)
    assert sorted(i.request.session_id for i in batch.items) == ["a", "b", "c", "d"]


def test_regroup_gives_up_after_regroup_ms_and_can_be_off():
    s = _regrouping()
    s.answered("text_action", ["a"], now=100.0)
    s.replied("text_action", ["a"], now=100.0)
    s.add(item(session="c", arrived=100.0))
    assert take(s, 100.010)[0] is None
    assert len(take(s, 100.020)[0].items) == 1
    off = sched(max_batch=4, max_wait_ms=1.0)
    off.answered("text_action", ["a"], now=100.0)
    off.add(item(session="c", arrived=100.0))
    assert len(take(off, 100.001)[0].items) == 1


def test_regroup_ignores_sessions_that_come_back_slowly_or_never_came_back():
    """An agent that sends at its own pace (a gap above the window) or a session not seen
    returning yet never holds a batch back."""
    s = sched(max_batch=4, max_wait_ms=1.0, regroup_ms=20.0)
    s.answered("text_action", ["slow"], now=90.0)
    s.replied("text_action", ["slow"], now=90.0)
    s.add(item(session="slow", arrived=90.5))  # came back after 500 ms
    assert len(take(s, 91.0)[0].items) == 1
    s.answered("text_action", ["slow", "new"], now=100.0)
    s.replied("text_action", ["slow", "new"], now=100.0)
    s.add(item(session="c", arrived=100.0))
    assert len(take(s, 100.001)[0].items) == 1


# ----------------------------------------------------------------------------- the engine core's steps


class _Prompt:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens


def chat_item(step=0, tokens=100, score=False, arrived=0.0, suspect=False, kind="text_action") -> Item:
    it = item(kind=kind, step=step, arrived=arrived)
    it.op = Score(_Prompt(tokens), ["a", "b"]) if score else Generate(_Prompt(tokens), None)
    it.suspect = suspect
    return it


def stepped(**kw) -> Scheduler:
    kw.setdefault("prefill_min", 4)
    kw.setdefault("prefill_tokens", 1000)
    return sched(max_batch=8, max_wait_ms=10.0, stepped_kinds=("text_action", "preference"), **kw)


def test_a_ready_control_batch_runs_before_any_chat_step():
    s = stepped()
    for i in range(6):
        s.add(chat_item(step=i))
    s.add(item(kind="action_chunk", arrived=0.0))
    plan = s.schedule(1.0, time.time(), EngineState(free_slots=8, running=3))
    assert plan.batch is not None and plan.batch.kind == "action_chunk"
    plan = s.schedule(1.0, time.time(), EngineState(free_slots=8, running=3))
    assert plan.batch is None and len(plan.prefill) == 6 and plan.decode


def test_decode_goes_on_while_joiners_gather_for_a_prefill_group():
    s = stepped(prefill_min=4)
    s.add(chat_item(step=0, arrived=100.0))
    s.add(chat_item(step=1, arrived=100.001))
    plan = s.schedule(100.002, time.time(), EngineState(free_slots=5, running=3))
    assert plan.prefill == [] and plan.decode  # 2 < prefill_min: they wait, the others decode
    s.add(chat_item(step=2, arrived=100.003))
    s.add(chat_item(step=3, arrived=100.003))
    plan = s.schedule(100.004, time.time(), EngineState(free_slots=5, running=3))
    assert [i.request.step for i in plan.prefill] == [0, 1, 2, 3]
    s.add(chat_item(step=4, arrived=100.005))
    assert s.schedule(100.006, time.time(), EngineState(free_slots=3, running=5)).prefill == []
    assert s.schedule(100.016, time.time(), EngineState(free_slots=3, running=5)).prefill  # waited max_wait
    s.add(chat_item(step=5, arrived=100.017))
    # a group can't be bigger than the free slots: one free slot, one joiner goes at once
    assert s.schedule(100.017, time.time(), EngineState(free_slots=1, running=7)).prefill


def test_nothing_running_and_too_few_joiners_waits_until_max_wait():
    s = stepped(prefill_min=4)
    s.add(chat_item(arrived=100.0))
    plan = s.schedule(100.001, time.time(), EngineState(free_slots=8, running=0))
    assert plan.idle and abs(plan.ready_at - 100.010) < 1e-9
    assert len(s.schedule(100.010, time.time(), EngineState(free_slots=8, running=0)).prefill) == 1


def test_a_prefill_group_fits_the_free_slots_and_the_token_budget():
    s = stepped(prefill_min=1, prefill_tokens=1000)
    for i in range(6):
        s.add(chat_item(step=i, tokens=300))
    plan = s.schedule(1.0, time.time(), EngineState(free_slots=8, running=0))
    assert [i.request.step for i in plan.prefill] == [0, 1, 2]  # 900 tokens; a 4th would pass 1000
    plan = s.schedule(1.0, time.time(), EngineState(free_slots=1, running=3))
    assert [i.request.step for i in plan.prefill] == [3]
    big = stepped(prefill_min=1, prefill_tokens=1000)
    big.add(chat_item(tokens=5000))
    assert len(big.schedule(1.0, time.time(), EngineState(free_slots=8)).prefill) == 1  # alone, still runs


def test_score_batches_take_turns_with_decode_steps():
    s = stepped(prefill_min=1)
    s.add(chat_item(step=0, score=True))
    s.add(chat_item(step=1, score=True))
    first = s.schedule(1.0, time.time(), EngineState(free_slots=4, running=4))
    assert first.decode and not first.score  # sequences are running: a decode step, then the scores
    second = s.schedule(1.0, time.time(), EngineState(free_slots=4, running=4))
    assert [i.request.step for i in second.score] == [0, 1] and not second.decode
    assert s.schedule(1.0, time.time(), EngineState(free_slots=4, running=4)).decode


def test_an_admitted_requests_next_op_joins_before_new_requests():
    s = stepped(prefill_min=1)
    s.add(chat_item(step=1))
    follow = chat_item(step=9)
    s.followup(follow)
    plan = s.schedule(1.0, time.time(), EngineState(free_slots=1, running=0))
    assert plan.prefill == [follow]


def test_a_stepped_suspect_runs_alone_once_the_engine_is_idle():
    s = stepped(prefill_min=1)
    s.add(chat_item(step=0))
    s.add(chat_item(step=1, suspect=True))
    busy = s.schedule(1.0, time.time(), EngineState(free_slots=4, running=2))
    assert busy.prefill == [] and busy.decode  # the others finish first; nothing joins them
    plan = s.schedule(1.0, time.time(), EngineState(free_slots=8, running=0))
    assert [i.request.step for i in plan.prefill] == [1]
    assert s.schedule(1.0, time.time(), EngineState(free_slots=7, running=1)).prefill == []
    s.finished(plan.prefill[0])
    assert [i.request.step for i in s.schedule(1.0, time.time(), EngineState(free_slots=8)).prefill] == [0]


def test_a_batch_kind_suspect_runs_in_a_batch_of_its_own():
    s = sched(max_batch=8, max_wait_ms=1000.0)
    for i in range(3):
        s.add(item(kind="action_chunk", step=i, arrived=1.0))
    bad = item(kind="action_chunk", step=7, arrived=1.0)
    bad.suspect = True
    s.add(bad)
    batch, _ = take(s, 1.0)
    assert batch.items == [bad]
