"""Tapping the request and reply streams without consuming them.

The tap never joins a consumer group: it XREADs each stream from the last id it saw, so it
takes no work from the workers and acks nothing. Request entries are deleted once their
reply is written, so the tap relies on Redis serving a blocked XREAD at the moment of the
XADD; an entry added and fully served while the tap is between two reads (well under a
millisecond each loop) can be missed. `vlmq record` counts replies whose request it did not
see, so a recording says when that happened.

Streams are found by SCAN (every `discover_s`) and read from the moment the tap started
(Redis server time), so nothing recorded predates the tap. On Redis Cluster each
partition's streams share one slot and are read by their own task.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional, Sequence

from broker.keys import Keys
from broker.settings import BrokerSettings
from schemas.codec import CodecError, unpackb


@dataclass
class TapEvent:
    type: str  # "request" | "reply"
    stream: str
    entry_id: str
    seen_at: float  # unix seconds, when the tap read it
    kind: str
    session: str
    request_id: str
    body: bytes  # the message body exactly as on the wire (msgpack)
    partition: int = 0


def _s(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def reply_stream_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix) + r":reply:\{p(?P<p>\d+)\}:(?P<session>.+)$")


def reply_kind(body: bytes) -> str:
    """The kind of an encoded reply, without validating the rest of it."""
    try:
        data = unpackb(body)
    except CodecError:
        return ""
    return str(data.get("kind", "")) if isinstance(data, dict) else ""


Sink = Callable[[List[TapEvent]], Optional[Awaitable[None]]]


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
        self._reply_re = reply_stream_pattern(settings.prefix)
        self._positions: Dict[str, str] = {}  # stream -> last id read
        self._partition: Dict[str, int] = {}
        self._kind: Dict[str, str] = {}
        self._start_id = "0-0"
        self._started = False
        self.seen = {"request": 0, "reply": 0}

    # ------------------------------------------------------------------ discovery

    async def _discover(self) -> None:
        if self.only.requests:
            async for raw in self.redis.scan_iter(match=f"{self.settings.prefix}:req:*", count=1000):
                key = _s(raw)
                if key in self._positions:
                    continue
                try:
                    kind, _model, partition = self.keys.parse_request_stream(key)
                except ValueError:
                    continue
                if self.only.kind_ok(kind):
                    self._add(key, partition, kind)
        if self.only.replies:
            async for raw in self.redis.scan_iter(match=f"{self.settings.prefix}:reply:*", count=1000):
                key = _s(raw)
                if key in self._positions:
                    continue
                m = self._reply_re.match(key)
                if m and self.only.session_ok(m.group("session")):
                    self._add(key, int(m.group("p")), "")

    def _add(self, key: str, partition: int, kind: str) -> None:
        self._positions[key] = self._start_id
        self._partition[key] = partition
        self._kind[key] = kind

    # ------------------------------------------------------------------ reading

    def _event(
        self, stream: str, entry_id: str, fields: Dict[bytes, bytes], now: float
    ) -> Optional[TapEvent]:
        body = fields.get(b"body") or b""
        rid = _s(fields.get(b"rid", b""))
        if self._kind[stream]:  # a request stream
            session = _s(fields.get(b"sid", b""))
            if not self.only.session_ok(session):
                return None
            kind = self._kind[stream]
            return TapEvent(
                "request", stream, entry_id, now, kind, session, rid, body, self._partition[stream]
            )
        kind = reply_kind(body)
        if not self.only.kind_ok(kind):
            return None
        session = self._reply_re.match(stream).group("session")
        return TapEvent("reply", stream, entry_id, now, kind, session, rid, body, self._partition[stream])

    async def _read(self, partition: Optional[int]) -> List[TapEvent]:
        streams = {
            s: pos
            for s, pos in self._positions.items()
            if partition is None or self._partition[s] == partition
        }
        if not streams:
            await asyncio.sleep(self.block_ms / 1000)
            return []
        resp = await self.redis.xread(streams, count=1000, block=self.block_ms)
        now = time.time()
        out: List[TapEvent] = []
        items = resp.items() if isinstance(resp, dict) else (resp or [])
        for stream, entries in items:
            stream = _s(stream)
            if entries and isinstance(entries[0], list) and isinstance(entries[0][0], list):
                entries = entries[0]  # RESP3 nests one level deeper
            for entry_id, fields in entries:
                self._positions[stream] = _s(entry_id)
                ev = self._event(stream, _s(entry_id), fields or {}, now)
                if ev is not None:
                    self.seen[ev.type] += 1
                    out.append(ev)
        return out

    async def start(self) -> None:
        """Fix the starting point (now, by the server's clock) and find the streams."""
        secs, usecs = await self.redis.time()  # stream ids are made from the server's clock
        self._start_id = f"{int(secs) * 1000 + int(usecs) // 1000}-0"
        await self._discover()
        self._started = True

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Feed batches of events to `sink` until `stop` is set (start() first, or it is called)."""
        if not self._started:
            await self.start()
        partitions: List[Optional[int]] = (
            list(range(self.settings.partitions)) if self.settings.cluster else [None]
        )

        async def reader(p: Optional[int]) -> None:
            while not stop.is_set():
                events = await self._read(p)
                if events:
                    done = sink(events)
                    if done is not None:
                        await done

        async def discoverer() -> None:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), self.discover_s)
                except asyncio.TimeoutError:
                    await self._discover()

        tasks = [asyncio.create_task(reader(p)) for p in partitions]
        tasks.append(asyncio.create_task(discoverer()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()  # surface a failure
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
