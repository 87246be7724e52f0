"""The lossless tap `vlmq record` reads: copies the workers write in the commit itself.

While a recorder holds a partition's tap (`<prefix>:tap:on:{p<n>}`, set with NX and kept
alive with a TTL), every worker's fenced commit (broker/replies.py) copies each request
entry it answers, with the reply, to `<prefix>:tap:{p<n>}`, in the same Lua call that writes
the reply and deletes the request. So every request answered while the tap is held is
recorded, however fast it was served; the recorder only has to read the tap stream, and
trims what it has read. A request is recorded when it is answered (the copies come in
commit order), stamped with its entry id's time (when it was published) and the copy's id
time (when it was answered).

One recorder per prefix at a time: a second one is refused while the first holds the taps.
If the recorder dies, its hold expires after `ttl_s` and workers stop copying. A recorder
that falls more than `tap_maxlen` copies behind loses the oldest; it counts them (`missed`,
from the stream's entries-added counter) rather than pretend it has everything.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from broker.keys import Keys
from broker.responses import stream_entries, text
from broker.settings import BrokerSettings
from ops.tap import REPLY, REQUEST, Sink, TapEvent, TapFilter, deliver_events


class TapBusy(RuntimeError):
    """Another recorder holds the tap."""


def _id_time(entry_id: str) -> float:
    return int(entry_id.partition("-")[0]) / 1000.0


def _after(entry_id: str) -> str:
    """The smallest id greater than entry_id (XTRIM MINID keeps ids >= it)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


@dataclass
class _Partition:
    tap: str
    owner: str
    position: str = "0-0"
    added_at_start: int = 0
    read: int = 0


@dataclass
class CommitTap:
    redis: object
    settings: BrokerSettings
    only: TapFilter = field(default_factory=TapFilter)
    ttl_s: float = 10.0
    block_ms: int = 100
    owner_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        keys = Keys(self.settings.prefix, self.settings.partitions)
        self.keys = keys
        self._parts = [_Partition(keys.tap(p), keys.tap_owner(p)) for p in range(self.settings.partitions)]
        self.seen = {REQUEST: 0, REPLY: 0}
        self.missed = 0  # copies trimmed before this recorder read them

    async def _added(self, part: _Partition) -> Tuple[int, str]:
        """(entries ever added, last id) of a tap stream; (0, "0-0") when it does not exist."""
        try:
            info = await self.redis.xinfo_stream(part.tap)
        except Exception as exc:
            if "no such key" in str(exc).lower():
                return 0, "0-0"
            raise
        return int(info.get("entries-added", 0)), text(info.get("last-generated-id", b"0-0"))

    async def start(self) -> None:
        """Hold every partition's tap; from now on each commit is copied."""
        held: List[_Partition] = []
        ttl = max(1, int(self.ttl_s))
        try:
            for part in self._parts:
                # what is in the stream already belongs to an earlier recorder
                part.added_at_start, part.position = await self._added(part)
                if not await self.redis.set(part.owner, self.owner_id, nx=True, ex=ttl):
                    other = await self.redis.get(part.owner)
                    raise TapBusy(
                        f"another `vlmq record` ({text(other or b'?')}) holds {part.owner}; one recorder "
                        f"per prefix at a time (it expires {ttl} s after that recorder stops)"
                    )
                held.append(part)
        except BaseException:
            for part in held:
                await self.redis.delete(part.owner)
            raise

    async def _refresh(self) -> None:
        for part in self._parts:
            if text(await self.redis.get(part.owner) or b"") != self.owner_id:
                raise TapBusy(f"lost the hold of {part.owner} (this recorder stalled past {self.ttl_s} s)")
            await self.redis.expire(part.owner, max(1, int(self.ttl_s)))

    def _events(self, entry_id: str, fields: Dict[bytes, bytes]) -> List[TapEvent]:
        stream = text(fields.get(b"stream", b""))
        try:
            kind, _model, partition, _tenant = self.keys.parse_request_stream(stream)
        except ValueError:
            return []
        request_id = text(fields.get(b"id", b"0-0"))
        session = text(fields.get(b"sid", b""))
        rid = text(fields.get(b"rid", b""))
        if not self.only.kind_ok(kind) or not self.only.session_ok(session):
            return []
        out = []
        if self.only.requests:
            body = fields.get(b"body") or b""
            out.append(
                TapEvent(
                    REQUEST, stream, request_id, _id_time(request_id), kind, session, rid, body, partition
                )
            )
        reply = fields.get(b"reply") or b""
        if self.only.replies and reply:
            reply_stream = self.keys.reply_stream(session, partition) if session else ""
            out.append(
                TapEvent(
                    REPLY, reply_stream, entry_id, _id_time(entry_id), kind, session, rid, reply, partition
                )
            )
        return out

    async def _read(self, block: bool) -> Tuple[int, List[TapEvent]]:
        """(copies read, the events they make)."""
        block_ms = self.block_ms if block else None
        if self.settings.cluster:  # one command may not span slots: a read per partition
            resps = await asyncio.gather(
                *(self.redis.xread({p.tap: p.position}, count=1000, block=block_ms) for p in self._parts)
            )
        else:
            resps = [
                await self.redis.xread({p.tap: p.position for p in self._parts}, count=1000, block=block_ms)
            ]
        by_tap = {p.tap: p for p in self._parts}
        events: List[TapEvent] = []
        read = 0
        for resp in resps:
            for tap, entry_id, fields in stream_entries(resp):
                part = by_tap[tap]
                part.position = entry_id
                part.read += 1
                read += 1
                events += self._events(entry_id, fields)
        return read, events

    async def _trim(self) -> None:
        for part in self._parts:
            if part.position != "0-0":
                await self.redis.xtrim(part.tap, minid=_after(part.position))

    async def run(self, sink: Sink, stop: asyncio.Event) -> None:
        """Feed batches of events to `sink` until `stop` is set (start() first); then read
        what is left, let go of the taps and count what was missed."""
        refresh_every = self.ttl_s / 3.0
        refreshed = time.monotonic()
        try:
            while not stop.is_set():
                _, events = await self._read(block=True)
                await deliver_events(sink, events, self.seen)
                if time.monotonic() - refreshed >= refresh_every:
                    await self._trim()
                    await self._refresh()
                    refreshed = time.monotonic()
        finally:
            for part in self._parts:  # release first: nothing is copied after this
                if text(await self.redis.get(part.owner) or b"") == self.owner_id:
                    await self.redis.delete(part.owner)
        while True:  # commits that ran before the release (a commit is one Lua call, run whole: none is cut)
            read, events = await self._read(block=False)
            await deliver_events(sink, events, self.seen)
            if not read:
                break
        for part in self._parts:
            added, _ = await self._added(part)
            self.missed += max(0, added - part.added_at_start - part.read)
        await self._trim()

    def status(self) -> Dict[str, int]:
        return {"requests": self.seen[REQUEST], "replies": self.seen[REPLY], "missed": self.missed}
