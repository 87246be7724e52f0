"""What every door of the gateway shares: Redis, the sessions, auth, and one request -> reply call."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Type, TypeVar, Union

from pydantic import ValidationError
from redis.exceptions import RedisError

from broker.connection import connect_async
from broker.keys import Keys
from broker.meta import agree_partitions
from broker.publisher import BacklogFull
from broker.responses import text
from ops.gateway.errors import GatewayError
from ops.gateway.sessions import SessionPool
from ops.gateway.settings import GatewaySettings
from schemas.errors import ErrorCode, ProtocolError
from schemas.messages import Partial, Reply, Request, describe_validation_error

R = TypeVar("R", bound=Request)

_WORKERS_TTL_S = 1.0  # /health is polled: don't SCAN for heartbeats more often than this
NO_WORKER_RETRY_S = 2  # Retry-After of a 503 when no live worker serves the model


class Gateway:
    def __init__(self, settings: GatewaySettings, redis=None) -> None:
        self.settings = settings
        self.redis = redis
        self._own_redis = redis is None
        self.keys = Keys(settings.broker.prefix, settings.broker.partitions)
        self.sessions: Optional[SessionPool] = None
        self._workers: List[Dict[str, str]] = []
        self._workers_at = 0.0

    async def start(self) -> None:
        if self.redis is None:
            self.redis = connect_async(self.settings.broker)
        await agree_partitions(self.redis, self.settings.broker, "gateway")
        s = self.settings
        self.sessions = SessionPool(self.redis, s.broker, s.limits, s.name, s.sessions, s.max_sessions)

    async def close(self) -> None:
        if self.sessions is not None:
            await self.sessions.close()
        if self._own_redis and self.redis is not None:
            await self.redis.aclose()

    # ------------------------------------------------------------------ auth

    def authorize(self, headers: Mapping[str, str], query: Optional[Mapping[str, str]] = None) -> None:
        keys = self.settings.api_keys
        if not keys:
            return
        given = headers.get("x-api-key") or ""
        auth = headers.get("authorization") or ""
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given and query is not None:
            given = query.get("api_key") or ""
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
            raise GatewayError(
                401,
                "a valid API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                "invalid_api_key",
            )

    # ------------------------------------------------------------------ requests

    def build(self, model: Type[R], data: Dict[str, Any]) -> R:
        """A validated request from plain data, or a 400 that says what is wrong."""
        try:
            return model.model_validate(data, context={"limits": self.settings.limits})
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            param = ".".join(str(x) for x in errors[0]["loc"]) if errors and errors[0]["loc"] else None
            raise GatewayError(
                400, describe_validation_error(exc), ErrorCode.INVALID.value, param=param
            ) from None
        except ProtocolError as exc:
            raise GatewayError.from_protocol(exc) from None

    def route(self, model: Optional[str]) -> Optional[str]:
        try:
            return self.settings.route(model)
        except LookupError:
            served = ", ".join(self.settings.models)
            raise GatewayError(
                404, f"the model {model!r} does not exist here; served: {served}", "model_not_found"
            ) from None

    async def call(self, req: Request, session_id: Optional[str] = None) -> Reply:
        """Publish `req` in a session and wait for its reply; anything but an ok reply
        becomes a GatewayError with the status it deserves."""
        events = self.stream(req, session_id, partials=False)
        try:
            reply = await events.__anext__()  # the one event: the reply
        finally:
            await events.aclose()
        assert isinstance(reply, Reply)
        return reply

    async def stream(
        self, req: Request, session_id: Optional[str] = None, partials: bool = True
    ) -> AsyncIterator[Union[Partial, Reply]]:
        """`call`, yielding the request's partial replies before its reply (`partials` and a
        request that streams)."""
        assert self.sessions is not None, "Gateway.start() first"
        await self.require_worker(req.kind, req.model)
        timeout = self.settings.timeout_s
        if req.deadline is None:
            req.deadline = time.time() + timeout  # nobody waits longer: let the worker skip it
        try:
            client = await self.sessions.get(session_id)
            req.session_id = client.session_id
            if partials and getattr(req, "stream", False):
                reply = None
                async for event in client.stream(req, timeout):
                    if isinstance(event, Reply):
                        reply = event
                    else:
                        yield event
                assert reply is not None
            else:
                reply = await client.request(req, timeout)
        except ValueError as exc:  # a session id that can't be one
            raise GatewayError(400, str(exc), ErrorCode.INVALID.value) from None
        except BacklogFull as exc:
            raise GatewayError.from_protocol(exc) from None
        except asyncio.TimeoutError:
            raise GatewayError(
                504,
                f"no reply within {timeout:g} s (VLMQ_GATEWAY_TIMEOUT_S); are workers running?",
                "timeout",
                # the request may still run: a retry would wait as long again, for a second copy
                headers={"x-should-retry": "false"},
            ) from None
        except RedisError as exc:
            raise GatewayError(503, f"Redis is unreachable: {exc}", "unavailable") from None
        if not reply.ok:
            assert reply.error is not None
            raise GatewayError.from_protocol(
                ProtocolError(reply.error.code, reply.error.message, reply.error.detail)
            )
        yield reply

    async def require_worker(self, kind: str, model: Optional[str]) -> None:
        """A 503 with Retry-After, at once, when no live worker serves `kind` for `model`
        (None: the shared streams): a client then retries as often as it chose to, instead
        of each try waiting out the timeout."""
        try:
            for fresh in (False, True):  # a worker that just started may not be in the cache yet
                if fresh:
                    self._workers_at = 0.0
                live = await self.serving(kind)
                if any(model is None or w.get("model_name") == model for w in live):
                    return
        except RedisError as exc:
            raise GatewayError(503, f"Redis is unreachable: {exc}", "unavailable") from None
        name = model or self.settings.models[0]
        raise GatewayError(
            503,
            f"no live worker serves {kind} for model {name!r}; retry later or start one",
            "no_worker",
            headers={"Retry-After": str(NO_WORKER_RETRY_S)},
        )

    # ------------------------------------------------------------------ workers

    async def workers(self) -> List[Dict[str, str]]:
        """Live workers (their heartbeats), refreshed at most once a second."""
        now = time.monotonic()
        if now - self._workers_at > _WORKERS_TTL_S:
            found = []
            async for key in self.redis.scan_iter(match=self.keys.workers_pattern(), count=1000):
                info = {text(k): text(v) for k, v in (await self.redis.hgetall(key)).items()}
                if info:
                    found.append(info)
            self._workers, self._workers_at = found, now
        return self._workers

    async def serving(self, kind: str) -> List[Dict[str, str]]:
        return [w for w in await self.workers() if kind in w.get("kinds", "").split(",")]
