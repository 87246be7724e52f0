"""Connections dropped under load by `CLIENT KILL`: every connection of a real worker process
and a real agent process is cut, again and again, mid-command. Both reconnect on their own;
every request is answered once to the application and nothing stays pending.

A cut can land after Redis ran a command but before its reply arrived: a retried XADD then
publishes a request twice (the client drops the second reply), and a retried XREADGROUP
leaves messages pending that nobody knows about (the worker reclaims them from itself once
they are idle). Both paths are exercised here."""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from tests.helpers import (
    agent_summary,
    kill_process,
    start_agent_process,
    start_text_worker_process,
    stop_process,
    wait_for,
)

pytestmark = pytest.mark.timeout(240)

SESSIONS = 4
REQUESTS = 150


def test_client_kill_under_load_loses_nothing(fresh_redis) -> None:
    broker = BrokerSettings(url=fresh_redis.url, prefix=f"ck{uuid.uuid4().hex[:6]}", claim_min_idle_ms=1500)
    keys = Keys(broker.prefix)
    admin = connect_sync(broker)
    worker = start_text_worker_process(broker)
    agent = None
    try:
        agent = start_agent_process(broker, "ck-", SESSIONS, REQUESTS, timeout=90)
        assert wait_for(lambda: admin.xlen(keys.reply_stream("ck-0")) >= 10, 60), "no load"
        killed = 0
        rounds = 0
        while agent.poll() is None and rounds < 25:
            killed += admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            rounds += 1
            time.sleep(0.15)
        summary = agent_summary(agent, timeout=180)
        assert worker.poll() is None, "the worker must survive its connections being killed"
        stream = keys.request_stream("text_action", 0)
        assert wait_for(lambda: admin.xpending(stream, broker.group)["pending"] == 0, 30)
        assert admin.xlen(stream) == 0
    finally:
        kill_process(agent)
        stop_process(worker, signal.SIGKILL)
    assert rounds >= 3 and killed >= 3 * 2, (rounds, killed)
    assert summary["not_accepted"] == 0, summary["errors"]
    assert summary["sent"] == summary["answered"] == SESSIONS * REQUESTS
    assert summary["lost"] == []
    assert summary["codes"] == {"ok": SESSIONS * REQUESTS}
    assert summary["duplicates_delivered"] == 0 and summary["misdelivered"] == 0
