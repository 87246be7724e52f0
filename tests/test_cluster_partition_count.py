"""The partition count is agreed through `<prefix>:meta`: the first worker records it, and
a worker or client started with another count refuses to run, saying what to change."""

from __future__ import annotations

import asyncio
from typing import Dict

import pytest
import redis

from broker.meta import PartitionMismatch
from env_agents.client import AsyncAgentClient
from ops.cli import build_parser
from schemas.messages import TextActionRequest
from tests.helpers import WorkerThread, synthetic_settings, wait_for, worker_cmd


def recorded(settings) -> Dict[str, str]:
    """The meta hash, once the first worker has written it."""
    r = redis.Redis.from_url(settings.url, decode_responses=True)
    try:
        assert wait_for(lambda: r.hexists(f"{settings.prefix}:meta", "set_by"), timeout=60)
        return r.hgetall(f"{settings.prefix}:meta")
    finally:
        r.close()


def test_first_worker_records_the_count_and_mismatches_are_refused(settings):
    s3 = settings.with_(partitions=3)

    async def client_round_trip(s) -> str:
        async with AsyncAgentClient("agent-1", settings=s) as c:
            reply = await c.request(TextActionRequest(messages=[{"role": "user", "content": "hi"}]), 30)
            return reply.result.text

    with WorkerThread(synthetic_settings(s3, name="w-first", kinds=("text_action",))):
        meta = recorded(settings)
        assert meta["partitions"] == "3" and meta["set_by"] == "w-first"
        assert asyncio.run(client_round_trip(s3)) == "hi"

        with pytest.raises(PartitionMismatch) as err:
            asyncio.run(client_round_trip(settings.with_(partitions=5)))
        assert "records 3 partition(s)" in str(err.value) and "started with 5" in str(err.value)
        assert "VLMQ_PARTITIONS=3" in str(err.value)

        late = WorkerThread(synthetic_settings(settings.with_(partitions=2), name="w-late"))
        with pytest.raises(PartitionMismatch):
            with late:
                late.thread.join(30)


def test_worker_cli_exits_with_a_clear_message_on_mismatch(settings):
    with WorkerThread(
        synthetic_settings(settings.with_(partitions=4), name="w-first", kinds=("text_action",))
    ):
        recorded(settings)
        args = build_parser().parse_args(
            worker_cmd(settings.with_(partitions=2), "--backend", "synthetic")[3:]
        )
        with pytest.raises(SystemExit) as exit_:
            args.func(args)
    message = str(exit_.value.code)
    assert message.startswith("vlmq worker:")
    assert "records 4 partition(s)" in message and "--partitions 4" in message
