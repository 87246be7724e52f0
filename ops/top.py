"""`vlmq top`: a live terminal dashboard for those without Grafana.

Each refresh reads Redis (`ops.inspect.snapshot()`: streams, consumers, heartbeats, dead
letters) and scrapes the /metrics endpoint each worker advertises in its heartbeat (plus
any --metrics URL, e.g. agents'). Rates and percentiles cover the last refresh interval:
counters and histogram buckets are differenced between two scrapes. Without metrics
endpoints, rates come from the heartbeat counters and latency columns stay empty.
"""

from __future__ import annotations

import argparse
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from broker.commands import Command
from broker.connection import check_reachable, connect_sync, safe_url
from broker.settings import BrokerSettings, add_broker_args, broker_settings_from_args
from ops.inspect import snapshot
from ops.metrics import names as n
from ops.metrics.scrape import Scrape, delta, fetch, merge, quantile


@dataclass
class KindRow:
    kind: str
    requests_per_s: float = 0.0
    errors_per_s: float = 0.0
    mean_batch: Optional[float] = None
    latency_ms: Tuple[Optional[float], Optional[float], Optional[float]] = (None, None, None)  # p50 p95 p99
    stream_wait_ms: Optional[float] = None  # p50
    model_ms: Optional[float] = None  # p50 of the model stage, per batch
    agent_latency_ms: Tuple[Optional[float], Optional[float]] = (None, None)  # p50 p95, agents' view


@dataclass
class WorkerRow:
    name: str
    host: str
    backend: str
    kinds: str
    requests_per_s: Optional[float]
    mean_batch: Optional[float]
    errors: int
    queued: int
    in_flight: int
    age_s: float
    metrics: str  # "ok", "down", or "-" (no endpoint)
    stalled_s: float = 0.0  # seconds since its last commit while holding requests
    gpu_gb: Optional[float] = None


@dataclass
class Frame:
    at: float
    interval: float
    streams: List[Dict[str, Any]]
    kinds: List[KindRow]
    workers: List[WorkerRow]
    dead_letters: List[Dict[str, Any]]
    reply_streams: int
    partitions: Any = None
    errors: List[str] = field(default_factory=list)


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1000.0


@dataclass
class _Window:
    """What happened between two scrapes (everything since start, on the first)."""

    cur: Scrape
    prev: Optional[Scrape]
    interval: float

    def _diff(self, name: str, **labels: str) -> float:
        before = self.prev.value(name, **labels) if self.prev else 0.0
        return max(0.0, self.cur.value(name, **labels) - before)

    def rate(self, name: str, **labels: str) -> float:
        return self._diff(name, **labels) / self.interval if self.prev and self.interval > 0 else 0.0

    def mean(self, histogram: str, **labels: str) -> Optional[float]:
        count = self._diff(histogram + "_count", **labels)
        return self._diff(histogram + "_sum", **labels) / count if count > 0 else None

    def quantile(self, histogram: str, q: float, **labels: str) -> Optional[float]:
        old = self.prev.buckets(histogram, **labels) if self.prev else None
        return quantile(q, delta(self.cur.buckets(histogram, **labels), old))


class Top:
    def __init__(self, settings: BrokerSettings, extra_metrics: List[str], scrape: bool = True) -> None:
        self.settings = settings
        self.redis = connect_sync(settings)
        self.extra = list(extra_metrics)
        self.scrape = scrape
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vlmq-top")
        self._prev_workers: Dict[str, Tuple[float, Dict[str, Any]]] = {}
        self._prev_scrape: Optional[Scrape] = None
        self._prev_at: Optional[float] = None
        self._local = {socket.gethostname(), "localhost"}

    def _metrics_url(self, w: Dict[str, Any]) -> Optional[str]:
        port = int(w.get("metrics_port") or 0)
        if not port:
            return None
        host = w.get("host") or "127.0.0.1"
        return f"http://{'127.0.0.1' if host in self._local else host}:{port}/metrics"

    def _fetch_all(self, urls: List[str]) -> Dict[str, Optional[Scrape]]:
        def one(url: str) -> Optional[Scrape]:
            try:
                return fetch(url, timeout=1.5)
            except Exception:
                return None

        return dict(zip(urls, self._pool.map(one, urls)))

    def sample(self) -> Frame:
        now = time.time()
        snap = snapshot(self.redis, self.settings)
        urls = {w["name"]: self._metrics_url(w) for w in snap["workers"]}
        wanted = [u for u in urls.values() if u] + self.extra
        scrapes = self._fetch_all(wanted) if self.scrape else {}
        merged = merge(s for s in scrapes.values() if s is not None)
        prev, prev_at = self._prev_scrape, self._prev_at
        interval = now - prev_at if prev_at else 0.0
        frame = Frame(
            at=now,
            interval=interval,
            streams=snap["streams"],
            kinds=self._kinds(merged, prev, interval),
            workers=self._workers(snap["workers"], urls, scrapes, now),
            dead_letters=snap["dead_letters"],
            reply_streams=snap["reply_streams"],
            partitions=(snap.get("meta") or {}).get("partitions"),
            errors=[f"cannot scrape {u}" for u, s in scrapes.items() if s is None],
        )
        self._prev_scrape, self._prev_at = merged, now
        return frame

    def _kinds(self, cur: Scrape, prev: Optional[Scrape], interval: float) -> List[KindRow]:
        w = _Window(cur, prev, interval)
        kinds = set(cur.label_values(n.REQUESTS.name, "kind")) | set(
            cur.label_values(n.AGENT_REQUESTS.name, "kind")
        )
        rows = []
        for kind in sorted(kinds):
            rows.append(
                KindRow(
                    kind,
                    requests_per_s=w.rate(n.REQUESTS.name, kind=kind),
                    errors_per_s=w.rate(n.ERRORS.name, kind=kind),
                    mean_batch=w.mean(n.BATCH_SIZE.name, kind=kind),
                    latency_ms=tuple(
                        _ms(w.quantile(n.REQUEST_LATENCY.name, q, kind=kind)) for q in (0.5, 0.95, 0.99)
                    ),  # type: ignore[arg-type]
                    stream_wait_ms=_ms(w.quantile(n.STREAM_WAIT.name, 0.5, kind=kind)),
                    model_ms=_ms(w.quantile(n.STAGE_SECONDS.name, 0.5, kind=kind, stage="model")),
                    agent_latency_ms=(
                        _ms(w.quantile(n.AGENT_LATENCY.name, 0.5, kind=kind)),
                        _ms(w.quantile(n.AGENT_LATENCY.name, 0.95, kind=kind)),
                    ),
                )
            )
        return rows

    def _workers(
        self,
        workers: List[Dict[str, Any]],
        urls: Dict[str, Optional[str]],
        scrapes: Dict[str, Any],
        now: float,
    ) -> List[WorkerRow]:
        rows = []
        seen = {}
        for w in sorted(workers, key=lambda w: w.get("name", "")):
            name = w.get("name", "?")
            counters = {k: int(float(w.get(k) or 0)) for k in ("requests", "batches", "errors")}
            rps = mean = None
            before = self._prev_workers.get(name)
            if before is not None and now > before[0]:
                d_req = counters["requests"] - before[1]["requests"]
                d_bat = counters["batches"] - before[1]["batches"]
                rps = max(0, d_req) / (now - before[0])
                mean = d_req / d_bat if d_bat > 0 else None
            seen[name] = (now, counters)
            url = urls.get(name)
            scrape = scrapes.get(url) if url else None
            gpu = None
            if scrape is not None and scrape.samples.get(n.GPU_ALLOCATED.name):
                gpu = scrape.value(n.GPU_ALLOCATED.name) / 1e9
            rows.append(
                WorkerRow(
                    name=name,
                    host=w.get("host", ""),
                    backend=w.get("backend", ""),
                    kinds=w.get("kinds", ""),
                    requests_per_s=rps,
                    mean_batch=mean,
                    errors=counters["errors"],
                    queued=int(float(w.get("queued") or 0)),
                    in_flight=int(float(w.get("in_flight") or 0)),
                    age_s=float(w.get("age_s") or 0.0),
                    stalled_s=float(w.get("stalled_s") or 0.0),
                    metrics="-" if not url else ("ok" if scrape is not None else "down"),
                    gpu_gb=gpu,
                )
            )
        self._prev_workers = seen
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.redis.close()


# ----------------------------------------------------------------------------- rendering


def _f(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(title: str, columns: Sequence[str], left: Sequence[str], no_wrap: str = ""):
    """Names left, figures right; `no_wrap`: the column a row is known by."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=True)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right", no_wrap=col == no_wrap)
    return table


def render(frame: Frame, settings: BrokerSettings):
    from rich.console import Group
    from rich.text import Text

    title = Text.assemble(
        ("vlmq top", "bold"),
        f"  {safe_url(settings.url)}  prefix {settings.prefix}  partitions {frame.partitions or settings.partitions}"
        f"  reply streams {frame.reply_streams}  "
        + time.strftime("%H:%M:%S", time.localtime(frame.at))
        + (f"  (rates over {frame.interval:.1f} s)" if frame.interval else "  (rates from the next refresh)"),
    )

    kinds = _table(
        "task kinds (from the workers' /metrics)",
        (
            "kind",
            "req/s",
            "err/s",
            "batch",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "stream wait",
            "model",
            "agent p50/p95",
        ),
        left=("kind",),
        no_wrap="kind",
    )
    for k in frame.kinds:
        kinds.add_row(
            k.kind,
            _f(k.requests_per_s),
            _f(k.errors_per_s),
            _f(k.mean_batch),
            *(_f(x) for x in k.latency_ms),
            _f(k.stream_wait_ms),
            _f(k.model_ms),
            f"{_f(k.agent_latency_ms[0])}/{_f(k.agent_latency_ms[1])}",
        )
    if not frame.kinds:
        kinds.add_row("(no metrics: start workers with --metrics-port)", *[""] * 9)

    streams = _table(
        "request streams",
        ("stream", "backlog", "waiting", "pending", "consumers"),
        left=("stream",),
        no_wrap="stream",
    )
    for s in frame.streams:
        streams.add_row(
            s["stream"],
            str(s["length"]),
            str(max(0, s["length"] - s["pending"])),
            str(s["pending"]),
            str(len(s["consumers"])),
        )

    workers = _table(
        "workers (heartbeats)",
        (
            "worker",
            "backend",
            "kinds",
            "req/s",
            "batch",
            "errors",
            "queued",
            "in flight",
            "stalled",
            "seen",
            "metrics",
            "GPU GB",
        ),
        left=("worker", "backend", "kinds", "metrics"),
    )
    for w in frame.workers:
        workers.add_row(
            w.name,
            w.backend,
            w.kinds,
            _f(w.requests_per_s),
            _f(w.mean_batch),
            str(w.errors),
            str(w.queued),
            str(w.in_flight),
            f"{w.stalled_s:.0f}s",
            f"{w.age_s:.0f}s ago",
            w.metrics,
            _f(w.gpu_gb, "{:.2f}"),
        )
    if not frame.workers:
        workers.add_row("(no live workers)", *[""] * 11)

    parts: List[Any] = [title, kinds, streams, workers]
    if frame.dead_letters:
        dlq = _table("dead letters", ("stream", "entries"), left=("stream",))
        for d in frame.dead_letters:
            dlq.add_row(d["stream"], str(d["length"]))
        parts.append(dlq)
    if frame.errors:
        parts.append(Text("; ".join(frame.errors), style="yellow"))
    return Group(*parts)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    settings = broker_settings_from_args(args)
    check_reachable(settings)
    top = Top(settings, args.metrics, scrape=not args.no_scrape)
    console = Console()
    try:
        top.sample()  # the baseline the first rates are measured against
        if args.once:
            time.sleep(args.interval)
            console.print(render(top.sample(), settings))
            return 0
        with Live(render(top.sample(), settings), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(render(top.sample(), settings), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        top.close()


def add_args(p: argparse.ArgumentParser) -> None:
    add_broker_args(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (%(default)s)")
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="also scrape this /metrics URL (agents', or a worker behind NAT); repeatable",
    )
    p.add_argument("--no-scrape", action="store_true", help="Redis only: do not scrape workers' /metrics")
    p.add_argument("--once", action="store_true", help="print one frame (rates over --interval) and exit")


COMMAND = Command(
    "top",
    help="live terminal dashboard: streams, rates, batch sizes, latency percentiles, workers",
    description="Refresh a terminal view of the queue every --interval seconds: request streams "
    "(backlog, waiting, pending, consumers), per-kind rates, batch sizes and latency percentiles "
    "scraped from each worker's /metrics (the port its heartbeat advertises), workers and dead letters.",
    add_args=add_args,
    run=run,
)
