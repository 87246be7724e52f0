"""Connections by URL (redis://, rediss://, unix://), with the retry policy of broker/retry.py
built into redis-py: a command that loses its connection reconnects with jittered exponential
backoff (10 ms .. 2 s, 20 attempts, ~30 s by default: long enough to ride out a Redis
restart, short enough that a real outage surfaces as an error)."""

from __future__ import annotations

from typing import Any, Dict, Union

import redis
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from broker.settings import BrokerSettings

AsyncRedis = Union["aioredis.Redis", "aioredis.RedisCluster"]
SyncRedis = Union["redis.Redis", "redis.RedisCluster"]


def _kwargs(settings: BrokerSettings, asyncio: bool) -> Dict[str, Any]:
    kw: Dict[str, Any] = {
        "retry": settings.retry.redis_retry(use_asyncio=asyncio),
        "retry_on_error": [ConnectionError, TimeoutError, BusyLoadingError, ConnectionResetError],
        "health_check_interval": 30,
        "protocol": 2,
    }
    if not settings.url.startswith("unix://"):
        kw["socket_keepalive"] = True
    if settings.url.startswith("rediss://"):
        if settings.tls_ca:
            kw["ssl_ca_certs"] = settings.tls_ca
        if settings.tls_cert:
            kw["ssl_certfile"] = settings.tls_cert
        if settings.tls_key:
            kw["ssl_keyfile"] = settings.tls_key
    if settings.cluster:
        kw.pop("health_check_interval")
    kw.update(settings.extra)
    return kw


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def check_reachable(settings: BrokerSettings, timeout_s: float = 3.0) -> None:
    """One PING without the retries of `connect_sync`: one-shot commands (inspect, top)
    fail within `timeout_s` when Redis is down instead of backing off for ~30 s. Raises
    redis' ConnectionError / TimeoutError."""
    kw = {
        **_kwargs(settings, asyncio=False),
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
    }
    kw["retry"] = settings.retry.with_(attempts=0).redis_retry(use_asyncio=False)
    cls = redis.RedisCluster if settings.cluster else redis.Redis
    client = cls.from_url(settings.url, **kw)  # a cluster client connects here
    try:
        client.ping()
    finally:
        client.close()


def connect_async(settings: BrokerSettings) -> AsyncRedis:
    kw = _kwargs(settings, asyncio=True)
    if settings.cluster:
        return aioredis.RedisCluster.from_url(settings.url, **kw)
    return aioredis.Redis.from_url(settings.url, **kw)


def connect_sync(settings: BrokerSettings) -> SyncRedis:
    kw = _kwargs(settings, asyncio=False)
    if settings.cluster:
        return redis.RedisCluster.from_url(settings.url, **kw)
    return redis.Redis.from_url(settings.url, **kw)
