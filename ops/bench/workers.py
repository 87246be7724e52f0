"""Worker processes for the benchmarks that need no model."""

from __future__ import annotations

import os
import subprocess

from broker.settings import BrokerSettings
from ops.cli import argv


def synthetic_worker(
    settings: BrokerSettings, kind: str, *extra: str, max_wait_ms: float = 0.0
) -> subprocess.Popen:
    """`vlmq worker --backend synthetic` serving `kind` (warnings only, unbuffered output);
    `extra`: more worker flags."""
    cmd = argv(
        "worker", settings, "--backend", "synthetic", "--kinds", kind, "--max-wait-ms", f"{max_wait_ms:g}",
        *extra, log_level="WARNING",
    )  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
