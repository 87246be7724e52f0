"""Stream backlogs, pending counts, dead letters and live workers, read from Redis at scrape time.

A prometheus-client collector: each scrape takes one `ops.inspect.snapshot()` (the same view
as `vlmq inspect`), cached for a second so Prometheus and `vlmq top` scraping together cost
one sample. Every worker exports the whole prefix, so dashboards aggregate these gauges
with `max by (...)`, not `sum`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterator, Optional

from broker.settings import BrokerSettings
from ops.metrics import names as n

_CACHE_S = 1.0
_TIMEOUT_S = 2.0  # a scrape must not hang on a Redis that is down


class RedisSampler:
    def __init__(self, settings: BrokerSettings) -> None:
        # Fail fast instead of the worker connection's 30 s of retries (one retry, at once):
        # a missed sample shows as vlmq_redis_up 0, and the next scrape tries again.
        self.settings = settings.with_(
            retry_attempts=1,
            retry_base_s=0.0,
            extra={**settings.extra, "socket_timeout": _TIMEOUT_S, "socket_connect_timeout": _TIMEOUT_S},
        )
        self._redis = None
        self._lock = threading.Lock()
        self._last: Optional[Dict[str, Any]] = None
        self._last_at = 0.0
        self._took = 0.0

    def sample(self) -> Optional[Dict[str, Any]]:
        from broker.connection import connect_sync
        from ops.inspect import snapshot

        with self._lock:
            if time.monotonic() - self._last_at < _CACHE_S:
                return self._last
            t0 = time.perf_counter()
            try:
                if self._redis is None:
                    self._redis = connect_sync(self.settings)
                self._last = snapshot(self._redis, self.settings)
            except Exception:
                self._last = None
            self._took = time.perf_counter() - t0
            self._last_at = time.monotonic()
            return self._last

    def describe(self) -> Iterator[Any]:
        return iter(())  # families are built per scrape; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        def family(spec: n.MetricSpec) -> GaugeMetricFamily:
            return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)

        snap = self.sample()
        backlog, pending, waiting, consumers = (
            family(n.STREAM_BACKLOG),
            family(n.STREAM_PENDING),
            family(n.STREAM_WAITING),
            family(n.STREAM_CONSUMERS),
        )
        dlq, replies, workers = (
            family(n.DEAD_LETTER_ENTRIES),
            family(n.REPLY_STREAMS),
            family(n.WORKERS_ALIVE),
        )
        if snap is not None:
            for s in snap["streams"]:
                labels = [s["kind"], s["model"] or "", str(s["partition"])]
                backlog.add_metric(labels, s["length"])
                pending.add_metric(labels, s["pending"])
                waiting.add_metric(labels, max(0, s["length"] - s["pending"]))
                consumers.add_metric(labels, len(s["consumers"]))
            for d in snap["dead_letters"]:
                kind, partition = _dlq_labels(d["stream"], self.settings.prefix)
                dlq.add_metric([kind, partition], d["length"])
            replies.add_metric([], snap["reply_streams"])
            workers.add_metric([], len(snap["workers"]))
        up = family(n.REDIS_UP)
        up.add_metric([], 0.0 if snap is None else 1.0)
        took = family(n.REDIS_SAMPLE_SECONDS)
        took.add_metric([], self._took)
        yield from (backlog, pending, waiting, consumers, dlq, replies, workers, up, took)


def _dlq_labels(key: str, prefix: str) -> tuple[str, str]:
    # <prefix>:dlq:<kind>:{p<n>}
    rest = key[len(prefix) + len(":dlq:") :]
    kind, _, tag = rest.rpartition(":")
    return kind, tag.strip("{}p")
