"""Running real workers in tests: in a thread (fast) or as a process (to SIGKILL it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from inference_worker.handlers import build_handlers
from inference_worker.handlers.base import Handler, HandlerOutput
from inference_worker.handlers.synthetic import SyntheticHandler
from inference_worker.settings import WorkerSettings
from inference_worker.worker import Worker
from ops.bench.reliability_agents import agent_command
from ops.cli import argv
from schemas.messages import Request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkerThread:
    """A real Worker on its own event loop in a background thread."""

    def __init__(
        self, settings: WorkerSettings, handlers: Optional[Dict[str, Handler]] = None, observers=()
    ) -> None:
        self.settings = settings
        self.worker = Worker(settings, handlers or build_handlers(settings), observers=observers)
        self.loop = asyncio.new_event_loop()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.worker.run())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def wait_live(self, timeout: float = 120.0) -> WorkerThread:
        """Block until the worker's first heartbeat: a worker with a model warms it up first,
        and a gateway answers 503 until it sees a live worker."""
        r = connect_sync(self.settings.broker)
        key = self.worker.keys.worker(self.worker.name)
        try:
            up = wait_for(lambda: r.exists(key) or not self.thread.is_alive(), timeout, interval=0.05)
        finally:
            r.close()
        assert self.thread.is_alive(), f"the worker exited: {self.error!r}"
        assert up, "the worker wrote no heartbeat"
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.worker.request_stop)
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error

    def __exit__(self, *exc) -> None:
        self.stop()


class GatedHandler(SyntheticHandler):
    """The synthetic handler for one kind, holding each batch in the model thread until the
    test opens `gate`, and remembering every request that reached the model (`seen`). It
    makes "a batch is running while these requests arrive" a fact a test controls."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.blocking = True  # it waits on the gate: keep it off the event loop
        self.gate = threading.Event()
        self.running = threading.Event()  # set once the first batch is in the model
        self.seen: List[Request] = []

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        self.seen += list(requests)
        self.running.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return super().run(requests)


def synthetic_settings(broker: BrokerSettings, **kw) -> WorkerSettings:
    kw.setdefault("backend", "synthetic")
    kw.setdefault("max_wait_ms", 0.0)
    kw.setdefault("reclaim_interval_s", 0.2)
    kw.setdefault("heartbeat_s", 0.5)
    return WorkerSettings(broker=broker, **kw)


def worker_cmd(broker: BrokerSettings, *extra: str) -> List[str]:
    return argv("worker", broker, "--claim-min-idle-ms", str(broker.claim_min_idle_ms), *extra)


def start_worker_process(broker: BrokerSettings, *extra: str, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(
        worker_cmd(broker, *extra),
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_text_worker_process(broker: BrokerSettings, name: str = "w") -> subprocess.Popen:
    """A synthetic text_action worker process (3 ms a batch), returned once its heartbeat is up."""
    proc = start_worker_process(
        broker,
        "--backend",
        "synthetic",
        "--synthetic-latency-ms",
        "3",
        "--kinds",
        "text_action",
        "--name",
        name,
    )
    r = connect_sync(broker)
    try:
        up = wait_for(lambda: r.exists(Keys(broker.prefix).worker(name)), 60)
    finally:
        r.close()
    if not up:
        stop_process(proc, signal.SIGKILL)
        raise AssertionError("worker did not start")
    return proc


def start_agent_process(
    broker: BrokerSettings, session_prefix: str, sessions: int, requests: int, timeout: float
) -> subprocess.Popen:
    """An agent process of ops/bench/reliability_agents.py sending text_action requests."""
    return subprocess.Popen(
        agent_command(broker, session_prefix, sessions, requests, kind="text_action", timeout=timeout),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def agent_summary(agent: subprocess.Popen, timeout: float) -> Dict[str, Any]:
    """Wait for an agent process to end well and return the JSON summary it printed last."""
    out, err = agent.communicate(timeout=timeout)
    assert agent.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def kill_process(proc: Optional[subprocess.Popen]) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    give_up = time.time() + timeout
    while time.time() < give_up:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
