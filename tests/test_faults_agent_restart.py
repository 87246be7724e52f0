"""An agent process is SIGKILLed with requests outstanding and restarted with the same
session: the worker still answers the dead process's requests (nothing accepted is lost),
and the new process resumes, ignoring those stale replies and getting each of its own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from ops.bench.reliability import agent_command
from tests.helpers import REPO, WorkerThread, synthetic_settings, wait_for

pytestmark = pytest.mark.timeout(180)

OLD_REQUESTS = 10
NEW_REQUESTS = 10

# The first life of the session: publish without waiting, say so, then hang until killed.
FIRST_LIFE = """
import sys, time
from broker.settings import BrokerSettings
from env_agents.client import AgentClient
from schemas.messages import ChatMessage, TextActionRequest
url, prefix, session, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = AgentClient(session, settings=BrokerSettings(url=url, prefix=prefix))
for i in range(n):
    req = TextActionRequest(step=i, messages=[ChatMessage(role="user", content=f"old {i}")])
    client.submit(req)
    print(req.request_id, flush=True)
print("sent", flush=True)
time.sleep(600)
"""


def test_agent_killed_and_restarted_resumes_and_ignores_stale_replies(redis_server) -> None:
    broker = BrokerSettings(url=redis_server.url, prefix=f"ar{uuid.uuid4().hex[:6]}", claim_min_idle_ms=1000)
    session = "phoenix0"  # what agent_command names session 0 of prefix "phoenix"
    r = connect_sync(broker)
    reply_stream = Keys(broker.prefix).reply_stream(session)
    settings = synthetic_settings(broker, kinds=("text_action",), max_batch=1, synthetic_latency_ms=300)
    with WorkerThread(settings):
        first = subprocess.Popen(
            [sys.executable, "-c", FIRST_LIFE, broker.url, broker.prefix, session, str(OLD_REQUESTS)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        old_ids = []
        for line in first.stdout:
            if line.strip() == "sent":
                break
            old_ids.append(line.strip())
        first.send_signal(signal.SIGKILL)  # 10 requests outstanding, ~3 s of work queued
        first.wait()
        assert len(old_ids) == OLD_REQUESTS
        answered_at_restart = r.xlen(reply_stream)

        second = subprocess.run(
            agent_command(broker, "phoenix", 1, NEW_REQUESTS, kind="text_action", timeout=60),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr[-3000:]
        summary = json.loads(second.stdout.strip().splitlines()[-1])

        rids = [f[b"rid"].decode() for _, f in r.xrange(reply_stream)]
    assert answered_at_restart < OLD_REQUESTS, "the first life's replies were all in before the restart"
    # The new life: each of its requests answered once, with its own reply.
    assert summary["sent"] == summary["answered"] == NEW_REQUESTS
    assert summary["codes"] == {"ok": NEW_REQUESTS}
    assert summary["misdelivered"] == 0 and summary["duplicates_delivered"] == 0 and summary["lost"] == []
    # Replies to the dead process that arrived after the restart were seen and ignored.
    assert 1 <= summary["stale"] <= OLD_REQUESTS - answered_at_restart
    # The worker answered the dead process's requests too: nothing accepted was dropped.
    assert set(old_ids) <= set(rids)
    assert len(rids) == len(set(rids)) == OLD_REQUESTS + NEW_REQUESTS
