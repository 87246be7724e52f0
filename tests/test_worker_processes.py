"""Real `vlmq worker` processes: SIGKILL and reclaim, graceful SIGTERM, the CLI."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest
from redis.exceptions import ResponseError

from broker.connection import connect_sync
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AgentClient, AsyncAgentClient
from ops.cli import argv
from schemas.messages import TextActionRequest
from tests.helpers import REPO, WorkerThread, start_worker_process, synthetic_settings, wait_for


def pending(r, stream: str, group: str) -> int:
    try:
        return r.xpending(stream, group)["pending"]
    except ResponseError:  # the worker has not created its group yet
        return 0


def text(i: int) -> TextActionRequest:
    return TextActionRequest(messages=[{"role": "user", "content": f"m{i}"}], step=i)


def test_sigkill_mid_batch_second_worker_reclaims_and_each_request_gets_one_reply(settings):
    r = connect_sync(settings)
    stream = Keys(settings.prefix).request_stream("text_action", 0)
    slow = start_worker_process(
        settings,
        "--backend",
        "synthetic",
        "--kinds",
        "text_action",
        "--name",
        "slow",
        "--synthetic-latency-ms",
        "60000",
    )
    try:

        async def main():
            async with AsyncAgentClient("survivor", settings=settings) as client:
                futs = [await client.submit(text(i)) for i in range(5)]
                # The slow worker holds all five (mid-batch) ...
                got = await asyncio.to_thread(wait_for, lambda: pending(r, stream, settings.group) == 5, 30)
                assert got, "slow worker never took the batch"
                slow.kill()  # ... and dies without a word.
                slow.wait(10)
                with WorkerThread(synthetic_settings(settings, kinds=("text_action",), name="rescuer")):
                    replies = await asyncio.wait_for(asyncio.gather(*futs), 60)
                return replies, client.duplicates

        replies, duplicates = asyncio.run(main())
    finally:
        if slow.poll() is None:
            slow.kill()
    assert sorted(r.step for r in replies) == list(range(5))
    assert all(r.worker == "rescuer" and r.delivery == 2 for r in replies)
    assert duplicates == 0
    assert r.xlen(Keys(settings.prefix).reply_stream("survivor")) == 5
    assert r.xpending(stream, settings.group)["pending"] == 0


def test_sigterm_finishes_the_batch_in_flight_replies_acks_and_exits_0(settings):
    r = connect_sync(settings)
    stream = Keys(settings.prefix).request_stream("text_action", 0)
    proc = start_worker_process(
        settings, "--backend", "synthetic", "--kinds", "text_action", "--synthetic-latency-ms", "1500"
    )
    try:
        with AgentClient("graceful", settings=settings) as client:
            futs = [client.submit(text(i)) for i in range(3)]
            assert wait_for(lambda: pending(r, stream, settings.group) == 3, 30)
            proc.send_signal(signal.SIGTERM)  # while the model is busy with the batch
            replies = [f.result(30) for f in futs]
            assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(rep.ok for rep in replies)
    assert r.xpending(stream, settings.group)["pending"] == 0 and r.xlen(stream) == 0
    assert not r.exists(Keys(settings.prefix).worker(replies[0].worker))  # heartbeat removed


def test_importing_the_agent_client_does_not_import_torch():
    code = "import sys, env_agents, env_agents.client, schemas, broker; assert 'torch' not in sys.modules, 'torch imported'; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_help_reads_well():
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "--help"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    for cmd in ("worker", "demo", "inspect", "bench"):
        assert cmd in out
    worker = subprocess.run(
        [sys.executable, "-m", "ops.cli", "worker", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout
    for flag in (
        "--redis-url",
        "VLMQ_REDIS_URL",
        "--max-batch",
        "--max-wait-ms",
        "--backend",
        "--model",
        "--device",
    ):
        assert flag in worker


def test_inspect_shows_streams_consumers_workers_and_dead_letters(settings):
    with WorkerThread(synthetic_settings(settings, kinds=("text_action",), name="inspected")):
        with AgentClient("looker", settings=settings) as client:
            client.request(text(1), timeout=20)
        out = subprocess.run(
            argv("inspect", settings),
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout
    assert f"{settings.prefix}:req:text_action:{{p0}}" in out
    assert "consumer inspected" in out
    assert "inspected" in out.split("workers:")[1]


@pytest.mark.parametrize("scheme", ["unix", "acl"])
def test_connect_by_unix_socket_and_with_username_password(scheme, tmp_path):
    sock = str(tmp_path / "redis.sock")
    args = ["--unixsocket", sock, "--unixsocketperm", "700"]
    if scheme == "acl":
        args += ["--user", "default", "off", "--user", "agent", "on", ">s3cret", "~*", "&*", "+@all"]
    with EmbeddedRedis(args=args) as server:
        url = f"unix://{sock}" if scheme == "unix" else f"redis://agent:s3cret@127.0.0.1:{server.port}/0"
        settings = BrokerSettings(url=url, prefix="conn")
        with WorkerThread(synthetic_settings(settings, kinds=("text_action",))):
            with AgentClient("c", settings=settings) as client:
                assert client.request(text(0), timeout=20).ok
