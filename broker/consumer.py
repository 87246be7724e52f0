"""The worker side of the request streams: group reads, reclaim, keep-alive, ack.

A message's life: XREADGROUP hands it to one consumer (delivery 1). If that consumer dies,
XAUTOCLAIM hands it to another after `claim_min_idle_ms` (delivery 2, 3, ...). A live
consumer working on a long batch re-claims its own messages (XCLAIM JUSTID, which does not
count as a delivery) so that nobody takes them; only those still pending for it, checked in
the same Lua call, so a consumer that stalled cannot take back what another one reclaimed.
After the reply is written, the entry is acked and deleted in the same Lua call, so the stream
only ever holds unfinished work.

A redelivered message may be what killed its last holder. The worker runs it alone and
counts each such run in the partition's suspects hash (`mark_run_alone`) before the model
sees it; `runs_alone` reads the counts back when the message comes round again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from broker.keys import Keys
from broker.partitioned_reads import PartitionedReads
from broker.responses import stream_entries, text
from broker.settings import BrokerSettings


@dataclass
class Delivery:
    """One request stream entry handed to this consumer."""

    stream: str
    entry_id: str
    kind: str
    model: Optional[str]
    partition: int
    fields: Dict[bytes, bytes]
    deliveries: int = 1
    tenant: Optional[str] = None  # the tenant of the stream (broker/keys.py), None: shared
    received_at: float = field(default_factory=time.time)
    # The partition's epoch token when it was read. If Redis loses its data (a restart
    # without persistence), the token changes with it, and the reply is written even though
    # no pending record vouches for this entry any more (broker/replies.py).
    epoch: str = ""

    def field(self, name: str) -> Optional[str]:
        raw = self.fields.get(name.encode())
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None

    @property
    def body(self) -> Optional[bytes]:
        return self.fields.get(b"body")


class GroupReader:
    def __init__(self, redis, settings: BrokerSettings, streams: Iterable[str], consumer: str) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self.streams = list(streams)
        self.consumer = consumer
        self._meta = {s: self.keys.parse_request_stream(s) for s in self.streams}
        self._keep_alive = redis.register_script(_KEEP_ALIVE)
        # Epoch tokens, read before the entries they stamp: a stale token can only be an
        # older one, which errs towards writing a reply twice, never towards dropping it.
        self.epochs: Dict[int, str] = {}
        self._partitioned: Optional[PartitionedReads] = None
        if settings.cluster:  # one command may not span slots: read each partition on its own
            by_partition: Dict[int, List[str]] = {}
            for s in self.streams:
                by_partition.setdefault(self._meta[s].partition, []).append(s)
            self._partitioned = PartitionedReads(
                self._read, by_partition, settings.retry.with_(attempts=None)
            )

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                # From id 0: requests published before the first worker started are served too.
                await self.redis.xgroup_create(stream, self.settings.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self.refresh_epochs()

    async def refresh_epochs(self) -> None:
        """Read each partition's epoch token, creating it where Redis has none (first start,
        or data lost); called at start, after NOGROUP and with every heartbeat."""
        for partition in sorted({meta.partition for meta in self._meta.values()}):
            key = self.keys.epoch(partition)
            await self.redis.set(key, uuid.uuid4().hex, nx=True)
            self.epochs[partition] = text(await self.redis.get(key) or b"")

    def _delivery(self, stream: str, entry_id, fields, deliveries: int = 1) -> Delivery:
        kind, model, partition, tenant = self._meta[stream]
        epoch = self.epochs.get(partition, "")
        return Delivery(
            stream, text(entry_id), kind, model, partition, fields or {}, deliveries, tenant, epoch=epoch
        )

    async def read(self, count: int, block_ms: int) -> List[Delivery]:
        """New messages for this consumer, waiting up to block_ms for the first."""
        if self._partitioned is not None:
            return await self._partitioned.read(count, block_ms)
        return await self._read(self.streams, count, block_ms)

    async def settle(self) -> List[Delivery]:
        """Messages of reads still in flight (Redis Cluster only); call once after the last read."""
        return await self._partitioned.settle() if self._partitioned is not None else []

    async def _read(self, streams: List[str], count: int, block_ms: int) -> List[Delivery]:
        try:
            resp = await self.redis.xreadgroup(
                self.settings.group,
                self.consumer,
                {s: ">" for s in streams},
                count=count,
                block=block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data (restart without AOF): start again
                await self.ensure_groups()
                return []
            raise
        return [self._delivery(stream, entry_id, fields) for stream, entry_id, fields in stream_entries(resp)]

    async def reclaim(self, count: int) -> List[Delivery]:
        """Take over messages idle longer than claim_min_idle_ms in other (dead) consumers."""
        out: List[Delivery] = []
        for stream in self.streams:
            cursor = "0-0"
            claimed: List[Delivery] = []
            for _ in range(16):  # bounded scan of the pending list per call
                try:
                    resp = await self.redis.xautoclaim(
                        stream,
                        self.settings.group,
                        self.consumer,
                        self.settings.claim_min_idle_ms,
                        start_id=cursor,
                        count=count - len(out) - len(claimed),
                    )
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        await self.ensure_groups()
                        break
                    raise
                except (ConnectionError, TimeoutError):
                    if not self.settings.cluster:
                        raise
                    break  # this partition's node is down: reclaim the others' meanwhile
                cursor = text(resp[0])
                for entry_id, fields in resp[1]:
                    if fields is not None:
                        claimed.append(self._delivery(stream, entry_id, fields))
                if cursor == "0-0" or len(out) + len(claimed) >= count:
                    break
            if claimed:
                pending = await self.redis.xpending_range(
                    stream,
                    self.settings.group,
                    min=claimed[0].entry_id,
                    max=claimed[-1].entry_id,
                    count=len(claimed) + 1000,
                    consumername=self.consumer,
                )
                times = {text(p["message_id"]): int(p["times_delivered"]) for p in pending}
                for d in claimed:
                    d.deliveries = times.get(d.entry_id, 2)
                out += claimed
            if len(out) >= count:
                break
        return out

    async def keep_alive(self, deliveries: Iterable[Delivery]) -> List[Delivery]:
        """Reset the idle time of messages this consumer is still working on; returns those
        that are no longer pending for it (another consumer reclaimed them, or they are gone)."""
        by_stream: Dict[str, List[Delivery]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d)
        if not by_stream:
            return []
        lost: List[Delivery] = []
        for stream, held in by_stream.items():  # one call per stream: one slot on a cluster
            kept = await self._keep_alive(
                keys=[stream], args=[self.settings.group, self.consumer, *(d.entry_id for d in held)]
            )
            lost += [d for d, ok in zip(held, kept) if not int(ok)]
        return lost

    async def runs_alone(self, deliveries: List[Delivery]) -> List[int]:
        """How many times each message was started alone by a worker (0 if never)."""
        out: List[int] = [0] * len(deliveries)
        by_partition: Dict[int, List[int]] = {}
        for i, d in enumerate(deliveries):
            by_partition.setdefault(d.partition, []).append(i)
        for partition, idx in by_partition.items():
            got = await self.redis.hmget(
                self.keys.suspects(partition), [suspect_field(deliveries[i]) for i in idx]
            )
            for i, v in zip(idx, got):
                out[i] = int(v or 0)
        return out

    async def mark_run_alone(self, d: Delivery) -> int:
        """Count a run of this message alone, before it starts; returns the new count."""
        key = self.keys.suspects(d.partition)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, suspect_field(d), 1)
        # entries are removed by the commit; the expiry only bounds what a crash loop leaves
        pipe.expire(key, max(3600, self.settings.claim_min_idle_ms // 1000 * 10))
        count, _ = await pipe.execute()
        return int(count)


def suspect_field(d: Delivery) -> str:
    return f"{d.stream} {d.entry_id}"


# KEYS: the stream; ARGV: group, consumer, entry ids. Re-claims (JUSTID: not a delivery) the
# entries still pending for this consumer; returns 1 (kept) or 0 (not ours any more) per id.
_KEEP_ALIVE = """
local group, consumer = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.pcall('XPENDING', KEYS[1], group, id, id, 1)
  if type(p) == 'table' and p.err == nil and p[1] ~= nil and p[1][2] == consumer then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, id, 'JUSTID')
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
