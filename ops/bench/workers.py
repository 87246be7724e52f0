"""Worker processes for the benchmarks: a synthetic one, and waiting for any to be up."""

from __future__ import annotations

import os
import subprocess
import time

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


def wait_for_worker(settings: BrokerSettings, name: str, worker: subprocess.Popen, timeout: float) -> None:
    """Block until worker `name` has written its heartbeat; raises RuntimeError when its
    process exits first or `timeout` seconds pass."""
    from broker.connection import connect_sync
    from broker.keys import Keys

    redis = connect_sync(settings)
    give_up = time.time() + timeout
    while not redis.exists(Keys(settings.prefix).worker(name)):
        if worker.poll() is not None or time.time() > give_up:
            raise RuntimeError(f"worker {name} did not start (see its output above)")
        time.sleep(0.5)


def stop_worker(worker: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, so that the worker finishes its batch and exits 0; SIGKILL if it has not
    within `timeout` seconds (a benchmark must not hang on a stuck one)."""
    worker.terminate()
    try:
        worker.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
