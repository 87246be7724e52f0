"""Every metric vlmq exports: name, type, help, labels and buckets, in one place.

Pure data (no prometheus-client import), so the dashboard test, `vlmq top` and the docs
can read the names without the `ops` extra. Names follow the Prometheus conventions:
`vlmq_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` on counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# Latency buckets from 1 ms (a no-op round trip on one host) to a minute (a long generation).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # counter | gauge | histogram
    help: str
    labels: Tuple[str, ...] = ()
    buckets: Tuple[float, ...] = ()


def _c(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "counter", help, labels)


def _g(name: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help, labels)


def _h(name: str, help: str, *labels: str, buckets: Tuple[float, ...] = LATENCY_BUCKETS) -> MetricSpec:
    return MetricSpec(name, "histogram", help, labels, buckets)


KM = ("kind", "model")

# ----------------------------------------------------------------------------- worker
REQUESTS = _c("vlmq_requests_total", "Valid requests admitted to the scheduler.", *KM)
REDELIVERIES = _c(
    "vlmq_redeliveries_total", "Requests admitted on a second or later delivery (reclaimed).", *KM
)
REPLIES = _c("vlmq_replies_total", "Replies written, by status (ok or error).", *KM, "status")
ERRORS = _c("vlmq_errors_total", "Error replies written, by error code.", *KM, "code")
DEAD_LETTERS = _c("vlmq_dead_letters_total", "Messages moved to a dead-letter stream, by code.", *KM, "code")
BATCHES = _c("vlmq_batches_total", "Batches run by the model.", *KM)
BATCH_SIZE = _h(
    "vlmq_batch_size_requests", "Requests per batch run by the model.", *KM, buckets=BATCH_BUCKETS
)
STREAM_WAIT = _h(
    "vlmq_stream_wait_seconds",
    "From the request's created_at (agent clock) to the worker reading it from the stream.",
    *KM,
)
SCHEDULE_WAIT = _h(
    "vlmq_schedule_wait_seconds", "From the worker reading a request to its batch starting.", *KM
)
BATCH_SECONDS = _h("vlmq_batch_seconds", "Wall time of one batch in the model thread.", *KM)
STAGE_SECONDS = _h(
    "vlmq_stage_seconds",
    "Time per batch by stage: the handler's stages (preprocess, model, postprocess, ...) and reply "
    "(writing replies, acks and dead letters to Redis).",
    *KM,
    "stage",
)
WORKER_LATENCY = _h(
    "vlmq_worker_latency_seconds", "From the worker reading a request to its reply being written.", *KM
)
REQUEST_LATENCY = _h(
    "vlmq_request_latency_seconds",
    "From the request's created_at (agent clock) to its reply being written: end to end, less the "
    "agent's read of the reply.",
    *KM,
)
WORKER_QUEUED = _g("vlmq_worker_queued_requests", "Requests read and waiting in the scheduler.")
WORKER_IN_FLIGHT = _g("vlmq_worker_in_flight_requests", "Requests in the model or being committed to Redis.")
WORKER_STALLED = _g(
    "vlmq_worker_stalled_seconds",
    "Seconds since the worker last wrote replies while holding requests (0 when idle): its health.",
)
WORKER_LAST_COMMIT = _g(
    "vlmq_worker_last_commit_timestamp_seconds", "Unix time the worker last wrote replies to Redis."
)
WORKER_REDIS_ERRORS = _c(
    "vlmq_worker_redis_errors_total",
    "Failed Redis calls of the worker, by operation (read, reclaim, commit, keep_alive, heartbeat, ...).",
    "op",
)
RUNS_ALONE = _c(
    "vlmq_runs_alone_total",
    "Redelivered requests (suspects of having killed a worker) run in a batch of their own.",
    *KM,
)
WORKER_INFO = _g(
    "vlmq_worker_info", "Always 1; labels describe the worker.", "worker", "backend", "model", "kinds"
)
GPU_ALLOCATED = _g("vlmq_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch).", "device")
GPU_RESERVED = _g(
    "vlmq_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator.", "device"
)
GPU_PEAK = _g("vlmq_gpu_memory_peak_bytes", "Peak GPU memory held by tensors since start.", "device")

# ----------------------------------------------------------------------------- Redis, sampled at scrape
STREAM_BACKLOG = _g(
    "vlmq_stream_backlog_requests",
    "Entries in a request stream: waiting plus pending (acked entries are deleted).",
    "kind",
    "model",
    "partition",
)
STREAM_PENDING = _g(
    "vlmq_stream_pending_requests",
    "Entries delivered to a worker and not yet acked.",
    "kind",
    "model",
    "partition",
)
STREAM_WAITING = _g(
    "vlmq_stream_waiting_requests", "Entries not yet delivered to any worker.", "kind", "model", "partition"
)
STREAM_CONSUMERS = _g(
    "vlmq_stream_consumers",
    "Consumers in the worker group of a request stream.",
    "kind",
    "model",
    "partition",
)
DEAD_LETTER_ENTRIES = _g("vlmq_dead_letter_entries", "Entries in a dead-letter stream.", "kind", "partition")
REPLY_STREAMS = _g("vlmq_reply_streams", "Reply streams in Redis (one per recently active session).")
WORKERS_ALIVE = _g("vlmq_workers_alive", "Workers whose heartbeat key exists.")
REDIS_UP = _g("vlmq_redis_up", "1 if the last sample of Redis succeeded, else 0.")
REDIS_SAMPLE_SECONDS = _g("vlmq_redis_sample_seconds", "Time the last sample of Redis took.")

# ----------------------------------------------------------------------------- agents
AGENT_REQUESTS = _c("vlmq_agent_requests_total", "Requests published by agents.", "kind")
AGENT_REPLIES = _c("vlmq_agent_replies_total", "Replies received by agents, by status.", "kind", "status")
AGENT_ERRORS = _c(
    "vlmq_agent_errors_total",
    "Failed requests as agents see them: error replies by code, plus timeout and backlog_full.",
    "kind",
    "code",
)
AGENT_LATENCY = _h(
    "vlmq_agent_latency_seconds", "End to end as the agent sees it: created_at to the reply in hand.", "kind"
)
AGENT_TRANSIT = _h(
    "vlmq_agent_transit_seconds",
    "End-to-end latency split by leg: to_worker (created to read), in_worker (read to replied), "
    "to_agent (replied to in hand).",
    "kind",
    "leg",
)
AGENT_STEPS = _c("vlmq_agent_env_steps_total", "Environment steps taken by agents.", "env")
AGENT_EPISODES = _c("vlmq_agent_episodes_total", "Episodes finished by agents.", "env")
AGENT_SESSIONS = _g("vlmq_agent_sessions", "Agent sessions running.")

WORKER_METRICS = (
    REQUESTS,
    REDELIVERIES,
    REPLIES,
    ERRORS,
    DEAD_LETTERS,
    BATCHES,
    BATCH_SIZE,
    STREAM_WAIT,
    SCHEDULE_WAIT,
    BATCH_SECONDS,
    STAGE_SECONDS,
    WORKER_LATENCY,
    REQUEST_LATENCY,
    WORKER_QUEUED,
    WORKER_IN_FLIGHT,
    WORKER_STALLED,
    WORKER_LAST_COMMIT,
    WORKER_REDIS_ERRORS,
    RUNS_ALONE,
    WORKER_INFO,
    GPU_ALLOCATED,
    GPU_RESERVED,
    GPU_PEAK,
)
REDIS_METRICS = (
    STREAM_BACKLOG,
    STREAM_PENDING,
    STREAM_WAITING,
    STREAM_CONSUMERS,
    DEAD_LETTER_ENTRIES,
    REPLY_STREAMS,
    WORKERS_ALIVE,
    REDIS_UP,
    REDIS_SAMPLE_SECONDS,
)
AGENT_METRICS = (
    AGENT_REQUESTS,
    AGENT_REPLIES,
    AGENT_ERRORS,
    AGENT_LATENCY,
    AGENT_TRANSIT,
    AGENT_STEPS,
    AGENT_EPISODES,
    AGENT_SESSIONS,
)
ALL: Dict[str, MetricSpec] = {m.name: m for m in WORKER_METRICS + REDIS_METRICS + AGENT_METRICS}
