"""An agent process is SIGKILLed with requests outstanding and restarted with the same
session: the worker still answers the dead process's requests (nothing accepted is lost),
and the new process resumes, ignoring those stale replies and getting each of its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from tests.helpers import (
    REPO,
    GatedHandler,
    WorkerThread,
    agent_summary,
    start_agent_process,
    synthetic_settings,
    wait_for,
)

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


def _published(r, stream: str) -> int:
    return int(r.xinfo_stream(stream)["entries-added"]) if r.exists(stream) else 0


def test_agent_killed_and_restarted_resumes_and_ignores_stale_replies(redis_server) -> None:
    broker = BrokerSettings(url=redis_server.url, prefix=f"ar{uuid.uuid4().hex[:6]}", claim_min_idle_ms=1000)
    session = "phoenix0"  # what agent_command names session 0 of prefix "phoenix"
    keys = Keys(broker.prefix)
    r = connect_sync(broker)
    reply_stream = keys.reply_stream(session)
    requests = keys.request_stream("text_action", 0)
    gated = GatedHandler("text_action")
    settings = synthetic_settings(broker, kinds=("text_action",), max_batch=1)
    with WorkerThread(settings, handlers={"text_action": gated}):
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
        first.send_signal(signal.SIGKILL)  # all 10 outstanding: the model is held at the gate
        first.wait()
        assert len(old_ids) == OLD_REQUESTS

        second = start_agent_process(broker, "phoenix", 1, NEW_REQUESTS, timeout=60)
        # The new life has started reading (it publishes only after that): let the old replies come.
        assert wait_for(lambda: _published(r, requests) > OLD_REQUESTS, 60), "the new life never published"
        gated.gate.set()
        summary = agent_summary(second, timeout=120)
        rids = [f[b"rid"].decode() for _, f in r.xrange(reply_stream)]
    # The new life: each of its requests answered once, with its own reply.
    assert summary["sent"] == summary["answered"] == NEW_REQUESTS
    assert summary["codes"] == {"ok": NEW_REQUESTS}
    assert summary["misdelivered"] == 0 and summary["duplicates_delivered"] == 0 and summary["lost"] == []
    # Every reply to the dead process came after the restart, and was seen and ignored.
    assert summary["stale"] == OLD_REQUESTS
    # The worker answered the dead process's requests too: nothing accepted was dropped.
    assert set(old_ids) <= set(rids)
    assert len(rids) == len(set(rids)) == OLD_REQUESTS + NEW_REQUESTS
