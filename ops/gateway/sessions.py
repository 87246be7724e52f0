"""The gateway's sessions: one AsyncAgentClient (one reply-stream reader) per session.

Requests that name no session share a small pool of the gateway's own sessions, spread
over partitions so that on Redis Cluster their load is spread over nodes. Requests that
name one (`X-Session-Id`, a WebSocket's `?session=`) get that session, so per-session
state on the worker (the VLA feature cache, `latest_only`) works through the gateway as
it does for a direct client. Named sessions are closed least recently used first once
more than `max_named` are open, but never while a request of theirs is waiting.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import re
from typing import Dict, List, Optional, Set

from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from schemas.limits import Limits
from schemas.messages import ID_PATTERN

_SESSION = re.compile(ID_PATTERN)


class SessionPool:
    def __init__(
        self,
        redis,
        broker: BrokerSettings,
        limits: Limits,
        name: str,
        pooled: int,
        max_named: int,
    ) -> None:
        self.redis = redis
        self.broker = broker
        self.limits = limits
        self.max_named = max_named
        self._pool_ids = [f"{name}-{i}" for i in range(max(1, pooled))]
        self._next = itertools.cycle(range(len(self._pool_ids)))
        self._clients: Dict[str, AsyncAgentClient] = {}
        self._named: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._starting: Dict[str, asyncio.Future] = {}
        self._closing: Set[asyncio.Task] = set()

    @staticmethod
    def valid(session_id: str) -> bool:
        return bool(_SESSION.match(session_id))

    async def get(self, session_id: Optional[str] = None) -> AsyncAgentClient:
        """The started client of `session_id`, or of the next pooled session."""
        if session_id is None:
            return await self._client(self._pool_ids[next(self._next)])
        if not self.valid(session_id):
            raise ValueError(f"session id {session_id!r} must match {ID_PATTERN}")
        self._named[session_id] = None
        self._named.move_to_end(session_id)
        client = await self._client(session_id)
        await self._evict()
        return client

    async def _client(self, session_id: str) -> AsyncAgentClient:
        client = self._clients.get(session_id)
        if client is not None:
            return client
        starting = self._starting.get(session_id)
        if starting is not None:  # another request is starting it right now
            return await asyncio.shield(starting)
        fut = asyncio.get_running_loop().create_future()
        self._starting[session_id] = fut
        try:
            client = AsyncAgentClient(
                session_id, redis=self.redis, settings=self.broker, limits=self.limits, raise_on_error=False
            )
            await client.start()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters get it, nobody is warned about it
            raise
        finally:
            self._starting.pop(session_id, None)
        self._clients[session_id] = client
        fut.set_result(client)
        return client

    async def _evict(self) -> None:
        excess = len(self._named) - self.max_named
        if excess <= 0:
            return
        idle = [s for s in self._named if s in self._clients and not self._clients[s].outstanding]
        for session_id in idle[:excess]:
            del self._named[session_id]
            # Closing waits for the reader's blocking XREAD to end: not on this request's time.
            task = asyncio.ensure_future(self._clients.pop(session_id).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def release(self, session_id: str) -> None:
        """Close a named session now (a WebSocket that went away)."""
        self._named.pop(session_id, None)
        client = self._clients.pop(session_id, None)
        if client is not None:
            await client.close()

    @property
    def open_sessions(self) -> List[str]:
        return list(self._clients)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        self._named.clear()
        await asyncio.gather(*(c.close() for c in clients), *self._closing, return_exceptions=True)
