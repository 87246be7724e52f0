"""The Grafana dashboard, built from the metric names in ops/metrics/names.py.

ops/grafana/dashboards/vlmq.json is this module's output, committed so Grafana's file
provisioning picks it up; regenerate it after changing a panel or a metric:

    python -m ops.dashboard > ops/grafana/dashboards/vlmq.json

(the test suite fails when the two differ).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Tuple

from ops.metrics import names as n

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
KIND = '{kind=~"$kind"}'
GRID_W = 12
GRID_H = 8


def rate(metric: str, by: str, sel: str = KIND) -> str:
    return f"sum by ({by}) (rate({metric}{sel}{RATE}))"


def quantile(q: float, histogram: str, by: str, sel: str = KIND) -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket{sel}{RATE})))"


def mean(histogram: str, by: str, sel: str = KIND) -> str:
    return f"{rate(histogram + '_sum', by, sel)} / {rate(histogram + '_count', by, sel)}"


def percentiles(histogram: str, by: str = "kind", sel: str = KIND) -> List[Tuple[str, str]]:
    return [(quantile(q, histogram, by, sel), f"p{int(q * 100)} {{{{{by}}}}}") for q in (0.5, 0.95, 0.99)]


# (row title, [(panel title, unit, description, [(expr, legend)])])
PANELS: List[Tuple[str, List[Tuple[str, str, str, List[Tuple[str, str]]]]]] = [
    (
        "Traffic",
        [
            (
                "Requests / s",
                "reqps",
                "Valid requests admitted by the workers.",
                [(rate(n.REQUESTS.name, "kind"), "{{kind}}")],
            ),
            (
                "Errors / s by code",
                "reqps",
                "Error replies written, by error code (docs/PROTOCOL.md).",
                [(rate(n.ERRORS.name, "kind, code"), "{{kind}} {{code}}")],
            ),
            (
                "Dead letters",
                "short",
                "Entries in the dead-letter streams, and new dead letters per second.",
                [
                    (f"max by (kind) ({n.DEAD_LETTER_ENTRIES.name}{KIND})", "entries {{kind}}"),
                    (rate(n.DEAD_LETTERS.name, "kind, code"), "new/s {{kind}} {{code}}"),
                ],
            ),
            (
                "Sessions and workers",
                "short",
                "Reply streams (recently active sessions), live workers, agent sessions.",
                [
                    (f"max({n.REPLY_STREAMS.name})", "reply streams"),
                    (f"max({n.WORKERS_ALIVE.name})", "workers alive"),
                    (f"sum({n.AGENT_SESSIONS.name})", "agent sessions"),
                ],
            ),
        ],
    ),
    (
        "Queue",
        [
            (
                "Backlog by stream",
                "short",
                "Waiting (not yet delivered) and pending (delivered, not acked) entries per request stream.",
                [
                    (
                        f"max by (kind, model, partition) ({n.STREAM_WAITING.name}{KIND})",
                        "waiting {{kind}} {{model}} p{{partition}}",
                    ),
                    (
                        f"max by (kind, model, partition) ({n.STREAM_PENDING.name}{KIND})",
                        "pending {{kind}} {{model}} p{{partition}}",
                    ),
                ],
            ),
            (
                "Time waiting in the stream",
                "s",
                "From created_at (agent clock) to the worker reading the request.",
                percentiles(n.STREAM_WAIT.name),
            ),
            (
                "Time waiting for a batch",
                "s",
                "From the worker reading a request to its batch starting.",
                percentiles(n.SCHEDULE_WAIT.name),
            ),
            (
                "Redelivered requests / s",
                "reqps",
                "Requests taken over from a dead consumer (delivery 2 or later).",
                [(rate(n.REDELIVERIES.name, "kind"), "{{kind}}")],
            ),
        ],
    ),
    (
        "Batching",
        [
            (
                "Batch size",
                "short",
                "Mean and p95 requests per batch.",
                [
                    (mean(n.BATCH_SIZE.name, "kind"), "mean {{kind}}"),
                    (quantile(0.95, n.BATCH_SIZE.name, "kind"), "p95 {{kind}}"),
                ],
            ),
            ("Batches / s", "ops", "Batches run by the model.", [(rate(n.BATCHES.name, "kind"), "{{kind}}")]),
        ],
    ),
    (
        "Latency",
        [
            (
                "End to end, as agents see it",
                "s",
                "created_at to the reply in the agent's hands (agents' /metrics).",
                percentiles(n.AGENT_LATENCY.name),
            ),
            (
                "Request to reply written (workers)",
                "s",
                "created_at to the reply written: end to end less the agent's read.",
                percentiles(n.REQUEST_LATENCY.name),
            ),
            (
                "Time per stage (p50)",
                "s",
                "Per batch: the handler's stages (preprocess, model, postprocess) and reply (Redis).",
                [(quantile(0.5, n.STAGE_SECONDS.name, "kind, stage"), "{{kind}} {{stage}}")],
            ),
            (
                "End-to-end legs (p50)",
                "s",
                "to_worker: created to read; in_worker: read to replied; to_agent: replied to in hand.",
                [(quantile(0.5, n.AGENT_TRANSIT.name, "kind, leg"), "{{kind}} {{leg}}")],
            ),
            (
                "Worker latency",
                "s",
                "From the worker reading a request to its reply written, and model-thread time per batch.",
                [
                    (quantile(0.95, n.WORKER_LATENCY.name, "kind"), "p95 read to reply {{kind}}"),
                    (quantile(0.95, n.BATCH_SECONDS.name, "kind"), "p95 batch {{kind}}"),
                ],
            ),
            (
                "Agent failures / s",
                "reqps",
                "Error replies, timeouts and backlog_full as the agents count them.",
                [(rate(n.AGENT_ERRORS.name, "kind, code"), "{{kind}} {{code}}")],
            ),
        ],
    ),
    (
        "Workers",
        [
            (
                "Queued and in flight",
                "short",
                "Per worker: requests read and waiting in the scheduler, and in the model or being written.",
                [
                    (f"{n.WORKER_QUEUED.name}", "queued {{instance}}"),
                    (f"{n.WORKER_IN_FLIGHT.name}", "in flight {{instance}}"),
                ],
            ),
            (
                "GPU memory",
                "bytes",
                "Per worker and device: held by tensors, reserved by the caching allocator, peak.",
                [
                    (f"{n.GPU_ALLOCATED.name}", "allocated {{instance}} {{device}}"),
                    (f"{n.GPU_RESERVED.name}", "reserved {{instance}} {{device}}"),
                    (f"{n.GPU_PEAK.name}", "peak {{instance}} {{device}}"),
                ],
            ),
            (
                "Health: stalled",
                "s",
                "Per worker: seconds since it last wrote replies while holding requests (0 when idle), "
                "and its failed Redis calls per second by operation.",
                [
                    (f"{n.WORKER_STALLED.name}", "stalled {{instance}}"),
                    (
                        f"sum by (instance, op) (rate({n.WORKER_REDIS_ERRORS.name}{RATE}))",
                        "redis errors/s {{op}}",
                    ),
                ],
            ),
            (
                "Redis sampling",
                "short",
                "1 when the workers' last read of stream lengths from Redis worked; its duration in seconds.",
                [
                    (f"min({n.REDIS_UP.name})", "redis up"),
                    (f"max({n.REDIS_SAMPLE_SECONDS.name})", "sample seconds"),
                ],
            ),
            (
                "Environment steps / s",
                "ops",
                "Steps and episodes finished by the agents.",
                [
                    (f"sum by (env) (rate({n.AGENT_STEPS.name}{RATE}))", "steps {{env}}"),
                    (f"sum by (env) (rate({n.AGENT_EPISODES.name}{RATE}))", "episodes {{env}}"),
                ],
            ),
        ],
    ),
]


def _panel(
    pid: int, title: str, unit: str, desc: str, targets: List[Tuple[str, str]], x: int, y: int
) -> Dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DATASOURCE,
        "gridPos": {"h": GRID_H, "w": GRID_W, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def build() -> Dict[str, Any]:
    panels: List[Dict[str, Any]] = []
    pid, y = 1, 0
    for row_title, row_panels in PANELS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        for i, (title, unit, desc, targets) in enumerate(row_panels):
            panels.append(_panel(pid, title, unit, desc, targets, (i % 2) * GRID_W, y + (i // 2) * GRID_H))
            pid += 1
        y += ((len(row_panels) + 1) // 2) * GRID_H
    return {
        "uid": "vlmq-overview",
        "title": "vlmq",
        "description": "Queue, batching and latency of vlmq workers and agents (ops/dashboard.py).",
        "tags": ["vlmq"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "vlmq-prometheus"},
                },
                {
                    "name": "kind",
                    "label": "Task kind",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": f"label_values({n.REQUESTS.name}, kind)", "refId": "kind"},
                    "definition": f"label_values({n.REQUESTS.name}, kind)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
