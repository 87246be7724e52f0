"""AgentClient: publish requests, read this session's replies, match them by request_id.

Core install only (redis, msgpack, numpy, pydantic): no torch, runs in the simulator's
Python. One reader task per session reads its reply stream (and nothing else), resolves
the future of each request, drops duplicates (at-least-once delivery) and ignores replies
to requests it never sent (left over from an earlier process of the same session).

A watchdog task notices requests that Redis lost (a restart without persistence, a
failover to a replica that never had them) and publishes them again with the same
request_id, so the reply that does come is delivered once:
- every `lost_check_s` it compares the partition's epoch token with the one read when each
  request was published (broker/publisher.py): a different token means the data was lost;
- a request unanswered after `presence_check_s` (or past its deadline) is looked for in
  its stream (broker/recovery.py); if it is neither waiting nor pending, and the reply
  stream read up to its newest entry holds no reply to it, it was lost.
request() gives up after `request_timeout_s` (300 s unless set) with RequestTimeout.

    client = AgentClient("robot-7", url="redis://localhost:6379")
    reply = client.request(TextActionRequest(messages=[...]), timeout=10)

Streaming (`AsyncAgentClient.stream`): the request's partial replies, then its reply, as
an async iterator. Partials come from the session's partial stream, read by a second
reader task that starts with the first streaming request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Deque, Dict, List, Optional, Set, Tuple, Union

from redis.exceptions import RedisError

from broker.connection import connect_async
from broker.eventloop import new_event_loop
from broker.keys import Keys
from broker.meta import agree_partitions
from broker.publisher import Published, Publisher
from broker.recovery import GONE, entry_states
from broker.responses import stream_entries, text
from broker.settings import BrokerSettings
from schemas.errors import ErrorCode, ProtocolError
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import Partial, Reply, Request, decode_partial, decode_reply

log = logging.getLogger("vlmq.client")

_BLOCK_MS = 250  # reply-stream XREAD block; bounds how long close() waits
_LATE_CHECK_S = 5.0  # a request this long past its deadline without a reply is looked for


class ReplyError(ProtocolError):
    """The worker answered with an error reply."""

    def __init__(self, reply: Reply) -> None:
        assert reply.error is not None
        super().__init__(ErrorCode(reply.error.code), reply.error.message, reply.error.detail)
        self.reply = reply


class RequestTimeout(asyncio.TimeoutError):
    """No reply within the request's timeout (the request may still be answered later; a
    late reply is then ignored)."""


@dataclass
class _Sent:
    """What the watchdog knows of an unanswered request."""

    req: Request
    published: Published
    epoch: Optional[str]  # the epoch token it was published under (None: none was set)
    at: float  # monotonic time of the last publish
    checked: float  # monotonic time of the last presence check (or publish)


def _id(entry_id: str) -> Tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class AsyncAgentClient:
    def __init__(
        self,
        session_id: str,
        *,
        url: Optional[str] = None,
        redis=None,
        settings: Optional[BrokerSettings] = None,
        limits: Limits = DEFAULT_LIMITS,
        raise_on_error: bool = True,
        tenant: Optional[str] = None,
        request_timeout_s: Optional[float] = None,
    ) -> None:
        """url overrides settings.url; tenant, settings.tenant (publish to the tenant's
        streams); request_timeout_s, settings.request_timeout_s (0: wait forever)."""
        settings = settings or BrokerSettings.from_env()
        if url:
            settings = settings.with_(url=url)
        if tenant is not None:
            settings = settings.with_(tenant=tenant)
        if request_timeout_s is not None:
            settings = settings.with_(request_timeout_s=request_timeout_s)
        self.session_id = session_id
        self.settings = settings
        self.limits = limits
        self.raise_on_error = raise_on_error
        self._own_redis = redis is None
        self.redis = redis if redis is not None else connect_async(self.settings)
        self.keys = Keys(self.settings.prefix, self.settings.partitions)
        self.reply_stream = self.keys.reply_stream(session_id)
        self.epoch_key = self.keys.epoch(self.keys.partition_of(session_id))
        self.publisher = Publisher(self.redis, self.settings)
        self._pending: Dict[str, asyncio.Future] = {}
        self._sent: Dict[str, _Sent] = {}
        self._done: Deque[str] = collections.deque(maxlen=4096)
        self._done_set: Set[str] = set()
        self._reader: Optional[asyncio.Task] = None
        self._watchdog: Optional[asyncio.Task] = None
        self._closing = False
        self._last_id = "0-0"
        self._presence_denied = False
        self._epoch_seen: Optional[str] = None  # the partition's token at the last check
        self.duplicates = 0  # replies dropped because their request was already answered
        self.stale = 0  # replies to requests this client never sent
        self.reconnects = 0
        self._streaming: Dict[str, _PieceQueue] = {}  # request_id -> its partials, in order
        self._parts_reader: Optional[asyncio.Task] = None
        self._parts_last = "0-0"
        self.partials_dropped = 0  # pieces out of order, repeated, or of another delivery
        self.republished = 0  # requests published again because Redis had lost them

    async def start(self) -> AsyncAgentClient:
        if self._reader is None:
            if self.settings.tenant and not self.session_id.startswith(f"{self.settings.tenant}."):
                raise ValueError(
                    f"session {self.session_id!r} is not of tenant {self.settings.tenant!r}: "
                    f"name it '{self.settings.tenant}.<name>'"
                )
            self._slots = asyncio.Semaphore(self.settings.reply_maxlen)
            await agree_partitions(self.redis, self.settings, "client")
            # Start after the newest reply already there: what came before belongs to an
            # earlier life of this session and must not be mistaken for ours.
            last = await self.redis.xrevrange(self.reply_stream, count=1)
            if last:
                self._last_id = text(last[0][0])
            self._reader = asyncio.create_task(self._read_replies(), name=f"replies:{self.session_id}")
            self._watchdog = asyncio.create_task(self._watch(), name=f"lost:{self.session_id}")
        return self

    async def submit(self, req: Request, wait_timeout: Optional[float] = None) -> asyncio.Future:
        """Publish a request; returns a future that resolves to its Reply."""
        await self.start()
        if not req.session_id:
            req.session_id = self.session_id
        elif req.session_id != self.session_id:
            raise ValueError(f"request is for session {req.session_id!r}, this client is {self.session_id!r}")
        # More requests in flight than the reply stream keeps (VLMQ_REPLY_MAXLEN) could see
        # replies trimmed before they are read: wait for a slot instead.
        await self._slots.acquire()
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _: self._slots.release())
        rid = req.request_id
        self._pending[rid] = fut  # before XADD: the reply may beat us back
        fut.add_done_callback(lambda _: self._sent.pop(rid, None))
        try:
            published = await self.publisher.publish(req, wait_timeout)
        except BaseException:
            self._pending.pop(rid, None)
            fut.cancel()
            raise
        if not fut.done():
            now = time.monotonic()
            self._sent[rid] = _Sent(req, published, published.epoch, now, now)
        return fut

    async def request(self, req: Request, timeout: Optional[float] = None) -> Reply:
        """Publish and wait for the reply; raises ReplyError on an error reply (unless
        raise_on_error=False) and RequestTimeout (an asyncio.TimeoutError) after `timeout`
        seconds: by default settings.request_timeout_s; math.inf waits forever. A request
        without a deadline gets one at the timeout: the worker stops it when the client
        gives up."""
        if timeout is None:
            timeout = self.settings.request_timeout_s or math.inf
        if req.deadline is None and not math.isinf(timeout):
            # past the time this client waits, nobody reads the answer: the worker stops the
            # request there (expired while waiting, deadline_exceeded while generating), and
            # its decode slot goes to someone else
            req = req.model_copy(update={"deadline": time.time() + timeout})
        fut = await self.submit(req)
        try:  # (wait_for cancels fut on timeout, which frees its slot)
            reply = await (fut if math.isinf(timeout) else asyncio.wait_for(fut, timeout))
        except asyncio.TimeoutError:
            self._pending.pop(req.request_id, None)
            raise RequestTimeout(
                f"no reply to {req.kind} request {req.request_id} of session {self.session_id} within "
                f"{timeout:g} s (VLMQ_REQUEST_TIMEOUT_S or timeout=); is a worker serving "
                f"{req.kind!r}? (`vlmq inspect`)"
            ) from None
        if self.raise_on_error and not reply.ok:
            raise ReplyError(reply)
        return reply

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ lost data

    async def _watch(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.lost_check_s)
            if not self._sent or self._closing:
                continue
            try:
                await self._check()
            except (RedisError, OSError) as exc:  # Redis away: the next round tries again
                log.debug("session %s: lost-data check failed (%s)", self.session_id, exc)

    async def _check(self) -> None:
        raw = await self.redis.get(self.epoch_key)
        epoch = None if raw is None else text(raw)
        seen, self._epoch_seen = self._epoch_seen, epoch
        now = time.monotonic()
        wall = time.time()
        lost: List[_Sent] = []
        look: List[_Sent] = []
        for s in list(self._sent.values()):
            if s.epoch is not None and s.epoch != epoch:
                lost.append(s)  # the token changed: Redis lost what it had under the old one
            elif s.epoch is None and seen is not None and epoch != seen:
                # published before any token was set, and the token seen since is gone
                lost.append(s)
            elif s.epoch is None and epoch is not None:
                look.append(s)  # published before any token was set: is it still there?
            else:
                # past its deadline a request is answered `expired` as soon as a worker sees
                # it: no reply a few seconds later is worth a look sooner
                late = s.req.deadline is not None and wall > s.req.deadline
                wait = (
                    min(self.settings.presence_check_s, _LATE_CHECK_S)
                    if late
                    else self.settings.presence_check_s
                )
                if now - s.checked >= wait:
                    look.append(s)
        if lost:
            await self._republish(lost, "lost with Redis's data (epoch token changed)")
        if look and not self._presence_denied:
            await self._look_for(look, epoch)

    async def _look_for(self, sent: List[_Sent], epoch: Optional[str]) -> None:
        by_stream: Dict[str, List[_Sent]] = {}
        for s in sent:
            by_stream.setdefault(s.published.stream, []).append(s)
        gone: List[_Sent] = []
        for stream, group in by_stream.items():
            try:
                states = await entry_states(
                    self.redis, self.settings.group, stream, [s.published.entry_id for s in group]
                )
            except RedisError as exc:
                if "NOPERM" in str(exc) or "no permissions" in str(exc):
                    log.warning("session %s: cannot look for lost requests (%s)", self.session_id, exc)
                    self._presence_denied = True
                    return
                raise
            now = time.monotonic()
            for s in group:
                s.checked = now
                if states[s.published.entry_id] == GONE:
                    gone.append(s)
                elif s.epoch is None:
                    s.epoch = epoch  # it is there under this token
        if not gone:
            return
        # Gone from the stream: answered (the commit deletes the entry as it writes the reply)
        # or lost. Answered means the reply is in the reply stream: read up to its newest entry.
        newest = await self.redis.xrevrange(self.reply_stream, count=1)
        if newest:
            target = _id(text(newest[0][0]))
            give_up = time.monotonic() + 10.0
            while _id(self._last_id) < target and time.monotonic() < give_up and not self._closing:
                await asyncio.sleep(0.01)
            if _id(self._last_id) < target:
                return  # the reader is behind (Redis trouble): decide next round
        lost = [s for s in gone if s.req.request_id in self._sent]
        if lost:
            await self._republish(lost, "no longer in Redis and unanswered")

    async def _republish(self, sent: List[_Sent], why: str) -> None:
        log.warning("session %s: %d request(s) %s; publishing them again", self.session_id, len(sent), why)
        for s in sent:
            if s.req.request_id not in self._sent:
                continue  # answered meanwhile
            published = await self.publisher.publish(s.req)
            now = time.monotonic()
            s.published, s.epoch, s.at, s.checked = published, published.epoch, now, now
            self.republished += 1

    async def _read_replies(self) -> None:
        failures = 0
        while not self._closing:
            try:
                resp = await self.redis.xread({self.reply_stream: self._last_id}, count=256, block=_BLOCK_MS)
                failures = 0
            except (RedisError, OSError, AttributeError) as exc:
                # Connection lost, or (Redis Cluster) a node restarting: "cluster is down",
                # and redis-py's cluster client tearing down connections in use, which can
                # surface as AttributeError. The reader is the only way replies arrive, so it
                # must outlive all of these: it never gives up.
                self.reconnects += 1
                log.warning("session %s: reply stream read failed (%s); retrying", self.session_id, exc)
                await asyncio.sleep(self.settings.retry.delay(failures))
                failures += 1
                continue
            for _stream, entry_id, fields in stream_entries(resp):
                self._last_id = entry_id
                self._deliver(fields)

    def _deliver(self, fields: Dict[bytes, bytes]) -> None:
        rid = (fields.get(b"rid") or b"").decode(errors="replace")
        self._sent.pop(rid, None)
        fut = self._pending.pop(rid, None)
        if fut is None:
            if rid in self._done_set:
                self.duplicates += 1
            else:
                self.stale += 1
            return
        if len(self._done) == self._done.maxlen:
            self._done_set.discard(self._done[0])
        self._done.append(rid)
        self._done_set.add(rid)
        if fut.done():
            return
        try:
            fut.set_result(decode_reply(fields.get(b"body") or b"", self.limits))
        except ProtocolError as exc:
            fut.set_exception(exc)

    # ------------------------------------------------------------------ streaming

    async def stream(
        self, req: Request, timeout: Optional[float] = None
    ) -> AsyncIterator[Union[Partial, Reply]]:
        """Publish a request with `stream` set and yield its partial replies as the worker
        decodes them, then its Reply (last; ReplyError on an error reply unless
        raise_on_error=False). Joining the pieces' `text` gives the start of the reply's
        text; the reply has all of it. Pieces of an earlier delivery of the request (its
        worker died), repeated or out-of-order ones are dropped, so the pieces yielded are
        always a prefix of one decoding; the reply is the one that counts."""
        if "stream" not in type(req).model_fields:
            raise ValueError(f"{req.kind} requests do not stream")
        req.stream = True  # type: ignore[attr-defined]
        await self.start()
        await self._start_partials()
        pieces = _PieceQueue()
        self._streaming[req.request_id] = pieces
        loop = asyncio.get_running_loop()
        give_up = None if timeout is None else loop.time() + timeout
        try:
            fut = await self.submit(req)
            fut.add_done_callback(lambda _: pieces.queue.put_nowait(None))
            while True:
                left = None if give_up is None else max(0.0, give_up - loop.time())
                piece = await asyncio.wait_for(pieces.queue.get(), left)
                if piece is None:
                    break
                yield piece
            # The reply and the pieces come by two readers: take the pieces written before it.
            await self._read_partials_once(self.keys.partial_stream(self.session_id), block=None)
            while not pieces.queue.empty():
                piece = pieces.queue.get_nowait()
                if piece is not None:
                    yield piece
            reply = fut.result()
        except asyncio.TimeoutError:
            self._pending.pop(req.request_id, None)
            raise
        finally:
            self._streaming.pop(req.request_id, None)
        if self.raise_on_error and not reply.ok:
            raise ReplyError(reply)
        yield reply

    async def _start_partials(self) -> None:
        if self._parts_reader is None:
            key = self.keys.partial_stream(self.session_id)
            last = await self.redis.xrevrange(key, count=1)  # before the first publish
            if last:
                self._parts_last = text(last[0][0])
            self._parts_reader = asyncio.create_task(
                self._read_partials(key), name=f"parts:{self.session_id}"
            )

    async def _read_partials(self, key: str) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._read_partials_once(key, _BLOCK_MS)
                failures = 0
            except (RedisError, OSError, AttributeError) as exc:  # as _read_replies
                log.warning("session %s: partial stream read failed (%s); retrying", self.session_id, exc)
                await asyncio.sleep(self.settings.retry.delay(failures))
                failures += 1

    async def _read_partials_once(self, key: str, block: Optional[int]) -> None:
        """Read the partial stream once and hand each piece to its request's queue (a piece
        read twice, by the reader and by a request's last look, is dropped by its seq)."""
        resp = await self.redis.xread({key: self._parts_last}, count=512, block=block)
        for _stream, entry_id, fields in stream_entries(resp):
            self._parts_last = max(self._parts_last, entry_id, key=_entry_order)
            pieces = self._streaming.get((fields.get(b"rid") or b"").decode(errors="replace"))
            if pieces is None:
                continue  # not streamed by us, or already answered
            try:
                piece = decode_partial(fields.get(b"body") or b"", self.limits)
            except ProtocolError:
                self.partials_dropped += 1
                continue
            if not pieces.accept(piece):
                self.partials_dropped += 1

    async def _wind_down(self, reader: asyncio.Task) -> None:
        """Let a reader's blocking XREAD end by itself, cancelling it only when it does not:
        cancelling a command in flight can leave redis-py's connection in an unusable state
        (and on Python < 3.12 wait_for may swallow the cancellation altogether)."""
        self._closing = True
        try:
            await asyncio.wait_for(asyncio.shield(reader), _BLOCK_MS / 1000 + 2)
        except (asyncio.TimeoutError, Exception):
            reader.cancel()

    async def close(self) -> None:
        if self._parts_reader is not None:
            await self._wind_down(self._parts_reader)
            self._parts_reader = None
        if self._reader is not None:
            await self._wind_down(self._reader)
            self._reader = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        self._sent.clear()
        if self._own_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncAgentClient:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _entry_order(entry_id: str) -> Tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _PieceQueue:
    """One streamed request's partials: in order, from one delivery of it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.attempt: Optional[Tuple[str, int]] = None  # (worker, delivery) whose pieces are taken
        self.next: Dict[int, int] = {}  # answer index -> the seq expected next

    def accept(self, piece: Partial) -> bool:
        attempt = (piece.worker, piece.delivery)
        if self.attempt is None:
            self.attempt = attempt
        if attempt != self.attempt or piece.seq != self.next.get(piece.index, 0):
            return False
        self.next[piece.index] = piece.seq + 1
        self.queue.put_nowait(piece)
        return True


class AgentClient:
    """The blocking twin of AsyncAgentClient: same behaviour, driven by a private event loop
    in a background thread, so plain synchronous simulator loops can use it."""

    def __init__(
        self,
        session_id: str,
        *,
        url: Optional[str] = None,
        settings: Optional[BrokerSettings] = None,
        limits: Limits = DEFAULT_LIMITS,
        raise_on_error: bool = True,
        tenant: Optional[str] = None,
        request_timeout_s: Optional[float] = None,
    ) -> None:
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"vlmq-client-{session_id}", daemon=True
        )
        self._thread.start()
        self._client = AsyncAgentClient(
            session_id,
            url=url,
            settings=settings,
            limits=limits,
            raise_on_error=raise_on_error,
            tenant=tenant,
            request_timeout_s=request_timeout_s,
        )
        try:
            self._call(self._client.start())
        except BaseException:
            self.close()
            raise

    @property
    def session_id(self) -> str:
        return self._client.session_id

    @property
    def duplicates(self) -> int:
        return self._client.duplicates

    @property
    def stale(self) -> int:
        return self._client.stale

    @property
    def republished(self) -> int:
        return self._client.republished

    def _call(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, req: Request) -> concurrent.futures.Future:
        """Publish now; the returned future resolves to the Reply (or ReplyError)."""
        fut = asyncio.run_coroutine_threadsafe(self._client.submit(req), self._loop).result()
        return asyncio.run_coroutine_threadsafe(self._finish(fut), self._loop)

    async def _finish(self, fut: asyncio.Future) -> Reply:
        reply = await fut
        if self._client.raise_on_error and not reply.ok:
            raise ReplyError(reply)
        return reply

    def request(self, req: Request, timeout: Optional[float] = None) -> Reply:
        """As AsyncAgentClient.request: RequestTimeout after `timeout` (default
        settings.request_timeout_s)."""
        return self._call(self._client.request(req, timeout))

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
