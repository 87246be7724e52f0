"""Redis itself fails under load: restarted (SIGTERM) with AOF on, and SIGKILLed with
`appendfsync always`. A real worker process and a real agent process ride it out on their
own retries with backoff; every request whose XADD returned is answered, exactly once to
the application."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from typing import Any, Dict, List

import pytest

from broker.connection import connect_sync
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import BrokerSettings
from ops.bench.reliability import agent_command
from tests.helpers import REPO, start_worker_process, stop_process, wait_for

pytestmark = pytest.mark.timeout(240)

SESSIONS = 4
REQUESTS = 150


def _run_with_outage(server: EmbeddedRedis, outage: str) -> Dict[str, Any]:
    broker = BrokerSettings(url=server.url, prefix=f"rr{uuid.uuid4().hex[:6]}", claim_min_idle_ms=1500)
    keys = Keys(broker.prefix)
    worker = start_worker_process(
        broker, "--backend", "synthetic", "--synthetic-latency-ms", "3", "--kinds", "text_action", "--name", "w"
    )
    agent = None
    try:
        r = connect_sync(broker)
        assert wait_for(lambda: r.exists(keys.worker("w")), 60), "worker did not start"
        agent = subprocess.Popen(
            agent_command(broker, "rr-", SESSIONS, REQUESTS, kind="text_action", timeout=90),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Under way: the first session has replies, and most of the load is still to come.
        assert wait_for(lambda: r.xlen(keys.reply_stream("rr-0")) >= 15, 60), "no load"
        answered_before = r.xlen(keys.reply_stream("rr-0"))
        r.close()
        if outage == "restart":
            server.restart()  # SIGTERM: Redis writes its AOF and exits; same port and dir
        else:
            server.kill()  # SIGKILL: only what was fsynced survives
            server.start()
        out, err = agent.communicate(timeout=180)
        assert agent.returncode == 0, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert worker.poll() is None, "the worker must survive the outage"
        r = connect_sync(broker)
        stream = keys.request_stream("text_action", 0)
        assert wait_for(lambda: r.xpending(stream, broker.group)["pending"] == 0, 30)
        assert r.xlen(stream) == 0
        assert answered_before < REQUESTS <= r.xlen(keys.reply_stream("rr-0")), "the outage missed the load"
        return summary
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        stop_process(worker, signal.SIGKILL)


def _assert_nothing_lost(summary: Dict[str, Any]) -> None:
    assert summary["not_accepted"] == 0, summary["errors"]
    assert summary["sent"] == SESSIONS * REQUESTS
    assert summary["lost"] == []
    assert summary["answered"] == summary["sent"]
    assert summary["codes"] == {"ok": summary["sent"]}
    assert summary["duplicates_delivered"] == 0 and summary["misdelivered"] == 0


def _server(extra: List[str]) -> EmbeddedRedis:
    return EmbeddedRedis(appendonly=True, args=extra)


def test_redis_restart_with_aof_loses_nothing(redis_server) -> None:
    with _server([]) as server:
        summary = _run_with_outage(server, "restart")
    _assert_nothing_lost(summary)


def test_redis_sigkill_with_appendfsync_always_loses_nothing(redis_server) -> None:
    with _server(["--appendfsync", "always"]) as server:
        summary = _run_with_outage(server, "kill")
    _assert_nothing_lost(summary)
