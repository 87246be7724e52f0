"""Broker settings: one object, every field settable by flag or VLMQ_* environment variable.

The variables and their values follow schemas/settings.py: a field's variable is
VLMQ_<FIELD> (`url` reads VLMQ_REDIS_URL, the flag's name), one boolean rule, an empty
value leaves the default."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional

from broker.retry import RetryPolicy
from schemas import settings as tree


def env(name: str, default: Any) -> Any:
    """Read VLMQ_<NAME> from the environment, typed like `default` (a list: comma-separated)."""
    var = f"VLMQ_{name.upper()}"
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    return tree.convert_like(raw, default, var)


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
    # redis://, rediss:// (TLS) or unix://; user:password@ allowed
    url: str = tree.setting("redis://127.0.0.1:6379/0", env="REDIS_URL")
    cluster: bool = False  # use the Redis Cluster client (keys carry hash tags either way)
    prefix: str = "vlmq"
    group: str = "vlmq-workers"
    partitions: int = 1  # request streams per kind; sessions map to one by crc32
    max_backlog: int = 10_000  # entries per request stream (waiting + in flight)
    # error: publishers are refused while a stream is full; wait: they sleep until there is room
    backlog_policy: str = tree.setting("error", choices=("error", "wait"))
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
    # keyword arguments for redis-py's client, set in code only
    extra: Dict[str, Any] = field(default_factory=dict, compare=False, hash=False, metadata=tree.NOT_SETTABLE)

    @classmethod
    def from_env(cls, **overrides: Any) -> BrokerSettings:
        """Every field from its VLMQ_* variable; `overrides` that are not None win."""
        return tree.load(cls, overrides=overrides)

    def with_(self, **changes: Any) -> BrokerSettings:
        return replace(self, **changes)

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy of Redis I/O on these settings (redis-py's attempts included)."""
        return RetryPolicy(base_s=self.retry_base_s, cap_s=self.retry_cap_s, attempts=self.retry_attempts)


def _var(name: str) -> str:
    return tree.env_name(BrokerSettings, name)


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that talks to Redis; defaults come from VLMQ_* env vars."""
    d = BrokerSettings.from_env()
    g = parser.add_argument_group("redis")
    g.add_argument(
        "--redis-url", default=d.url, help=f"redis://, rediss:// or unix:// URL [{_var('url')}] (%(default)s)"
    )
    g.add_argument(
        "--cluster",
        action="store_true",
        default=d.cluster,
        help=f"connect with the Redis Cluster client [{_var('cluster')}]",
    )
    g.add_argument("--prefix", default=d.prefix, help=f"key prefix [{_var('prefix')}] (%(default)s)")
    g.add_argument(
        "--partitions",
        type=int,
        default=d.partitions,
        help=f"request stream partitions per kind [{_var('partitions')}] (%(default)s)",
    )
    g.add_argument("--tls-ca", default=d.tls_ca, help=f"CA bundle for rediss:// [{_var('tls_ca')}]")
    g.add_argument(
        "--tls-cert", default=d.tls_cert, help=f"client certificate for rediss:// [{_var('tls_cert')}]"
    )
    g.add_argument("--tls-key", default=d.tls_key, help=f"client key for rediss:// [{_var('tls_key')}]")


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
