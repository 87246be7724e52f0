"""AgentClient: publish requests, read this session's replies, match them by request_id.

Core install only (redis, msgpack, numpy, pydantic): no torch, runs in the simulator's
Python. One reader task per session reads its reply stream (and nothing else), resolves
the future of each request, drops duplicates (at-least-once delivery) and ignores replies
to requests it never sent (left over from an earlier process of the same session).

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
import threading
from typing import AsyncIterator, Deque, Dict, Optional, Set, Tuple, Union

from redis.exceptions import RedisError, TimeoutError

from broker.connection import connect_async
from broker.eventloop import new_event_loop
from broker.keys import Keys
from broker.meta import agree_partitions
from broker.publisher import Publisher
from broker.responses import stream_entries, text
from broker.settings import BrokerSettings
from schemas.errors import ErrorCode, ProtocolError
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import Partial, Reply, Request, decode_partial, decode_reply

log = logging.getLogger("vlmq.client")

_BLOCK_MS = 250  # reply-stream XREAD block; bounds how long close() waits


class ReplyError(ProtocolError):
    """The worker answered with an error reply."""

    def __init__(self, reply: Reply) -> None:
        assert reply.error is not None
        super().__init__(ErrorCode(reply.error.code), reply.error.message, reply.error.detail)
        self.reply = reply


class AsyncAgentClient:
    def __init__(
        self,
        session_id: str,
        *,
        redis=None,
        settings: Optional[BrokerSettings] = None,
        limits: Limits = DEFAULT_LIMITS,
        raise_on_error: bool = True,
    ) -> None:
        self.session_id = session_id
        self.settings = settings or BrokerSettings.from_env()
        self.limits = limits
        self.raise_on_error = raise_on_error
        self._own_redis = redis is None
        self.redis = redis if redis is not None else connect_async(self.settings)
        self.keys = Keys(self.settings.prefix, self.settings.partitions)
        self.reply_stream = self.keys.reply_stream(session_id)
        self.publisher = Publisher(self.redis, self.settings)
        self._pending: Dict[str, asyncio.Future] = {}
        self._done: Deque[str] = collections.deque(maxlen=4096)
        self._done_set: Set[str] = set()
        self._reader: Optional[asyncio.Task] = None
        self._closing = False
        self._last_id = "0-0"
        self.duplicates = 0  # replies dropped because their request was already answered
        self.stale = 0  # replies to requests this client never sent
        self.reconnects = 0
        self._streaming: Dict[str, _PieceQueue] = {}  # request_id -> its partials, in order
        self._parts_reader: Optional[asyncio.Task] = None
        self._parts_last = "0-0"
        self.partials_dropped = 0  # pieces out of order, repeated, or of another delivery

    async def start(self) -> AsyncAgentClient:
        if self._reader is None:
            self._slots = asyncio.Semaphore(self.settings.reply_maxlen)
            await agree_partitions(self.redis, self.settings, "client")
            # Start after the newest reply already there: what came before belongs to an
            # earlier life of this session and must not be mistaken for ours.
            last = await self.redis.xrevrange(self.reply_stream, count=1)
            if last:
                self._last_id = text(last[0][0])
            self._reader = asyncio.create_task(self._read_replies(), name=f"replies:{self.session_id}")
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
        self._pending[req.request_id] = fut  # before XADD: the reply may beat us back
        try:
            await self.publisher.publish(req, wait_timeout)
        except BaseException:
            self._pending.pop(req.request_id, None)
            fut.cancel()
            raise
        return fut

    async def request(self, req: Request, timeout: Optional[float] = None) -> Reply:
        """Publish and wait for the reply; raises ReplyError on an error reply (unless
        raise_on_error=False) and asyncio.TimeoutError after `timeout` seconds."""
        fut = await self.submit(req)
        try:  # (wait_for cancels fut on timeout, which frees its slot)
            reply = await (fut if timeout is None else asyncio.wait_for(fut, timeout))
        except asyncio.TimeoutError:
            self._pending.pop(req.request_id, None)
            raise
        if self.raise_on_error and not reply.ok:
            raise ReplyError(reply)
        return reply

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    async def _read_replies(self) -> None:
        delay = 0.01
        while not self._closing:
            try:
                resp = await self.redis.xread({self.reply_stream: self._last_id}, count=256, block=_BLOCK_MS)
                delay = 0.01
            except (RedisError, OSError, AttributeError) as exc:
                # Connection lost, or (Redis Cluster) a node restarting: "cluster is down",
                # and redis-py's cluster client tearing down connections in use, which can
                # surface as AttributeError. The reader is the only way replies arrive, so it
                # must outlive all of these.
                self.reconnects += 1
                log.warning("session %s: reply stream read failed (%s); retrying", self.session_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for _stream, entry_id, fields in stream_entries(resp):
                self._last_id = entry_id
                self._deliver(fields)

    def _deliver(self, fields: Dict[bytes, bytes]) -> None:
        rid = (fields.get(b"rid") or b"").decode(errors="replace")
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
        delay = 0.01
        while not self._closing:
            try:
                await self._read_partials_once(key, _BLOCK_MS)
                delay = 0.01
            except (RedisError, OSError, AttributeError) as exc:  # as _read_replies
                log.warning("session %s: partial stream read failed (%s); retrying", self.session_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

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

    async def close(self) -> None:
        if self._parts_reader is not None:
            self._closing = True
            try:
                await asyncio.wait_for(asyncio.shield(self._parts_reader), _BLOCK_MS / 1000 + 2)
            except (asyncio.TimeoutError, Exception):
                self._parts_reader.cancel()
            self._parts_reader = None
        if self._reader is not None:
            # Let the blocking XREAD end by itself: cancelling a command in flight can leave
            # redis-py's connection in an unusable state (and on Python < 3.12 wait_for may
            # swallow the cancellation altogether).
            self._closing = True
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), _BLOCK_MS / 1000 + 2)
            except (asyncio.TimeoutError, Exception):
                self._reader.cancel()
            self._reader = None
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
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
    ) -> None:
        settings = settings or BrokerSettings.from_env()
        if url:
            settings = settings.with_(url=url)
        self._loop = new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"vlmq-client-{session_id}", daemon=True
        )
        self._thread.start()
        self._client = AsyncAgentClient(
            session_id, settings=settings, limits=limits, raise_on_error=raise_on_error
        )
        self._call(self._client.start())

    @property
    def session_id(self) -> str:
        return self._client.session_id

    @property
    def duplicates(self) -> int:
        return self._client.duplicates

    @property
    def stale(self) -> int:
        return self._client.stale

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
        try:
            return self._call(self._client.request(req, timeout))
        except asyncio.TimeoutError:
            raise TimeoutError(f"no reply to {req.request_id} within {timeout}s") from None

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
