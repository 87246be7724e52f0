"""Every counter of `vlmq bench reliability` can fail: on a deliberately broken build each one
goes non-zero (or over its bound), and on the real build it stays at zero.

The broken builds are monkeypatches of one piece each (a reply writer that answers twice,
drops replies or writes to the wrong stream; a client that does not de-duplicate; the old
admission rule that dead-letters by delivery count; dead letters that keep whole frames;
workers that copy nothing to the recorder's tap; a decoder without the structure scan; a
reclaimer that waits for prefetch room), measured with the bench's own counting code.
"""

from __future__ import annotations

import asyncio
import time
from typing import List

import msgpack
import numpy as np
import pytest

from broker.connection import connect_sync
from broker.consumer import GroupReader
from broker.keys import Keys
from broker.publisher import request_fields
from broker.replies import ReplyWriter, Settlement
from env_agents.client import AsyncAgentClient
from inference_worker.worker import Worker
from ops.bench.fault_runs import collateral, dead_letter_bytes
from ops.bench.reliability_agents import run_agents
from ops.record import record
from ops.recording import read_recording
from ops.tap import TapFilter
from schemas.codec import packb
from schemas.messages import ActionChunkRequest, ChatMessage, TextActionRequest, decode_reply
from tests.helpers import WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(120)
KIND = "text_action"


def _agents(settings, sessions: int = 3, requests: int = 20, timeout: float = 1.5):
    names = [f"count-{i}" for i in range(sessions)]
    return asyncio.run(run_agents(settings, names, requests, kind=KIND, timeout=timeout))


def _healthy(out) -> None:
    assert out["lost"] == [] and out["duplicates_in_streams"] == 0 and out["misdelivered"] == 0
    assert out["duplicates_delivered"] == 0 and out["timed_out"] == 0


def test_the_counters_read_zero_on_the_real_build(settings) -> None:
    with WorkerThread(synthetic_settings(settings, kinds=(KIND,))):
        out = _agents(settings)
    _healthy(out)
    assert out["sent"] == out["answered"] == 60


def _broken_writer(monkeypatch, settings, breakage: str) -> None:
    real = ReplyWriter.commit
    keys = Keys(settings.prefix)
    r = connect_sync(settings)
    calls = {"n": 0}

    async def commit(self, settlements: List[Settlement]) -> int:
        if breakage == "drop":  # every 4th reply is acked without being written
            for o in settlements:
                calls["n"] += 1
                if calls["n"] % 4 == 0:
                    o.reply = None
        fenced = await real(self, settlements)
        for o in settlements:
            if o.reply is None:
                continue
            sid = o.delivery.field("sid")
            if breakage == "twice":
                r.xadd(keys.reply_stream(sid), {"rid": o.delivery.field("rid"), "body": o.reply})
            if breakage == "elsewhere":  # a copy lands in another session's stream
                other = "count-0" if sid != "count-0" else "count-1"
                r.xadd(keys.reply_stream(other), {"rid": o.delivery.field("rid"), "body": o.reply})
        return fenced

    monkeypatch.setattr(ReplyWriter, "commit", commit)


@pytest.mark.parametrize(
    ("breakage", "counter"),
    [("twice", "duplicates_in_streams"), ("drop", "lost"), ("elsewhere", "misdelivered")],
)
def test_reply_stream_counters_fail_on_a_broken_worker(settings, monkeypatch, breakage, counter) -> None:
    _broken_writer(monkeypatch, settings, breakage)
    with WorkerThread(synthetic_settings(settings, kinds=(KIND,))):
        out = _agents(settings, requests=8, timeout=1.0)
    got = out[counter]
    assert (len(got) if isinstance(got, list) else got) > 0, out
    # the client hid the duplicates from the application: only the stream count shows them
    assert out["duplicates_delivered"] == 0


def test_application_duplicate_counter_fails_on_a_client_that_does_not_deduplicate(
    settings, monkeypatch
) -> None:
    """A client that hands a reply it cannot match to the oldest waiting request, with a
    worker that answers twice: the application gets one request's reply twice."""
    _broken_writer(monkeypatch, settings, "twice")
    real = AsyncAgentClient._deliver

    def deliver(self, fields) -> None:
        rid = (fields.get(b"rid") or b"").decode()
        if rid not in self._pending and self._pending:
            fields = {**fields, b"rid": next(iter(self._pending)).encode()}
        real(self, fields)

    monkeypatch.setattr(AsyncAgentClient, "_deliver", deliver)
    with WorkerThread(synthetic_settings(settings, kinds=(KIND,), synthetic_latency_ms=5.0)):
        out = _agents(settings, sessions=2, requests=30)
    assert out["duplicates_delivered"] > 0, out


def _delivered_four_times(settings, texts: List[str]) -> List[str]:
    """Requests that three consumers took and died holding: the state a poison leaves."""
    r = connect_sync(settings)
    stream = Keys(settings.prefix).request_stream(KIND, 0)
    r.xgroup_create(stream, settings.group, id="0", mkstream=True)
    rids = []
    for t in texts:
        req = TextActionRequest(session_id="held", messages=[ChatMessage(role="user", content=t)])
        r.xadd(stream, request_fields(req))
        rids.append(req.request_id)
    r.xreadgroup(settings.group, "dead-1", {stream: ">"})
    ids = [p["message_id"] for p in r.xpending_range(stream, settings.group, "-", "+", 100)]
    for name in ("dead-2", "dead-3"):
        r.xclaim(stream, settings.group, name, 0, ids)
    time.sleep(settings.claim_min_idle_ms / 1000 + 0.1)
    return rids


@pytest.mark.parametrize("broken", [False, True])
def test_collateral_counter_fails_with_the_old_dead_letter_rule(settings, monkeypatch, broken) -> None:
    """The old rule dead-letters everything delivered more than max_deliveries times, before
    running it; the real rule runs each alone (none of these is a poison) and answers it."""
    rids = _delivered_four_times(settings, ["poison"] + [f"valid {i}" for i in range(5)])
    if broken:

        async def runs_alone(self, deliveries):  # as if every one had run alone and crashed
            return [settings.max_deliveries] * len(deliveries)

        monkeypatch.setattr(GroupReader, "runs_alone", runs_alone)
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    with WorkerThread(synthetic_settings(settings, kinds=(KIND,))):
        assert wait_for(lambda: r.xlen(keys.reply_stream("held")) == 6, 30)
    letters = [f for _, f in r.xrange(keys.dead_letters(KIND, 0))]
    errors = {}
    for _, f in r.xrange(keys.reply_stream("held")):
        reply = decode_reply(f[b"body"])
        if not reply.ok:
            errors[reply.request_id] = reply.error.code.value
    got = collateral(letters, {"poison_ids": rids[:1], "error_ids": errors})
    if broken:
        assert got["collateral"] == 5 and got["valid_not_ok"] == 5
    else:
        assert got == {"dead_letters": 0, "poisons_dead_lettered": 0, "collateral": 0, "valid_not_ok": 0}


@pytest.mark.parametrize("body_bytes", [65_536, 10**9])
def test_dead_letter_bytes_go_over_the_bound_when_dead_letters_keep_frames(settings, body_bytes) -> None:
    settings = settings.with_(dlq_body_bytes=body_bytes)
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    stream = keys.request_stream("action_chunk", 0)
    with WorkerThread(synthetic_settings(settings, kinds=("action_chunk",))):
        for i in range(3):  # 9 MiB frames: over the 8 MiB frame limit, refused too_large
            req = ActionChunkRequest(session_id=f"big-{i}", image=np.zeros((8, 8, 3), np.uint8))
            body = packb({**req.to_wire(), "image": np.zeros((1792, 1792, 3), np.uint8)})
            r.xadd(stream, request_fields(req, body))
        assert wait_for(lambda: r.xlen(keys.dead_letters("action_chunk", 0)) == 3, 60)
    used = dead_letter_bytes(r, keys, ["action_chunk"])
    bound = settings.dlq_maxlen * (settings.dlq_body_bytes + 3072)
    if body_bytes == 65_536:  # header and digest: a few hundred bytes each
        assert used < 3 * (settings.dlq_body_bytes + 3072) <= bound
    else:  # whole frames: 9 MiB each, where the default build keeps at most 67 KiB
        assert used > 3 * 9 * 2**20


@pytest.mark.parametrize("broken", [False, True])
def test_capture_fraction_falls_when_workers_do_not_copy(settings, monkeypatch, tmp_path, broken) -> None:
    if broken:  # workers look for the tap's hold under another name: they never copy
        real = ReplyWriter._script_args

        def script_args(self, partition, group):
            keys, args = real(self, partition, group)
            return [*keys[:-1], keys[-1] + ":nobody"], args

        monkeypatch.setattr(ReplyWriter, "_script_args", script_args)
    path = str(tmp_path / "rec.vlmqrec")

    async def main() -> int:
        stop, started = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(record(settings, path, stop, TapFilter(), on_start=started.set))
        await started.wait()
        out = await run_agents(settings, ["cap-0", "cap-1"], 40, kind=KIND, timeout=10)
        stop.set()
        await task
        return out["sent"]

    with WorkerThread(synthetic_settings(settings, kinds=(KIND,))):
        sent = asyncio.run(main())
    fraction = len({e.rid for e in read_recording(path).requests()}) / sent
    assert fraction == (0.0 if broken else 1.0)


@pytest.mark.parametrize("broken", [False, True])
def test_good_wait_goes_over_a_second_without_the_structure_scan(settings, monkeypatch, broken) -> None:
    if broken:  # the old decoder: msgpack with no bound on values per body
        import schemas.messages as messages

        monkeypatch.setattr(messages, "unpackb", lambda data, limits=None: msgpack.unpackb(data, raw=False))
    r = connect_sync(settings)
    keys = Keys(settings.prefix)
    stream = keys.request_stream(KIND, 0)
    bomb = TextActionRequest(session_id="bomb", messages=[ChatMessage(role="user", content="x")])
    # big enough that the unbounded decoder's scan takes well over a second on a fast core
    # (150,000 fields took 0.83 s on an AMD EPYC); the bounded one refuses it at the header
    body = msgpack.packb({**bomb.to_wire(), **{f"f{i}": 0 for i in range(600_000)}})
    good = TextActionRequest(session_id="good", messages=[ChatMessage(role="user", content="hi")])
    with WorkerThread(synthetic_settings(settings, kinds=(KIND,))):
        r.xadd(stream, {"v": "1", "kind": KIND, "rid": bomb.request_id, "sid": "bomb", "body": body})
        sent = time.time()
        r.xadd(stream, request_fields(good, packb(good.to_wire())))
        assert wait_for(lambda: r.xlen(keys.reply_stream("good")) == 1, 60)
    waited = decode_reply(r.xrange(keys.reply_stream("good"))[0][1][b"body"]).replied_at - sent
    assert (waited > 1.0) if broken else (waited < 1.0), waited


@pytest.mark.parametrize("broken", [False, True])
def test_takeover_goes_over_its_bound_with_a_reclaimer_that_waits_for_room(
    settings, monkeypatch, broken
) -> None:
    """The survivor's prefetch stays full (60 requests at 50 ms): the old reclaimer skipped its
    turn whenever there was no room, so the dead worker's requests waited for the queue."""
    if broken:

        async def old_reclaimer(self) -> None:
            while not self.stopping:
                await asyncio.sleep(self.settings.reclaim_interval_s)
                room = self._room_left()
                if room <= 0 or self.stopping:
                    continue
                deliveries = await self.reader.reclaim(room)
                if deliveries:
                    await self._admit(deliveries)

        monkeypatch.setattr(Worker, "_reclaimer", old_reclaimer)
    settings = settings.with_(claim_min_idle_ms=600)
    stream = Keys(settings.prefix).request_stream(KIND, 0)
    r = connect_sync(settings)
    r.xgroup_create(stream, settings.group, id="0", mkstream=True)
    from env_agents.client import AgentClient

    def text(t: str) -> TextActionRequest:
        return TextActionRequest(messages=[ChatMessage(role="user", content=t)])

    with (
        AgentClient("orphans", settings=settings) as orphans,
        AgentClient("flood", settings=settings) as flood,
    ):
        lost = [orphans.submit(text(f"orphan {i}")) for i in range(2)]
        assert wait_for(lambda: r.xlen(stream) == 2)
        r.xreadgroup(settings.group, "dead", {stream: ">"}, count=2)
        died = time.monotonic()
        flooding = [flood.submit(text(f"load {i}")) for i in range(60)]
        worker = synthetic_settings(
            settings,
            kinds=(KIND,),
            synthetic_latency_ms=50.0,
            max_batch=1,
            prefetch=2,
            reclaim_interval_s=0.2,
        )
        with WorkerThread(worker):
            for f in lost:
                f.result(60)
            took = time.monotonic() - died
            for f in flooding:
                f.result(60)
    bound = settings.claim_min_idle_ms / 1000 + 1.5
    assert (took > bound) if broken else (took < bound), took
