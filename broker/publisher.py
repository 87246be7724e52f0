"""Publishing requests with backpressure: a bounded XADD, atomic in one Lua call."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from broker.keys import Keys
from broker.settings import BrokerSettings
from schemas.codec import packb
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import Request

# XLEN counts entries waiting and in flight: acked entries are deleted (see consumer.py),
# so the stream length is exactly the backlog that this bound limits.
_BOUNDED_XADD = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {false, n} end
return {redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2)), n}
"""


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
        self._script = redis.register_script(_BOUNDED_XADD)

    async def publish(self, req: Request, wait_timeout: Optional[float] = None) -> str:
        """XADD the request; returns its entry id. Raises BacklogFull (policy 'error'), or
        waits for room (policy 'wait') up to wait_timeout seconds (None: until its deadline)."""
        stream = self.keys.stream_for(req.kind, req.session_id, req.model)
        fields = request_fields(req)
        argv = [self.settings.max_backlog]
        for k, v in fields.items():
            argv += [k, v]
        delay = 0.005
        give_up = None
        while True:
            entry_id, backlog = await self._script(keys=[stream], args=argv)
            if entry_id:
                return entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if self.settings.backlog_policy != "wait":
                raise BacklogFull(stream, backlog, self.settings.max_backlog)
            now = time.time()
            if give_up is None:
                limit = (
                    wait_timeout
                    if wait_timeout is not None
                    else (req.deadline - now if req.deadline else None)
                )
                give_up = now + limit if limit is not None else float("inf")
            if now + delay > give_up:
                raise BacklogFull(stream, backlog, self.settings.max_backlog)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
