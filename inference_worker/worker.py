"""The worker: intake -> engine core (model thread) -> replies, all overlapping.

Coroutines on one event loop: the intake reads request streams (XREADGROUP), validates,
prepares chat requests (prompt building and tokenizing, on a thread of its own) and hands
them to the engine core; the reclaimer takes over messages of dead consumers; the
keep-alive re-claims what this worker holds so no one else takes it; the heartbeat
advertises the worker. The model thread runs `EngineCore.step()` in a loop (core.py) and
hands each step's answered requests back to the loop, which commits their replies while
the next step runs. The model never waits on Redis and the event loop never waits on the
model. A request is acked only in the call that writes its reply. Requests that stream
also get partial replies after each step (streaming.py), written the same way: posted to
the loop, never waited for by the model thread.

Failures (inference_worker/failures.py):
- A message delivered again after its holder died is a suspect: it runs alone (in a batch
  of its own, or in an idle decode; scheduler.py), and each such run is counted in Redis
  before it starts. Only a message that was delivered more than max_deliveries times and
  that its workers kept dying on while running it alone goes to dead letters; the requests
  that were merely held with it are answered.
- The reclaimer has a budget of its own beyond the prefetch room, so a busy worker still
  takes a dead worker's messages over on time.
- Writing replies retries transient Redis errors for commit_retry_s, other errors a few
  times, with the delays of the Redis retry policy (broker/retry.py); then, as after a
  fatal device error or any failure of the model thread, the worker stops reading and
  exits non-zero (WorkerFailure), leaving what it held to be reclaimed.
- Health is the time since the last commit while holding requests (`stalled_s` in the
  heartbeat, `vlmq inspect`, `vlmq top` and the metrics).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Set

from broker.connection import connect_async
from broker.consumer import Delivery, GroupReader
from broker.keys import Keys
from broker.meta import agree_partitions
from broker.replies import ReplyWriter, Settlement
from inference_worker.core import EngineCore, Output, PartialOutput, StepInfo
from inference_worker.events import Observers, WorkerObserver
from inference_worker.failures import (
    FatalDeviceError,
    is_fatal_device_error,
    is_out_of_memory,
    is_transient_redis_error,
    release_device_memory,
)
from inference_worker.handlers.base import AsyncHandler, Handler, HandlerOutput
from inference_worker.profiling import StepProfiler
from inference_worker.scheduler import Item, Policy
from inference_worker.settings import WorkerSettings
from inference_worker.streaming import PartialWriter
from schemas.codec import packb
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ID_PATTERN, ErrorInfo, Reply, Request, read_body, validate_request

log = logging.getLogger("vlmq.worker")
_ID = re.compile(ID_PATTERN)
# A message delivered this many times max_deliveries is dead-lettered even if it never ran
# alone: its holders died before it reached the model (while decoding it, say).
_DELIVERY_CAP_FACTOR = 4
_ENTRY_FIELDS = frozenset((b"v", b"kind", b"rid", b"sid", b"body"))
_PERMANENT_COMMIT_TRIES = 3  # a commit that fails with a non-transient error this often is fatal


class WorkerFailure(RuntimeError):
    """The worker stopped because it could not go on (a reply it could not write, a device
    error); what it held stays pending for another worker."""


class _Rejected(Exception):
    """An entry refused before the scheduler: answered to `session` (None: to nobody)."""

    def __init__(self, error: ProtocolError, session: Optional[str], request_id: Optional[str]) -> None:
        super().__init__(error.message)
        self.error = error
        self.session = session
        self.request_id = request_id


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        handlers: Dict[str, Handler],
        redis=None,
        observers: Sequence[WorkerObserver] = (),
    ) -> None:
        self.settings = settings
        self.handlers = handlers
        self.name = settings.name
        self.redis = redis
        self.keys = Keys(settings.broker.prefix, settings.broker.partitions)
        self.events = Observers(observers)
        policy = Policy(
            batch_limit=settings.batch_limit,
            max_wait_ms=settings.max_wait_ms,
            control_kinds=settings.control_kinds,
            prefill_min=settings.prefill_min,
            prefill_tokens=_prefill_tokens(handlers),
            regroup_ms=settings.regroup_ms,
        )
        self.core = EngineCore(handlers, policy, _run_safely, settings.serving)
        self.profiler = (
            StepProfiler(
                settings.profile_dir,
                settings.profile_steps,
                settings.profile_skip,
                settings.name,
                settings.device,
            )
            if settings.profile_dir
            else None
        )
        self.in_flight: Dict[int, Item] = {}  # by id(): answered, reply being committed
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._commits: Set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmq-model")
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmq-prep")
        self._flush = False  # shutting down: the core runs what it holds without waiting
        self._intake_done = False
        self.stats = {
            "batches": 0,
            "requests": 0,
            "errors": 0,
            "dead_letters": 0,
            "reclaimed": 0,
            "fenced": 0,  # results dropped: another consumer had taken their messages over
            "taken_over": 0,  # held messages the keep-alive found reclaimed by another consumer
            "runs_alone": 0,  # suspects (redelivered messages) run alone
            "redis_errors": 0,
        }
        self.started_at = time.time()
        self.last_commit_at = 0.0
        self.failure: Optional[str] = None
        self._failure_exc: Optional[BaseException] = None

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Stop reading; finish what was read; reply; ack; return from run()."""
        self._stopping.set()
        self._room.set()
        self.core.wake()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def streams(self) -> List[str]:
        out = []
        for kind in self.handlers:
            for tenant in (None, *self.settings.tenants):
                out += self.keys.request_streams(kind, tenant=tenant)
                if self.settings.model_name:
                    out += self.keys.request_streams(kind, self.settings.model_name, tenant)
        return out

    async def run(self) -> None:
        own_redis = self.redis is None
        if own_redis:
            self.redis = connect_async(self.settings.broker)
        await agree_partitions(self.redis, self.settings.broker, "worker", self.name)
        self.reader = GroupReader(self.redis, self.settings.broker, self.streams(), self.name)
        self.writer = ReplyWriter(self.redis, self.settings.broker, self.name)
        self.partials: Optional[PartialWriter] = None
        if self.core.engine is not None:
            self.partials = PartialWriter(
                self.redis, self.keys, self.name, self.settings.broker.reply_ttl_s, self.core.engine
            )
        await self.reader.ensure_groups()
        loop = asyncio.get_running_loop()
        for h in self.handlers.values():
            if isinstance(h, AsyncHandler):
                await h.warmup_async()
            else:
                await loop.run_in_executor(self._executor, h.warmup)
        side = [
            asyncio.create_task(self._intake(), name="intake"),
            asyncio.create_task(self._reclaimer(), name="reclaim"),
            asyncio.create_task(self._keep_alive(), name="keep-alive"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
        ]
        log.info(
            "worker %s serving %s on %d streams", self.name, ",".join(self.handlers), len(self.reader.streams)
        )
        inline = not any(h.blocking for h in self.handlers.values())
        serving = asyncio.create_task(self._drive_inline() if inline else self._drive_thread(), name="serve")
        try:
            await asyncio.wait([side[0], serving], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():  # the model thread failed: stop taking work
                self._stopping.set()
                serving.result()
            await side[0]  # the intake finishes its last read and queues it
            self._flush = self._intake_done = True
            self.core.wake()
            await serving  # the core runs what it holds, then returns
        finally:
            self._stopping.set()
            self._flush = self._intake_done = True
            self.core.wake()
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            if self._commits:
                await asyncio.gather(*self._commits, return_exceptions=True)
            if self.partials is not None:
                await self.partials.close()
            try:
                await self.redis.delete(self.keys.worker(self.name))
            except Exception:  # Redis may be gone; the key expires anyway
                pass
            if own_redis:
                await self.redis.aclose()
            if not serving.done():
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
            self._executor.shutdown(wait=True)
            self._prep.shutdown(wait=True)
            for h in self.handlers.values():
                h.close()
        if self.failure:
            raise self._failure_exc or WorkerFailure(self.failure)
        log.info("worker %s stopped: %s", self.name, self.stats)

    # ------------------------------------------------------------------ intake

    def _room_left(self) -> int:
        return self.settings.read_ahead - len(self.core) - len(self.in_flight)

    async def _intake(self) -> None:
        retry, failures = self.settings.broker.retry, 0
        while not self.stopping:
            room = self._room_left()
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                deliveries = await self.reader.read(room, self.settings.block_ms)
                failures = 0
            except Exception as exc:  # connection lost: redis-py retried with backoff already
                self._redis_error("read", exc)
                await asyncio.sleep(retry.delay(failures))  # the intake never gives up
                failures += 1
                continue
            if deliveries:
                await self._admit(deliveries)
                await asyncio.sleep(0)  # let the batch start before the next read is sent
        leftover = await self.reader.settle()  # reads still in flight on a Redis Cluster
        if leftover:
            await self._admit(leftover)

    async def _reclaimer(self) -> None:
        """Take over the messages of dead consumers. It has its own room, beyond the
        prefetch: a worker whose prefetch is full still takes them over on time (they run
        alone, ahead of the queue: the scheduler puts suspects first)."""
        period = min(self.settings.reclaim_interval_s, self.settings.broker.claim_min_idle_ms / 4000.0)
        budget = self.settings.read_ahead
        while not self.stopping:
            await asyncio.sleep(period)
            room = self._room_left() + budget
            if room <= 0 or self.stopping:
                continue
            try:
                deliveries = await self.reader.reclaim(room)
            except Exception as exc:
                self._redis_error("reclaim", exc)
                continue
            if deliveries:
                self.stats["reclaimed"] += len(deliveries)
                log.info("reclaimed %d message(s) from dead consumers", len(deliveries))
                await self._admit(deliveries)

    async def _admit(self, deliveries: List[Delivery]) -> None:
        if self.failure:  # stopping: what was read stays pending for another worker
            return
        max_deliveries = self.settings.broker.max_deliveries
        again = [d for d in deliveries if d.deliveries > 1]
        alone: Dict[int, int] = {}
        if again:
            try:
                alone = dict(zip(map(id, again), await self.reader.runs_alone(again)))
            except Exception as exc:  # unknown: run them alone (again) rather than dead-letter
                self._redis_error("runs_alone", exc)
        rejected: List[Settlement] = []
        valid: List[Item] = []
        for d in deliveries:
            runs = alone.get(id(d), 0)
            # Before decoding: a message that kills the worker while it is decoded must
            # still stop being retried.
            if d.deliveries > max_deliveries and (
                runs >= max(1, max_deliveries - 1) or d.deliveries > _DELIVERY_CAP_FACTOR * max_deliveries
            ):
                why = (
                    f"its workers died running it alone {runs} time(s)"
                    if runs
                    else "its workers died before it reached the model"
                )
                exc = ProtocolError(
                    ErrorCode.DEAD_LETTER,
                    f"delivered {d.deliveries} times without completing ({why}; max_deliveries="
                    f"{max_deliveries}); moved to dead letters",
                    {"deliveries": d.deliveries, "runs_alone": runs, "max_deliveries": max_deliveries},
                )
                rejected.append(self._error(d, None, exc, dead=True))
                continue
            try:
                req = self._decode(d)
            except _Rejected as rej:
                rejected.append(
                    self._error(
                        d,
                        None,
                        rej.error,
                        dead=True,
                        session=rej.session,
                        request_id=rej.request_id,
                        answer=rej.session is not None,
                    )
                )
                continue
            except Exception as exc:  # a validation bug must not kill the intake
                log.exception("decoding %s %s failed", d.stream, d.entry_id)
                exc = ProtocolError(ErrorCode.MALFORMED, f"could not decode: {type(exc).__name__}: {exc}")
                rejected.append(self._error(d, None, exc, dead=True))
                continue
            # delivered again after its holder died (or lost a read): it may be what killed it
            item = Item(d, req, suspect=d.deliveries > 1)
            self.events.on_admitted(req.kind, item)
            valid.append(item)
        if valid:
            rejected += await self._queue(valid)
        if rejected:
            await self._commit(rejected)

    async def _queue(self, items: List[Item]) -> List[Settlement]:
        """Hand valid requests to the core (chat requests of stepped kinds prepared first, on
        the prep thread); returns the replies of those answered at once."""
        alone = [i for i in items if isinstance(self.handlers[i.request.kind], AsyncHandler)]
        for item in alone:
            self._serve_alone(self.handlers[item.request.kind], item)  # type: ignore[arg-type]
        items = [i for i in items if i not in alone]
        stepped = [i for i in items if self.core.stepped(i.request.kind)]
        answered: List[Settlement] = []
        if stepped:
            loop = asyncio.get_running_loop()
            for output in await loop.run_in_executor(self._prep, _prepare_all, self.core, stepped):
                answered.append(self._settlement(output))
                items = [i for i in items if i is not output.item]
        for item in items:
            old = self.core.add_request(item)
            if old is not None:
                exc = ProtocolError(
                    ErrorCode.SUPERSEDED, f"superseded by a newer request of session {old.request.session_id}"
                )
                answered.append(self._error(old.delivery, old.request, exc, dead=False))
        return answered

    def _decode(self, d: Delivery) -> Request:
        """The entry's request; raises _Rejected saying whom to answer: the entry's sid (or,
        when the entry has none, the body's session_id), never a session of another tenant."""
        sid, rid = d.field("sid"), d.field("rid")
        body = d.body
        if body is None:
            raise _Rejected(ProtocolError(ErrorCode.MALFORMED, "stream entry has no 'body' field"), sid, rid)
        try:
            data = read_body(body, self.settings.limits)
        except ProtocolError as exc:
            raise _Rejected(exc, sid, rid) from None
        if sid is None:
            sid = _body_id(data, "session_id")
        if rid is None:
            rid = _body_id(data, "request_id")

        def reject(code: ErrorCode, message: str, to: Optional[str] = sid, detail: Any = None) -> _Rejected:
            return _Rejected(ProtocolError(code, message, detail), to, rid)

        if d.tenant is not None and not (sid or "").startswith(f"{d.tenant}."):
            # no reply: the session (if any) is another tenant's
            raise reject(
                ErrorCode.INVALID,
                f"session {str(sid)[:128]!r} is not of tenant {d.tenant!r} ({d.stream})",
                None,
            )
        if sid is not None and _ID.match(sid) and self.keys.partition_of(sid) != d.partition:
            raise reject(
                ErrorCode.INVALID,
                f"session {sid} belongs to partition {self.keys.partition_of(sid)}, not {d.partition} "
                f"({d.stream}); its reply could not be read",
                None,
            )
        for name in ("v", "kind", "rid", "sid"):
            if d.field(name) is None:
                raise reject(
                    ErrorCode.INVALID, f"the stream entry has no {name!r} field (docs/PROTOCOL.md 3)"
                )
        extra = [k for k in d.fields if k not in _ENTRY_FIELDS]
        if extra:
            listed = ", ".join(repr(k.decode(errors="replace")[:32]) for k in extra[:5])
            raise reject(ErrorCode.INVALID, f"the stream entry has {len(extra)} unknown field(s): {listed}")
        if d.field("kind") != d.kind:
            raise reject(
                ErrorCode.UNKNOWN_KIND,
                f"the entry says kind {d.field('kind')[:64]!r} but was sent to the {d.kind!r} stream",
                detail={"kind": d.field("kind")[:64]},
            )
        try:
            req = validate_request(data, self.settings.limits)
        except ProtocolError as exc:
            raise _Rejected(exc, sid, rid) from None
        if req.kind != d.kind:
            raise reject(
                ErrorCode.UNKNOWN_KIND,
                f"a {req.kind!r} request was sent to the {d.kind!r} stream",
                detail={"kind": req.kind},
            )
        if d.field("v") != str(req.v):
            raise reject(
                ErrorCode.INVALID,
                f"the entry's v field {d.field('v')[:16]!r} does not match the body's {req.v}",
            )
        if req.session_id != d.field("sid") or req.request_id != d.field("rid"):
            raise reject(ErrorCode.INVALID, "the entry's sid/rid fields do not match the body")
        if req.model != d.model:
            where = f"the stream of model {d.model!r}" if d.model else "the stream for any model"
            raise reject(ErrorCode.INVALID, f"a request for model {req.model!r} was sent to {where}")
        return req

    # ------------------------------------------------------------------ serving

    async def _drive_thread(self) -> None:
        """Steps of the engine core in the model thread; each step's answers go to the loop."""
        loop = asyncio.get_running_loop()
        cond = threading.Condition()
        woken = [False]

        def wake() -> None:
            with cond:
                woken[0] = True
                cond.notify()

        self.core.wake = wake

        def run() -> None:
            try:
                steps()
            except Exception as exc:  # the model thread cannot go on: stop, exit non-zero
                if not isinstance(exc, FatalDeviceError):  # a bug: its traceback helps
                    log.exception("the model thread failed")
                loop.call_soon_threadsafe(
                    self._fail, f"the model thread failed: {type(exc).__name__}: {exc}", exc
                )
            finally:
                if self.profiler is not None:  # on the thread the profiler started on
                    self.profiler.close()

        def steps() -> None:
            while not self.failure:
                outputs, plan = self.core.schedule(flush=self._flush)
                if plan.alone is not None:  # counted in Redis before it runs
                    asyncio.run_coroutine_threadsafe(self._before_alone(plan.alone), loop).result(15)
                outputs += self.core.execute(plan)
                if self.profiler is not None:
                    self.profiler.after_step(not plan.idle)
                info = None if plan.idle else self.core.last_step
                partials = self.core.take_partials()
                if partials:  # before the step's answers: a request's pieces precede its reply
                    loop.call_soon_threadsafe(self._on_partials, partials)
                if outputs or info is not None:
                    loop.call_soon_threadsafe(self._on_step, outputs, info)
                if not plan.idle:
                    continue
                if self._intake_done and not len(self.core):
                    return
                with cond:
                    if not woken[0]:
                        cond.wait(_timeout(plan.ready_at, self._flush))
                    woken[0] = False

        await loop.run_in_executor(self._executor, run)

    async def _drive_inline(self) -> None:
        """The same steps on the event loop, for handlers that never block (no model)."""
        event = asyncio.Event()
        self.core.wake = event.set
        try:
            await self._inline_steps(event)
        finally:
            if self.profiler is not None:
                self.profiler.close()

    async def _inline_steps(self, event: asyncio.Event) -> None:
        while not self.failure:
            event.clear()
            outputs, plan = self.core.schedule(flush=self._flush)
            if plan.alone is not None:
                await self._before_alone(plan.alone)
            try:
                outputs += self.core.execute(plan)
            except Exception as exc:
                if not isinstance(exc, FatalDeviceError):
                    log.exception("a step failed")
                self._fail(f"a step failed: {type(exc).__name__}: {exc}", exc)
                return
            if self.profiler is not None:
                self.profiler.after_step(not plan.idle)
            if outputs or not plan.idle:
                self._on_step(outputs, None if plan.idle else self.core.last_step)
            if not plan.idle:
                await asyncio.sleep(0)  # let the intake and the commits run between steps
                continue
            if self._intake_done and not len(self.core):
                return
            try:
                await asyncio.wait_for(event.wait(), _timeout(plan.ready_at, self._flush))
            except asyncio.TimeoutError:
                pass

    def _on_step(self, outputs: List[Output], info: Optional[StepInfo]) -> None:
        """On the loop: observers hear of the step, the answered requests' replies are committed."""
        if info is not None:
            self.stats["batches"] += 1
            self.events.on_step(info)
            batch = info.plan.batch
            if batch is not None and self.handlers[batch.kind].blocking:
                self.core.answered(batch.kind, [i.request.session_id for i in batch.items])
        if not outputs:
            return
        self.stats["requests"] += len(outputs)
        for o in outputs:
            self.in_flight[id(o.item)] = o.item
        if self.partials is not None:
            self.partials.finished([o.item for o in outputs])
        task = asyncio.create_task(
            self._commit([self._settlement(o) for o in outputs], [o.item for o in outputs])
        )
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    def _on_partials(self, partials: List[PartialOutput]) -> None:
        if self.partials is not None:
            self.partials.push(partials)

    def _settlement(self, o: Output) -> Settlement:
        if isinstance(o.result, ProtocolError):
            dead = o.result.code != ErrorCode.SUPERSEDED
            return self._error(o.item.delivery, o.item.request, o.result, dead, o.batch_size, o.timings)
        return self._ok(o.item, o.result, o.batch_size, o.timings)

    def _serve_alone(self, handler: AsyncHandler, item: Item) -> None:
        """A kind whose backend batches by itself (vLLM): this request goes to it now, on its
        own, on the loop; the core never sees it."""
        self.in_flight[id(item)] = item

        async def serve() -> None:
            started = time.time()
            if item.request.expired(started):
                late = started - (item.request.deadline or 0.0)
                result = ProtocolError(
                    ErrorCode.EXPIRED, f"deadline passed {late * 1000:.0f} ms before the model could run it"
                )
            else:
                try:
                    result = await handler.serve(item.request)
                except Exception as exc:  # a backend failure fails this request alone
                    log.exception("handler %s failed", handler.kind)
                    result = ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            timings = {
                "queue_ms": (started - item.delivery.received_at) * 1000.0,
                "model_ms": (time.time() - started) * 1000.0,
            }
            self.stats["requests"] += 1
            await self._commit([self._settlement(Output(item, result, timings, 1))], [item])

        task = asyncio.create_task(serve())
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    # ------------------------------------------------------------------ replies

    def _reply(
        self,
        d: Delivery,
        req: Optional[Request],
        ok: bool,
        session: Optional[str] = None,
        request_id: Optional[str] = None,
        **fields,
    ) -> bytes:
        reply = Reply(
            request_id=req.request_id if req else (request_id or d.field("rid") or ""),
            session_id=req.session_id if req else (session or d.field("sid") or ""),
            step=req.step if req else 0,
            kind=req.kind if req else d.kind,
            ok=ok,
            worker=self.name,
            created_at=req.created_at if req else 0.0,
            received_at=d.received_at,
            replied_at=time.time(),
            delivery=d.deliveries,
            **fields,
        )
        return packb(reply.to_wire())

    def _ok(self, item: Item, result, batch_size: int, timings: Dict[str, float]) -> Settlement:
        body = self._reply(
            item.delivery, item.request, True, result=result, batch_size=batch_size, timings=timings
        )
        return Settlement(item.delivery, body)

    def _error(
        self,
        d: Delivery,
        req: Optional[Request],
        exc: ProtocolError,
        dead: bool,
        batch_size: int = 0,
        timings: Optional[Dict[str, float]] = None,
        session: Optional[str] = None,
        request_id: Optional[str] = None,
        answer: bool = True,
    ) -> Settlement:
        """An error reply (to `session` when given, else the entry's sid; to nobody unless
        `answer`) and, when `dead`, a dead letter."""
        detail = exc.detail if exc.detail is not None else {}
        error = ErrorInfo(code=exc.code, message=exc.message, detail=detail)
        body = self._reply(
            d,
            req,
            False,
            session=session,
            request_id=request_id,
            error=error,
            batch_size=batch_size,
            timings=timings or {},
        )
        reason = {"code": exc.code.value, "reason": exc.message} if dead else None
        return Settlement(
            d, body if answer else None, reason, exc.code.value, session=session, request_id=request_id
        )

    async def _commit(self, settlements: List[Settlement], items: Sequence[Item] = ()) -> None:
        """Write replies, acks and dead letters. Transient Redis errors are retried for
        commit_retry_s, others _PERMANENT_COMMIT_TRIES times; then the worker fails (a retry
        writes each settlement once: the commit is fenced)."""
        if self.failure:  # stopping: leave them pending for another worker
            return
        t0 = time.perf_counter()
        permanent = 0

        def retryable(exc: Exception) -> bool:
            nonlocal permanent
            self._redis_error("commit", exc)
            if not is_transient_redis_error(exc):
                permanent += 1
            return permanent < _PERMANENT_COMMIT_TRIES

        retry = self.settings.broker.retry.with_(attempts=None, deadline_s=self.settings.commit_retry_s)
        try:
            fenced = await retry.run(lambda: self.writer.commit(settlements), retry_if=retryable)
        except Exception as exc:
            self._fail(f"writing {len(settlements)} replies failed: {type(exc).__name__}: {exc}")
            return
        self.last_commit_at = time.time()
        self.core.replied(items)
        if fenced:
            self.stats["fenced"] += fenced
            log.warning("%d result(s) dropped: their messages were taken over by another worker", fenced)
            settlements = [o for o in settlements if not o.fenced]
        self.events.on_committed(settlements, time.perf_counter() - t0)
        for o in settlements:
            self.events.on_reply(o.delivery.kind, o.code)
            if o.code is not None:
                self.stats["errors"] += 1
            if o.dead_letter is not None:
                self.stats["dead_letters"] += 1
                self.events.on_dead_letter(o.delivery.kind, o.dead_letter["code"])
        for i in items:
            self.in_flight.pop(id(i), None)
        self._room.set()

    # ------------------------------------------------------------------ failures

    def _fail(self, reason: str, exc: Optional[BaseException] = None) -> None:
        """Stop reading and answering; run() then raises the fatal device error that caused
        it, else WorkerFailure."""
        if self.failure is None:
            log.error("worker %s stops: %s", self.name, reason)
            self.failure = reason
            self._failure_exc = exc if isinstance(exc, FatalDeviceError) else None
        self.request_stop()

    def _redis_error(self, op: str, exc: BaseException) -> None:
        self.stats["redis_errors"] += 1
        self.events.on_redis_error(op)
        log.warning("%s failed (%s: %s)", op, type(exc).__name__, exc)

    async def _before_alone(self, item: Item) -> None:
        """Count this run of a suspect alone before the model starts it: if the worker dies
        now, the next holder knows the message ran alone (and may be the culprit)."""
        self.stats["runs_alone"] += 1
        self.events.on_run_alone(item.request.kind)
        try:
            await asyncio.wait_for(self.reader.mark_run_alone(item.delivery), 10.0)
        except Exception as exc:  # not counted: it gets one more run alone later, nothing worse
            self._redis_error("mark_run_alone", exc)

    def health(self) -> float:
        """Seconds since the last commit while this worker holds requests (0 when idle)."""
        held = [i.delivery.received_at for i in self.in_flight.values()]
        held += [i.delivery.received_at for i in self.core.held()]
        if not held:
            return 0.0
        return max(0.0, time.time() - max(self.last_commit_at, min(held)))

    # ------------------------------------------------------------------ side duties

    async def _keep_alive(self) -> None:
        period = self.settings.broker.claim_min_idle_ms / 3000.0
        while not self.stopping:
            await asyncio.sleep(period)
            held = [i.delivery for i in self.in_flight.values()] + [i.delivery for i in self.core.held()]
            try:
                lost = await self.reader.keep_alive(held)
            except Exception as exc:
                self._redis_error("keep_alive", exc)
                continue
            # (not those answered while the keep-alive ran: their entries are simply gone)
            holding = {id(i.delivery) for i in self.in_flight.values()}
            holding |= {id(i.delivery) for i in self.core.held()}
            lost = [d for d in lost if id(d) in holding]
            if lost:  # their commits will be fenced off; the other holder answers them
                self.stats["taken_over"] += len(lost)
                log.warning("%d held message(s) were taken over by another worker", len(lost))

    async def _heartbeat(self) -> None:
        key = self.keys.worker(self.name)
        ttl = max(1, int(self.settings.heartbeat_s * 3 + 0.999))
        while not self.stopping:
            info = {
                "name": self.name,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "kinds": ",".join(self.handlers),
                "model_name": self.settings.model_name or "",  # gateways route by it
                "backend": self.settings.backend,
                "device": self.settings.device,
                "engine_path": _engine_path(self.handlers),
                "metrics_port": self.settings.metrics_port,  # `vlmq top` scrapes host:metrics_port
                "started_at": f"{self.started_at:.3f}",
                "seen_at": f"{time.time():.3f}",
                "tenants": ",".join(self.settings.tenants),
                "queued": self.core.waiting(),
                "in_flight": len(self.core) - self.core.waiting() + len(self.in_flight),
                "last_commit_at": f"{self.last_commit_at:.3f}",
                "stalled_s": f"{self.health():.3f}",
                **{k: v for k, v in self.stats.items()},
            }
            self.events.on_tick(
                self.core.waiting(),
                len(self.core) - self.core.waiting() + len(self.in_flight),
                list(self.handlers),
            )
            self.events.on_health(self.health(), self.last_commit_at)
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(key, mapping=info)
                pipe.expire(key, ttl)
                await pipe.execute()
                await self.reader.refresh_epochs()  # another worker may have recreated them
            except Exception as exc:
                self._redis_error("heartbeat", exc)
            await asyncio.sleep(self.settings.heartbeat_s)


def _prepare_all(core: EngineCore, items: List[Item]) -> List[Output]:
    """Prepare stepped requests (prep thread); the answered ones come back."""
    return [o for o in (core.prepare(i) for i in items) if o is not None]


def _engine_path(handlers: Dict[str, Handler]) -> str:
    """The chat engine's path: "fast", "stock" (asked for) or "stock (self-check failed)";
    "" for a worker without the hf engine."""
    for h in handlers.values():
        path = getattr(getattr(h, "engine", None), "path", None)
        if isinstance(path, str):
            return path
    return ""


def _prefill_tokens(handlers: Dict[str, Handler]) -> int:
    for h in handlers.values():
        options = getattr(getattr(h, "engine", None), "options", None)
        if options is not None and hasattr(options, "prefill_tokens"):
            return int(options.prefill_tokens)
    return Policy.__dataclass_fields__["prefill_tokens"].default


def _timeout(ready_at: float, flush: bool) -> Optional[float]:
    """How long an idle driver sleeps: until the next batch is ready; while shutting down,
    briefly, to see the core drain."""
    wait = None if math.isinf(ready_at) else max(0.0, ready_at - time.monotonic())
    if flush:
        wait = 0.05 if wait is None else min(wait, 0.05)
    return wait


def _body_id(data: Dict, name: str) -> Optional[str]:
    value = data.get(name)
    return value if isinstance(value, str) and _ID.match(value) else None


def _run_safely(handler: Handler, requests: List[Request]) -> HandlerOutput:
    """Run a batch. If it raises, run it again in halves (recursively), so one bad request
    fails alone (`internal`) and the others are answered; out of memory on the device, the
    halves also need less. A fatal device error is raised as FatalDeviceError: nothing
    more can run in this process (failures.py)."""
    try:
        out = handler.run(requests)
        if len(out.results) != len(requests):
            raise RuntimeError(f"handler returned {len(out.results)} results for {len(requests)} requests")
        return out
    except Exception as exc:
        if is_fatal_device_error(exc):
            raise FatalDeviceError(
                f"{handler.kind} batch of {len(requests)}: {type(exc).__name__}: {exc}"
            ) from exc
        oom = is_out_of_memory(exc)
        if oom:
            release_device_memory()
        if len(requests) == 1:
            log.exception("handler %s failed", handler.kind)
            what = "out of memory even alone: " if oom else ""
            return HandlerOutput([ProtocolError(ErrorCode.INTERNAL, f"{what}{type(exc).__name__}: {exc}")])
        log.warning(
            "handler %s failed on a batch of %d (%s: %s); running it in halves",
            handler.kind,
            len(requests),
            type(exc).__name__,
            exc,
        )
    mid = len(requests) // 2
    results = []
    timings: Dict[str, float] = {}
    for half in (requests[:mid], requests[mid:]):
        one = _run_safely(handler, half)
        results += one.results
        for k, v in one.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return HandlerOutput(results, timings)
