"""Broker settings: one object, every field settable by flag or VLMQ_* environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional

from broker.retry import RetryPolicy


def env(name: str, default: Any) -> Any:
    """Read VLMQ_<NAME> from the environment, typed like `default` (a list: comma-separated)."""
    raw = os.environ.get(f"VLMQ_{name.upper()}")
    if raw is None:
        return default
    if isinstance(default, (list, tuple)):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"VLMQ_{name.upper()}={raw!r}: expected {type(default).__name__}") from None
    return raw


def flag(
    group: Any,
    *names: str,
    var: str,
    default: Any,
    help: str,
    shown: Optional[str] = "%(default)s",
    **kwargs: Any,
) -> Any:
    """`group.add_argument(*names)` whose default is VLMQ_<var> when set, else `default`,
    and whose help ends with the variable's name and `(shown)` (the default, unless given).
    For a variable with a name of its own (shared by commands, set by the compose file);
    a flag added with plain `add_argument` reads VLMQ_<COMMAND>_<FLAG> (ops.cli.add_env_vars)."""
    suffix = f" [VLMQ_{var}]" + (f" ({shown})" if shown else "")
    return group.add_argument(*names, default=env(var, default), help=help + suffix, **kwargs)


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "redis://127.0.0.1:6379/0"  # redis://, rediss:// (TLS) or unix://; user:password@ allowed
    cluster: bool = False  # use the Redis Cluster client (keys carry hash tags either way)
    prefix: str = "vlmq"
    group: str = "vlmq-workers"
    partitions: int = 1  # request streams per kind; sessions map to one by crc32
    max_backlog: int = 10_000  # entries per request stream (waiting + in flight)
    backlog_policy: str = "error"  # or "wait": publishers sleep until there is room
    reply_maxlen: int = 256  # entries kept per session reply stream
    reply_ttl_s: int = 3600  # idle reply streams expire after this
    dlq_maxlen: int = 1_000  # entries per dead-letter stream (exact trimming)
    # A dead letter keeps the body when it is at most this long, else its length and SHA-256:
    # a dead-letter stream holds at most dlq_maxlen x (dlq_body_bytes + ~3 KiB).
    dlq_body_bytes: int = 65_536
    tap_maxlen: int = 10_000  # copies a recorder may fall behind by (ops/record.py)
    claim_min_idle_ms: int = 15_000  # a message idle this long in a dead consumer is reclaimed
    # A request that was delivered more than this many times, and that every worker that
    # ran it alone since died running, goes to dead letters (inference_worker/worker.py).
    max_deliveries: int = 3
    # Publish to this tenant's request streams (sessions must be named "<tenant>.<name>").
    tenant: str = ""
    # Clients: how long request() waits for a reply by default (0: forever), how often an
    # unanswered request's partition is checked for lost data (its epoch token), and after how
    # long without a reply a request's entry is looked for (env_agents/client.py).
    request_timeout_s: float = 300.0
    lost_check_s: float = 1.0
    presence_check_s: float = 30.0
    # Redis I/O retries (broker/retry.py): the n-th delay is up to retry_base_s x 2^n, at most
    # retry_cap_s. redis-py reconnects a failed command up to retry_attempts times (~30 s: it
    # rides out a Redis restart, a real outage surfaces as an error); the loops that must
    # outlive any outage (readers, reply commits within commit_retry_s) use the same delays.
    retry_base_s: float = 0.01
    retry_cap_s: float = 2.0
    retry_attempts: int = 20
    # TLS material for rediss:// (file paths); redis-py verifies the server against tls_ca.
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_env(cls, **overrides: Any) -> BrokerSettings:
        values = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            default = f.default if f.default is not None else ""
            if f.name == "url":
                raw = os.environ.get("VLMQ_REDIS_URL")
                if raw:
                    values["url"] = raw
                continue
            got = env(f.name, default)
            values[f.name] = None if got == "" and f.default is None else got
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> BrokerSettings:
        return replace(self, **changes)

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy of Redis I/O on these settings (redis-py's attempts included)."""
        return RetryPolicy(base_s=self.retry_base_s, cap_s=self.retry_cap_s, attempts=self.retry_attempts)


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that talks to Redis; defaults come from VLMQ_* env vars."""
    d = BrokerSettings.from_env()
    g = parser.add_argument_group("redis")
    g.add_argument(
        "--redis-url", default=d.url, help="redis://, rediss:// or unix:// URL [VLMQ_REDIS_URL] (%(default)s)"
    )
    g.add_argument(
        "--cluster",
        action="store_true",
        default=d.cluster,
        help="connect with the Redis Cluster client [VLMQ_CLUSTER]",
    )
    g.add_argument("--prefix", default=d.prefix, help="key prefix [VLMQ_PREFIX] (%(default)s)")
    g.add_argument(
        "--partitions",
        type=int,
        default=d.partitions,
        help="request stream partitions per kind [VLMQ_PARTITIONS] (%(default)s)",
    )
    g.add_argument("--tls-ca", default=d.tls_ca, help="CA bundle for rediss:// [VLMQ_TLS_CA]")
    g.add_argument("--tls-cert", default=d.tls_cert, help="client certificate for rediss:// [VLMQ_TLS_CERT]")
    g.add_argument("--tls-key", default=d.tls_key, help="client key for rediss:// [VLMQ_TLS_KEY]")


def broker_settings_from_args(args: argparse.Namespace, **overrides: Any) -> BrokerSettings:
    return BrokerSettings.from_env(
        url=args.redis_url,
        cluster=args.cluster,
        prefix=args.prefix,
        partitions=args.partitions,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        **overrides,
    )
