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
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Set

from broker.connection import connect_async
from broker.consumer import Delivery, GroupReader
from broker.keys import Keys
from broker.meta import agree_partitions
from broker.replies import Outcome, ReplyWriter
from inference_worker.core import EngineCore, Output, PartialOutput, StepInfo
from inference_worker.events import Observers, WorkerObserver
from inference_worker.handlers.base import AsyncHandler, Handler, HandlerOutput
from inference_worker.scheduler import Item, Policy
from inference_worker.settings import WorkerSettings
from inference_worker.streaming import PartialWriter
from schemas.codec import packb
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import ErrorInfo, Reply, Request, decode_request

log = logging.getLogger("vlmq.worker")


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
        }
        self.started_at = time.time()

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
            out += self.keys.request_streams(kind)
            if self.settings.model_name:
                out += self.keys.request_streams(kind, self.settings.model_name)
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
        log.info("worker %s stopped: %s", self.name, self.stats)

    # ------------------------------------------------------------------ intake

    def _room_left(self) -> int:
        return self.settings.read_ahead - len(self.core) - len(self.in_flight)

    async def _intake(self) -> None:
        while not self.stopping:
            room = self._room_left()
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                deliveries = await self.reader.read(room, self.settings.block_ms)
            except Exception as exc:  # connection lost: redis-py retried with backoff already
                log.warning("read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if deliveries:
                await self._admit(deliveries)
                await asyncio.sleep(0)  # let the batch start before the next read is sent
        leftover = await self.reader.settle()  # reads still in flight on a Redis Cluster
        if leftover:
            await self._admit(leftover)

    async def _reclaimer(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.settings.reclaim_interval_s)
            room = self._room_left()
            if room <= 0 or self.stopping:
                continue
            try:
                deliveries = await self.reader.reclaim(room)
            except Exception as exc:
                log.warning("reclaim failed: %s", exc)
                continue
            if deliveries:
                self.stats["reclaimed"] += len(deliveries)
                log.info("reclaimed %d message(s) from dead consumers", len(deliveries))
                await self._admit(deliveries)

    async def _admit(self, deliveries: List[Delivery]) -> None:
        rejected: List[Outcome] = []
        valid: List[Item] = []
        for d in deliveries:
            # Before decoding: a message that kills the worker while it is decoded must
            # still stop being retried.
            if d.deliveries > self.settings.broker.max_deliveries:
                exc = ProtocolError(
                    ErrorCode.DEAD_LETTER,
                    f"delivered {d.deliveries} times without completing (max_deliveries="
                    f"{self.settings.broker.max_deliveries}); moved to dead letters",
                )
                rejected.append(self._error(d, None, exc, dead=True))
                continue
            try:
                req = self._decode(d)
            except ProtocolError as exc:
                rejected.append(self._error(d, None, exc, dead=True))
                continue
            except Exception as exc:  # a validation bug must not kill the intake
                log.exception("decoding %s %s failed", d.stream, d.entry_id)
                exc = ProtocolError(ErrorCode.MALFORMED, f"could not decode: {type(exc).__name__}: {exc}")
                rejected.append(self._error(d, None, exc, dead=True))
                continue
            item = Item(d, req)
            self.events.on_admitted(req.kind, item)
            valid.append(item)
        if valid:
            rejected += await self._queue(valid)
        if rejected:
            await self._commit(rejected)

    async def _queue(self, items: List[Item]) -> List[Outcome]:
        """Hand valid requests to the core (chat requests of stepped kinds prepared first, on
        the prep thread); returns the replies of those answered at once."""
        alone = [i for i in items if isinstance(self.handlers[i.request.kind], AsyncHandler)]
        for item in alone:
            self._serve_alone(self.handlers[item.request.kind], item)  # type: ignore[arg-type]
        items = [i for i in items if i not in alone]
        stepped = [i for i in items if self.core.stepped(i.request.kind)]
        answered: List[Outcome] = []
        if stepped:
            loop = asyncio.get_running_loop()
            for output in await loop.run_in_executor(self._prep, _prepare_all, self.core, stepped):
                answered.append(self._outcome(output))
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
        body = d.body
        if body is None:
            raise ProtocolError(ErrorCode.MALFORMED, "stream entry has no 'body' field")
        req = decode_request(body, self.settings.limits)
        if req.kind != d.kind:
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND, f"a {req.kind!r} request was sent to the {d.kind!r} stream"
            )
        if req.session_id != d.field("sid") or req.request_id != d.field("rid"):
            raise ProtocolError(ErrorCode.INVALID, "the entry's sid/rid fields do not match the body")
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
            while True:
                outputs, plan = self.core.step(flush=self._flush)
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
        while True:
            event.clear()
            outputs, plan = self.core.step(flush=self._flush)
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
            self._commit([self._outcome(o) for o in outputs], [o.item for o in outputs])
        )
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    def _on_partials(self, partials: List[PartialOutput]) -> None:
        if self.partials is not None:
            self.partials.push(partials)

    def _outcome(self, o: Output) -> Outcome:
        if isinstance(o.result, ProtocolError):
            dead = o.result.code not in (ErrorCode.SUPERSEDED, ErrorCode.CANCELLED)
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
            await self._commit([self._outcome(Output(item, result, timings, 1))], [item])

        task = asyncio.create_task(serve())
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    # ------------------------------------------------------------------ replies

    def _reply(self, d: Delivery, req: Optional[Request], ok: bool, **fields) -> bytes:
        reply = Reply(
            request_id=req.request_id if req else (d.field("rid") or ""),
            session_id=req.session_id if req else (d.field("sid") or ""),
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

    def _ok(self, item: Item, result, batch_size: int, timings: Dict[str, float]) -> Outcome:
        body = self._reply(
            item.delivery, item.request, True, result=result, batch_size=batch_size, timings=timings
        )
        return Outcome(item.delivery, body)

    def _error(
        self,
        d: Delivery,
        req: Optional[Request],
        exc: ProtocolError,
        dead: bool,
        batch_size: int = 0,
        timings: Optional[Dict[str, float]] = None,
    ) -> Outcome:
        error = ErrorInfo(code=exc.code, message=exc.message, detail=exc.detail)
        body = self._reply(d, req, False, error=error, batch_size=batch_size, timings=timings or {})
        reason = {"code": exc.code.value, "reason": exc.message} if dead else None
        return Outcome(d, body, reason, exc.code.value)

    async def _commit(self, outcomes: List[Outcome], items: Sequence[Item] = ()) -> None:
        delay = 0.05
        t0 = time.perf_counter()
        while True:
            try:
                fenced = await self.writer.commit(outcomes)
                break
            except Exception as exc:  # keep the results: a retry writes each outcome once
                log.warning("writing %d replies failed (%s); retrying", len(outcomes), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.core.replied(items)
        if fenced:
            self.stats["fenced"] += fenced
            log.warning("%d result(s) dropped: their messages were taken over by another worker", fenced)
            outcomes = [o for o in outcomes if not o.fenced]
        self.events.on_committed(outcomes, time.perf_counter() - t0)
        for o in outcomes:
            self.events.on_reply(o.delivery.kind, o.code)
            if o.code is not None:
                self.stats["errors"] += 1
            if o.dead_letter is not None:
                self.stats["dead_letters"] += 1
                self.events.on_dead_letter(o.delivery.kind, o.dead_letter["code"])
        for i in items:
            self.in_flight.pop(id(i), None)
        self._room.set()

    # ------------------------------------------------------------------ side duties

    async def _keep_alive(self) -> None:
        period = self.settings.broker.claim_min_idle_ms / 3000.0
        while not self.stopping:
            await asyncio.sleep(period)
            held = [i.delivery for i in self.in_flight.values()] + [i.delivery for i in self.core.held()]
            try:
                await self.reader.keep_alive(held)
            except Exception as exc:
                log.warning("keep-alive failed: %s", exc)

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
                "metrics_port": self.settings.metrics_port,  # `vlmq top` scrapes host:metrics_port
                "started_at": f"{self.started_at:.3f}",
                "seen_at": f"{time.time():.3f}",
                "queued": self.core.waiting(),
                "in_flight": len(self.core) - self.core.waiting() + len(self.in_flight),
                **{k: v for k, v in self.stats.items()},
            }
            self.events.on_tick(
                self.core.waiting(),
                len(self.core) - self.core.waiting() + len(self.in_flight),
                list(self.handlers),
            )
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(key, mapping=info)
                pipe.expire(key, ttl)
                await pipe.execute()
                await self.reader.refresh_epochs()  # another worker may have recreated them
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_s)


def _prepare_all(core: EngineCore, items: List[Item]) -> List[Output]:
    """Prepare stepped requests (prep thread); the answered ones come back."""
    return [o for o in (core.prepare(i) for i in items) if o is not None]


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


def _run_safely(handler: Handler, requests: List[Request]) -> HandlerOutput:
    """Run a batch; if it raises, run its requests one by one so one bad request fails alone."""
    try:
        out = handler.run(requests)
        if len(out.results) != len(requests):
            raise RuntimeError(f"handler returned {len(out.results)} results for {len(requests)} requests")
        return out
    except Exception as exc:
        if len(requests) == 1:
            log.exception("handler %s failed", handler.kind)
            return HandlerOutput([ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")])
    results = []
    timings: Dict[str, float] = {}
    for r in requests:
        one = _run_safely(handler, [r])
        results += one.results
        for k, v in one.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return HandlerOutput(results, timings)
