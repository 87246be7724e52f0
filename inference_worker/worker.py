"""The worker loop: intake -> scheduler -> model thread -> replies, all overlapping.

Four coroutines share one event loop: the intake reads request streams (XREADGROUP) while
the model thread runs the current batch; the reclaimer takes over messages of dead
consumers; the keep-alive re-claims what this worker holds so no one else takes it; the
heartbeat advertises the worker. The model never waits on Redis and the event loop never
waits on the model. A request is acked only in the MULTI that writes its reply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Set

from broker.connection import connect_async
from broker.consumer import Delivery, GroupReader
from broker.keys import Keys
from broker.meta import agree_partitions
from broker.replies import Outcome, ReplyWriter
from inference_worker.events import Observers, WorkerObserver
from inference_worker.handlers.base import AsyncHandler, Handler, HandlerOutput
from inference_worker.scheduler import Batch, Item, Scheduler
from inference_worker.settings import WorkerSettings
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
        self.scheduler = Scheduler(settings.batch_limit, settings.max_wait_ms, settings.regroup_ms)
        self.in_flight: Dict[int, Item] = {}  # by id(): handed to the model or being committed
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._commits: Set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmq-model")
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
        self.scheduler.wake()

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
        try:
            await self._serve(lambda: self.stopping)
            await side[0]  # the intake finishes its last read and admits it
            await self._serve(lambda: True)  # what that last read admitted
        finally:
            self._stopping.set()
            for t in side:
                t.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            if self._commits:
                await asyncio.gather(*self._commits, return_exceptions=True)
            try:
                await self.redis.delete(self.keys.worker(self.name))
            except Exception:  # Redis may be gone; the key expires anyway
                pass
            if own_redis:
                await self.redis.aclose()
            self._executor.shutdown(wait=True)
            for h in self.handlers.values():
                h.close()
        log.info("worker %s stopped: %s", self.name, self.stats)

    # ------------------------------------------------------------------ intake

    def _room_left(self) -> int:
        return self.settings.read_ahead - len(self.scheduler) - len(self.in_flight)

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
            handler = self.handlers[req.kind]
            if isinstance(handler, AsyncHandler):
                self._serve_alone(handler, item)
                continue
            old = self.scheduler.add(item)
            if old is not None:
                exc = ProtocolError(
                    ErrorCode.SUPERSEDED, f"superseded by a newer request of session {req.session_id}"
                )
                rejected.append(self._error(old.delivery, old.request, exc, dead=False))
        if rejected:
            await self._commit(rejected)

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

    async def _serve(self, flush: Callable[[], bool]) -> None:
        """Run batches until the scheduler is empty with flush() true (then no batch waits
        for stragglers)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.scheduler.next_batch(flush=flush)
            if batch is None:
                return
            if batch.expired:
                await self._commit([self._expired(i) for i in batch.expired])
            if batch.items:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        for i in batch.items:
            self.in_flight[id(i)] = i
        handler = self.handlers[batch.kind]
        started = time.time()
        if handler.blocking:
            output = await loop.run_in_executor(self._executor, _run_safely, handler, batch.requests)
        else:
            output = _run_safely(handler, batch.requests)
        finished = time.time()
        if handler.blocking:  # regrouping is for batches that cost the model a pass
            self.scheduler.answered(batch.kind, (i.request.session_id for i in batch.items))
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch.items)
        self.events.on_batch(batch, output.timings, started, finished)
        outcomes = []
        for item, result in zip(batch.items, output.results):
            timings = dict(output.timings)
            timings["queue_ms"] = (started - item.delivery.received_at) * 1000.0
            if isinstance(result, ProtocolError):
                outcomes.append(
                    self._error(item.delivery, item.request, result, dead=True, batch=batch, timings=timings)
                )
            else:
                outcomes.append(self._ok(item, result, len(batch.items), timings))
        task = asyncio.create_task(self._commit(outcomes, batch.items))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    def _serve_alone(self, handler: AsyncHandler, item: Item) -> None:
        """A kind whose backend batches by itself: this request goes to it now, on its own."""
        self.in_flight[id(item)] = item

        async def serve() -> None:
            if item.request.expired(time.time()):
                outcome = self._expired(item)
            else:
                started = time.time()
                try:
                    result = await handler.serve(item.request)
                except Exception as exc:  # a backend failure fails this request alone
                    log.exception("handler %s failed", handler.kind)
                    result = ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                timings = {
                    "queue_ms": (started - item.delivery.received_at) * 1000.0,
                    "serve_ms": (time.time() - started) * 1000.0,
                }
                self.stats["requests"] += 1
                if isinstance(result, ProtocolError):
                    outcome = self._error(item.delivery, item.request, result, dead=True, timings=timings)
                else:
                    outcome = self._ok(item, result, 1, timings)
            await self._commit([outcome], [item])

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
        batch: Optional[Batch] = None,
        timings: Optional[Dict[str, float]] = None,
    ) -> Outcome:
        error = ErrorInfo(code=exc.code, message=exc.message, detail=exc.detail)
        body = self._reply(
            d, req, False, error=error, batch_size=len(batch.items) if batch else 0, timings=timings or {}
        )
        reason = {"code": exc.code.value, "reason": exc.message} if dead else None
        return Outcome(d, body, reason, exc.code.value)

    def _expired(self, item: Item) -> Outcome:
        late = time.time() - (item.request.deadline or 0.0)
        exc = ProtocolError(
            ErrorCode.EXPIRED, f"deadline passed {late * 1000:.0f} ms before the model could run it"
        )
        return self._error(item.delivery, item.request, exc, dead=True)

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
        if items and self.handlers[items[0].request.kind].blocking:
            self.scheduler.replied(items[0].request.kind, (i.request.session_id for i in items))
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
            held = [i.delivery for i in self.in_flight.values()] + [
                i.delivery for i in self.scheduler.items()
            ]
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
                "backend": self.settings.backend,
                "device": self.settings.device,
                "metrics_port": self.settings.metrics_port,  # `vlmq top` scrapes host:metrics_port
                "started_at": f"{self.started_at:.3f}",
                "seen_at": f"{time.time():.3f}",
                "queued": len(self.scheduler),
                "in_flight": len(self.in_flight),
                **{k: v for k, v in self.stats.items()},
            }
            self.events.on_tick(len(self.scheduler), len(self.in_flight), list(self.handlers))
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(key, mapping=info)
                pipe.expire(key, ttl)
                await pipe.execute()
                await self.reader.refresh_epochs()  # another worker may have recreated them
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_s)


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
