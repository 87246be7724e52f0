"""Tapping the request and reply streams without consuming them.

The tap never joins a consumer group: it XREADs each stream from the last id it saw, so it
takes no work from the workers and acks nothing. A request entry is deleted as soon as its
reply is written; the tap sees it because Redis hands a new entry to every blocked XREAD at
the moment of the XADD, and the tap re-issues its XREAD before decoding anything. What it
can still miss is a request that is read, served and deleted while the tap is between two
reads: that needs a handler faster than the tap's turnaround (a no-op backend on a loaded
machine). Requests rejected at once (malformed, invalid, expired) are also copied to the
dead-letter streams, which are never deleted, so the tap takes those from there
(`via="dead_letter"`). This is the live view of `vlmq tail`; `vlmq record`, which must miss
nothing, reads the copies workers make in the commit instead (ops/commit_tap.py).

The generic request and dead-letter streams are known by name and read from the start,
existing or not; model-specific request streams and reply streams are found by SCAN (every
`discover_s`); all are read from the moment the tap started (Redis server time), so nothing
recorded predates the tap and a reply stream found late loses nothing (replies stay). On Redis Cluster each
partition's streams share one slot and are read by their own task.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from broker.keys import Keys
from broker.responses import stream_entries, text
from broker.settings import BrokerSettings
from schemas.codec import CodecError, unpackb
from schemas.messages import KINDS

REQUEST, REPLY, DEAD = "request", "reply", "dead_letter"  # stream roles


@dataclass
class TapEvent:
    type: str  # "request" | "reply"
    stream: str  # the request stream (also for a request taken from the dead letters)
    entry_id: str
    seen_at: float  # unix seconds, when the tap read it
    kind: str
    session: str
    request_id: str
    body: bytes  # the message body exactly as on the wire (msgpack)
    partition: int = 0
    via: str = ""  # "dead_letter" when the request was taken from a dead-letter stream


def reply_kind(body: bytes) -> str:
    """The kind of an encoded reply, without validating the rest of it."""
    try:
        data = unpackb(body)
    except CodecError:
        return ""
    return str(data.get("kind", "")) if isinstance(data, dict) else ""


Sink = Callable[[List[TapEvent]], Optional[Awaitable[None]]]
Raw = Tuple[str, Any, Dict[bytes, bytes], float]


async def deliver_events(sink: Sink, events: List[TapEvent], seen: Dict[str, int]) -> None:
    """Count the events by type and hand them to the sink, awaiting it when it is async."""
    for ev in events:
        seen[ev.type] += 1
    if events:
        done = sink(events)
        if done is not None:
            await done


@dataclass
class TapFilter:
    """What to tap: requests and/or replies, of these kinds, of sessions matching a glob."""

    requests: bool = True
    replies: bool = True
    kinds: Optional[Sequence[str]] = None
    sessions: Optional[str] = None

    def session_ok(self, session: str) -> bool:
        return self.sessions is None or fnmatch.fnmatchcase(session, self.sessions)

    def kind_ok(self, kind: str) -> bool:
        return not self.kinds or kind in self.kinds

    def type_ok(self, type_: str) -> bool:
        return self.requests if type_ == "request" else self.replies


@dataclass
class _Stream:
    role: str
    kind: str  # "" for reply streams (read from the body)
    partition: int
    session: str = ""  # reply streams only
    position: str = "0-0"  # last id read


class StreamTap:
    def __init__(
        self,
        redis,
        settings: BrokerSettings,
        only: Optional[TapFilter] = None,
        *,
        block_ms: int = 100,
        discover_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.only = only or TapFilter()
        self.block_ms = block_ms
        self.discover_s = discover_s
        p = re.escape(settings.prefix)
        self._reply_re = re.compile("^" + p + r":reply:\{p(?P<p>\d+)\}:(?P<session>.+)$")
        self._dlq_re = re.compile("^" + p + r":dlq:(?P<kind>[a-z_]+):\{p(?P<p>\d+)\}$")
        self._streams: Dict[str, _Stream] = {}
        self._start_id = "0-0"
        self._started = False
        # (session, request id) seen lately: a dead letter of a request already tapped is not new.
        self._recent: Deque[str] = collections.deque(maxlen=100_000)
        self._recent_set: Set[str] = set()
        self.seen = {"request": 0, "reply": 0}

    # ------------------------------------------------------------------ discovery

    async def _scan(self, pattern: str):
        async for raw in self.redis.scan_iter(match=f"{self.settings.prefix}:{pattern}", count=1000):
            key = text(raw)
            if key not in self._streams:
                yield key

    def _expected(self) -> None:
        """The request and dead-letter streams every worker of this prefix uses, whether they
        exist yet or not: a blocked XREAD on a missing key is served by the XADD that creates
        it, so traffic on a stream born after the tap started is not left to discovery."""
        for kind in KINDS:
            if not self.only.kind_ok(kind):
                continue
            for p in range(self.settings.partitions):
                for key, role in (
                    (self.keys.request_stream(kind, p), REQUEST),
                    (self.keys.dead_letters(kind, p), DEAD),
                ):
                    self._streams.setdefault(key, _Stream(role, kind, p, position=self._start_id))

    async def _discover(self) -> None:
        if self.only.requests:
            async for key in self._scan("req:*"):
                try:
                    kind, _model, partition, _tenant = self.keys.parse_request_stream(key)
                except ValueError:
                    continue
                if self.only.kind_ok(kind):
                    self._streams[key] = _Stream(REQUEST, kind, partition, position=self._start_id)
            async for key in self._scan("dlq:*"):
                m = self._dlq_re.match(key)
                if m and self.only.kind_ok(m.group("kind")):
                    self._streams[key] = _Stream(
                        DEAD, m.group("kind"), int(m.group("p")), position=self._start_id
                    )
        if self.only.replies:
            async for key in self._scan("reply:*"):
                m = self._reply_re.match(key)
                if m and self.only.session_ok(m.group("session")):
                    self._streams[key] = _Stream(
                        REPLY, "", int(m.group("p")), m.group("session"), position=self._start_id
                    )

    # ------------------------------------------------------------------ reading

    def _remember(self, rid: str) -> bool:
        """True if this (session/request id) key is new."""
        if rid in self._recent_set:
            return False
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(rid)
        self._recent_set.add(rid)
        return True

    def _event(self, key: str, entry_id: Any, fields: Dict[bytes, bytes], now: float) -> Optional[TapEvent]:
        st = self._streams[key]
        body = fields.get(b"body") or b""
        rid = text(fields.get(b"rid", b""))
        if st.role == REPLY:
            kind = reply_kind(body)
            if not self.only.kind_ok(kind):
                return None
            return TapEvent(REPLY, key, text(entry_id), now, kind, st.session, rid, body, st.partition)
        session = text(fields.get(b"sid", b""))
        if not self.only.session_ok(session) or not self._remember(f"{session}/{rid}"):
            return None
        if st.role == REQUEST:
            return TapEvent(REQUEST, key, text(entry_id), now, st.kind, session, rid, body, st.partition)
        # A dead letter of a request the tap did not see: the original entry, from its copy.
        stream = text(fields.get(b"stream", key.encode()))
        original = text(fields.get(b"entry_id", entry_id))
        return TapEvent(REQUEST, stream, original, now, st.kind, session, rid, body, st.partition, DEAD)

    async def _read(self, partition: Optional[int], block: bool = True) -> List[Raw]:
        """One XREAD, raw entries only: decoding waits for the delivery task, so the next XREAD
        goes out at once."""
        streams = {
            k: s.position for k, s in self._streams.items() if partition is None or s.partition == partition
        }
        if not streams:
            if block:
                await asyncio.sleep(self.block_ms / 1000)
            return []
        resp = await self.redis.xread(streams, count=1000, block=self.block_ms if block else None)
        now = time.time()
        out: List[Raw] = []
        for stream, entry_id, fields in stream_entries(resp):
            out.append((stream, entry_id, fields, now))
            self._streams[stream].position = entry_id
        return out

    def _events(self, raw: List[Raw]) -> List[TapEvent]:
        # Requests before their dead letters before replies, whatever order XREAD gave.
        order = {REQUEST: 0, DEAD: 1, REPLY: 2}
        raw = sorted(raw, key=lambda r: order[self._streams[r[0]].role])
        return [ev for ev in (self._event(*r) for r in raw) if ev is not None]

    async def start(self) -> None:
        """Fix the starting point (now, by the server's clock) and find the streams."""
        secs, usecs = await self.redis.time()  # stream ids are made from the server's clock
        self._start_id = f"{int(secs) * 1000 + int(usecs) // 1000}-0"
        if self.only.requests:
            self._expected()
        await self._discover()
        self._started = True

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Feed batches of events to `sink` until `stop` is set (start() first, or it is called)."""
        if not self._started:
            await self.start()
        partitions: List[Optional[int]] = (
            list(range(self.settings.partitions)) if self.settings.cluster else [None]
        )
        queue: asyncio.Queue = asyncio.Queue()

        async def reader(p: Optional[int]) -> None:
            while not stop.is_set():
                raw = await self._read(p)
                if raw:
                    queue.put_nowait(raw)

        async def deliver() -> None:
            while True:
                raw = await queue.get()
                await asyncio.sleep(0)  # let the reader send its next XREAD before decoding
                await deliver_events(sink, self._events(raw), self.seen)
                queue.task_done()

        async def discoverer() -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.discover_s)
                except asyncio.TimeoutError:
                    await self._discover()

        tasks = [asyncio.create_task(reader(p)) for p in partitions]
        tasks.append(asyncio.create_task(discoverer()))
        delivery = asyncio.create_task(deliver())
        reading = asyncio.gather(*tasks)
        try:
            await asyncio.wait([reading, delivery], return_when=asyncio.FIRST_COMPLETED)
            if delivery.done():
                delivery.result()  # the sink failed
            reading.result()  # a read failed, or stop was set
            # Last pass: streams born since the last discovery (a short burst of traffic can
            # come and go between two), and whatever arrived after the last blocking read.
            await self._discover()
            for p in partitions:
                while True:
                    raw = await self._read(p, block=False)
                    if not raw:
                        break
                    queue.put_nowait(raw)
            drained = asyncio.ensure_future(queue.join())
            await asyncio.wait([drained, delivery], return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            if delivery.done():
                delivery.result()
        finally:
            stop.set()
            delivery.cancel()
            await asyncio.gather(*tasks, delivery, return_exceptions=True)
