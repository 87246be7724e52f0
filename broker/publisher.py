"""Publishing requests with backpressure.

The backlog bound is checked against the stream length Redis returns with every XADD (one
pipelined round trip, no Lua: a script would copy a 150 KB frame twice more inside
Redis). Once a publisher has seen the backlog at or over `max_backlog`, it asks XLEN
before each further XADD and refuses (or waits) while the stream is full. So the bound
is soft by at most one request per concurrent publisher, and an XADD that returned is
never taken back: an accepted request is never dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Dict, Optional

from broker.keys import Keys
from broker.settings import BrokerSettings
from schemas.codec import packb
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import Request


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


class Publisher:
    def __init__(self, redis, settings: BrokerSettings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix, settings.partitions)
        self._full: Dict[str, bool] = {}  # streams last seen at or over the bound

    async def publish(self, req: Request, wait_timeout: Optional[float] = None) -> str:
        """XADD the request; returns its entry id. Raises BacklogFull (policy 'error'), or
        waits for room (policy 'wait') up to wait_timeout seconds (None: until its deadline)."""
        stream = self.keys.stream_for(req.kind, req.session_id, req.model)
        if self._full.get(stream):
            await self._wait_for_room(stream, req, wait_timeout)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream, request_fields(req))
        pipe.xlen(stream)
        entry_id, backlog = await pipe.execute()
        self._full[stream] = backlog >= self.settings.max_backlog
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    async def _wait_for_room(self, stream: str, req: Request, wait_timeout: Optional[float]) -> None:
        limit = self.settings.max_backlog
        delay = 0.005
        give_up = None
        while True:
            backlog = await self.redis.xlen(stream)
            if backlog < limit:
                return
            if self.settings.backlog_policy != "wait":
                raise BacklogFull(stream, backlog, limit)
            now = time.time()
            if give_up is None:
                budget = (
                    wait_timeout
                    if wait_timeout is not None
                    else (req.deadline - now if req.deadline else None)
                )
                give_up = now + budget if budget is not None else float("inf")
            if now + delay > give_up:
                raise BacklogFull(stream, backlog, limit)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
