"""Publishing requests with backpressure.

The backlog bound is checked against the stream length Redis returns with every XADD (one
pipelined round trip, no Lua: a script would copy a 150 KB frame twice more inside
Redis). Once a publisher has seen the backlog at or over `max_backlog`, it asks XLEN
before each further XADD and refuses (or waits) while the stream is full. So the bound
is soft by at most one request per concurrent publisher, and an XADD that returned is
never taken back: an accepted request is never dropped.

The partition's epoch token is read in the same round trip, before the XADD: if Redis
later loses its data, the token changes, and the client knows that what it published under
the old token is gone (env_agents/client.py publishes it again).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Dict, Optional

from broker.keys import Keys
from broker.retry import RetryPolicy
from broker.settings import BrokerSettings
from schemas.codec import packb
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import Request

# How a waiting publisher polls a full stream: soon at first (room may come with the next
# commit), then every 0.5 s at most; no jitter, a poll is one cheap XLEN. Not the Redis
# retry policy's bounds: nothing failed, the stream is full.
_ROOM_POLL = RetryPolicy(base_s=0.005, cap_s=0.5, jitter=0.0)


class BacklogFull(ProtocolError):
    def __init__(self, stream: str, backlog: int, limit: int) -> None:
        super().__init__(
            ErrorCode.BACKLOG_FULL,
            f"{stream} holds {backlog} requests, the limit is {limit} (VLMQ_MAX_BACKLOG); "
            "add workers, slow down, or publish with backlog_policy='wait'",
        )
        self.stream = stream
        self.backlog = backlog


def request_fields(req: Request, body: Optional[bytes] = None) -> dict:
    """The stream entry of a request: routing fields in plain text, the body in msgpack."""
    return {
        "v": str(req.v),
        "kind": req.kind,
        "rid": req.request_id,
        "sid": req.session_id,
        "body": body if body is not None else packb(req.to_wire()),
    }


@dataclass(frozen=True)
class Published:
    stream: str
    entry_id: str
    epoch: Optional[str]  # the partition's epoch token just before the XADD (None: not set yet)


class Publisher:
    def __init__(self, redis, settings: BrokerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self._full: Dict[str, bool] = {}  # streams last seen at or over the bound

    async def publish(self, req: Request, wait_timeout: Optional[float] = None) -> Published:
        """XADD the request (to the tenant's stream when settings.tenant is set). Raises
        BacklogFull (policy 'error'), or waits for room (policy 'wait') up to wait_timeout
        seconds (None: until its deadline)."""
        tenant = self.settings.tenant or None
        if tenant and not req.session_id.startswith(f"{tenant}."):
            raise ValueError(
                f"session {req.session_id!r} is not of tenant {tenant!r}: its sessions are named '{tenant}.<name>'"
            )
        partition = self.keys.partition_of(req.session_id)
        stream = self.keys.request_stream(req.kind, partition, req.model, tenant)
        if self._full.get(stream):
            await self._wait_for_room(stream, req, wait_timeout)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.epoch(partition))
        pipe.xadd(stream, request_fields(req))
        pipe.xlen(stream)
        epoch, entry_id, backlog = await pipe.execute(raise_on_error=False)
        for got in (entry_id, backlog):
            if isinstance(got, Exception):
                raise got
        if isinstance(epoch, Exception):  # an ACL from before epoch tokens: no loss detection
            epoch = None
        self._full[stream] = backlog >= self.settings.max_backlog
        return Published(stream, _text(entry_id), None if epoch is None else _text(epoch))

    async def _wait_for_room(self, stream: str, req: Request, wait_timeout: Optional[float]) -> None:
        limit = self.settings.max_backlog
        backlog = await self.redis.xlen(stream)
        if backlog < limit:
            return
        if self.settings.backlog_policy != "wait":
            raise BacklogFull(stream, backlog, limit)
        budget = wait_timeout
        if budget is None and req.deadline:
            budget = req.deadline - time.time()
        for delay in _ROOM_POLL.with_(deadline_s=budget).delays():
            await asyncio.sleep(delay)
            backlog = await self.redis.xlen(stream)
            if backlog < limit:
                return
        raise BacklogFull(stream, backlog, limit)


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
