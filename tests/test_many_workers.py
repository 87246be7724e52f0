"""Three `vlmq worker` processes share one consumer group: the work spreads over all of
them and every request is run by the model once and answered once."""

from __future__ import annotations

import ast
import asyncio
import collections
import re
from typing import Dict, List

import redis

from env_agents.client import AsyncAgentClient
from schemas.messages import Reply, TextActionRequest
from tests.helpers import start_worker_process, stop_process, wait_for

WORKERS = 3
SESSIONS = 24
PER_SESSION = 10
_STOPPED = re.compile(r"worker (\S+) stopped: (\{.*\})")


async def drive(settings) -> List[Reply]:
    clients = [await AsyncAgentClient(f"env-{i}", settings=settings).start() for i in range(SESSIONS)]
    try:
        futs = [
            await c.submit(TextActionRequest(messages=[{"role": "user", "content": f"{c.session_id}/{j}"}]))
            for j in range(PER_SESSION)
            for c in clients
        ]
        replies = list(await asyncio.wait_for(asyncio.gather(*futs), 120))
        assert all(c.duplicates == 0 for c in clients)
        return replies
    finally:
        for c in clients:
            await c.close()


def test_three_worker_processes_share_the_work_and_serve_each_request_once(settings):
    settings = settings.with_(partitions=2)
    r = redis.Redis.from_url(settings.url)
    # Small batches and read-ahead, and a model that takes a little time: no single worker
    # can take everything at once, so whether work spreads depends on vlmq, not on luck.
    procs = [
        start_worker_process(
            settings,
            "--backend",
            "synthetic",
            "--kinds",
            "text_action",
            "--name",
            f"w{i}",
            "--max-batch",
            "4",
            "--prefetch",
            "4",
            "--max-wait-ms",
            "0",
            "--synthetic-latency-ms",
            "10",
        )
        for i in range(WORKERS)
    ]
    try:
        assert wait_for(lambda: len(r.keys(f"{settings.prefix}:worker:*")) == WORKERS, timeout=120)
        replies = asyncio.run(drive(settings))
    finally:
        outputs = []
        for p in procs:
            stop_process(p)
            outputs.append(p.stdout.read())
    total = SESSIONS * PER_SESSION
    assert len(replies) == total and all(rep.ok for rep in replies)
    assert sorted(rep.result.text for rep in replies) == sorted(
        f"env-{i}/{j}" for i in range(SESSIONS) for j in range(PER_SESSION)
    )

    served = collections.Counter(rep.worker for rep in replies)
    assert set(served) == {f"w{i}" for i in range(WORKERS)}, f"work did not spread: {served}"

    # Each request was run by a model exactly once: the workers' own counts add up.
    stats: Dict[str, dict] = {}
    for out in outputs:
        for name, body in _STOPPED.findall(out):
            stats[name] = ast.literal_eval(body)
    assert set(stats) == set(served), outputs
    assert sum(s["requests"] for s in stats.values()) == total
    assert {n: s["requests"] for n, s in stats.items()} == dict(served)

    # ... and answered exactly once: one reply entry per request id in the reply streams.
    rids = collections.Counter()
    for key in r.scan_iter(match=f"{settings.prefix}:reply:*"):
        for _id, fields in r.xrange(key):
            rids[fields[b"rid"]] += 1
    assert len(rids) == total and set(rids.values()) == {1}
    for key in r.scan_iter(match=f"{settings.prefix}:req:*"):
        assert r.xlen(key) == 0
        for g in r.xinfo_groups(key):
            assert g["pending"] == 0
    r.close()
