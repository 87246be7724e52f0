"""Record, tail and replay against real workers (synthetic backend; the tiny-model round trip
is in test_ops_replay_model.py): the recorder takes no work, a replay against the same worker
reports zero differences, a changed worker reports them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from broker.connection import connect_sync
from broker.keys import Keys
from broker.settings import BrokerSettings
from env_agents.client import AsyncAgentClient
from ops.cli import argv
from ops.record import record
from ops.recording import read_recording
from ops.replay import DIFFER, MATCH, SKIPPED, ReplayOptions, exit_status, replay, report
from ops.tap import TapFilter
from schemas.messages import (
    ActionChunkRequest,
    PreferenceRequest,
    StructuredActionRequest,
    TextActionRequest,
)
from tests.helpers import REPO, WorkerThread, synthetic_settings


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)


def _requests(session: int):
    yield TextActionRequest(
        messages=[{"role": "user", "content": f"where now, {session}?"}],
        admissible_commands=["go north", "go south"],
        step=0,
    )
    yield ActionChunkRequest(image=_frame(session), instruction="open the door", step=1, noise_seed=session)
    yield StructuredActionRequest(image=_frame(session + 10), task_name="find_cave", step=2)
    yield PreferenceRequest(image_a=_frame(1), image_b=_frame(2), task="reach the goal", step=3)
    # Already past its deadline: answered `expired`, which a replay cannot reproduce.
    yield TextActionRequest(messages=[{"role": "user", "content": "late"}], step=4, deadline=time.time() - 1)


async def _traffic(settings, sessions: int = 3) -> int:
    async def one(i: int) -> int:
        async with AsyncAgentClient(f"s{i}", settings=settings, raise_on_error=False) as client:
            for req in _requests(i):
                await client.request(req, timeout=30)
        return 5

    return sum(await asyncio.gather(*(one(i) for i in range(sessions))))


def _poison(settings) -> None:
    r = connect_sync(settings)
    stream = Keys(settings.prefix, settings.partitions).stream_for("text_action", "s0")
    r.xadd(stream, {"v": "1", "kind": "text_action", "rid": "poison1", "sid": "s0", "body": b"\xc1"})
    r.close()


def _cli(settings, *args: str) -> list:
    return argv(args[0], settings, *args[1:])


def _spawn(cmd: list) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen, word: str) -> subprocess.Popen:
    line = proc.stderr.readline()  # the command says when it is tapping
    assert word in line, line + proc.stderr.read()
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out


class Recorder(threading.Thread):
    """`vlmq record`'s coroutine on its own loop (the CLI path is tested with the synthetic backend)."""

    def __init__(self, settings, path: str) -> None:
        super().__init__(daemon=True)
        self.settings, self.path = settings, path
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event = None
        self.ready = threading.Event()

    def run(self) -> None:
        async def main() -> None:
            self.stop_event = asyncio.Event()
            await record(self.settings, self.path, self.stop_event, TapFilter(), on_start=self.ready.set)

        self.loop.run_until_complete(main())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.join(30)
        assert not self.is_alive()


@pytest.fixture
def partitioned(settings):
    return settings.with_(partitions=2)  # sessions spread over two partitions: the tap reads both


def test_record_tail_replay_round_trip_and_a_changed_worker(partitioned, tmp_path):
    settings = partitioned
    path = str(tmp_path / "traffic.vlmqrec.gz")
    # 20 ms per batch stands in for a model: a request then lives longer than the taps'
    # turnaround (with a no-op handler on a loaded machine a tap can miss one; see ops/tap.py).
    with WorkerThread(synthetic_settings(settings, max_wait_ms=2.0, synthetic_latency_ms=20.0)) as worker:
        recorder, tail = _spawn(_cli(settings, "record", path)), _spawn(_cli(settings, "tail", "--json"))
        _ready(recorder, "recording"), _ready(tail, "tailing")
        sent = asyncio.run(_traffic(settings))
        _poison(settings)
        time.sleep(1.0)  # the poison's error reply
        _stop(recorder)
        tailed = [json.loads(x) for x in _stop(tail).splitlines()]

        # The recorder took no work: the workers' group is the only group, with only the worker in it.
        r = connect_sync(settings)
        for stream in Keys(settings.prefix, settings.partitions).request_streams("text_action"):
            groups = r.xinfo_groups(stream)
            assert [g["name"] for g in groups] == [settings.group.encode()]
            consumers = {c["name"].decode() for c in r.xinfo_consumers(stream, settings.group)}
            assert consumers <= {worker.worker.name}

        rec = read_recording(path)
        assert rec.footer is not None and rec.footer["orphan_replies"] == 0
        assert len(rec.requests()) == sent + 1
        assert set(rec.replies_by_rid()) == {e.rid for e in rec.requests()}
        assert {e.kind for e in rec.requests()} == {
            "text_action",
            "action_chunk",
            "structured_action",
            "preference",
        }

        # tail saw the same traffic, frames summarised and the poison flagged
        assert sum(d["type"] == "request" for d in tailed) == sent + 1
        assert sum(d["type"] == "reply" for d in tailed) == sent + 1
        assert any("uint8[32x32x3]" in d["summary"] for d in tailed)
        assert any(d["summary"].startswith("UNDECODABLE malformed") for d in tailed)
        assert any(d.get("code") == "expired" for d in tailed)

        # Replay through the CLI against the same worker: nothing differs.
        printed = _spawn(
            [
                sys.executable,
                "-m",
                "ops.cli",
                "tail",
                "--file",
                path,
                "--kinds",
                "action_chunk",
                "--sessions",
                "s0",
            ]
        )
        out = subprocess.run(
            _cli(settings, "replay", path, "--json", str(tmp_path / "r.json")),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "no differences in 12 compared replies" in out.stdout
        counts = json.loads((tmp_path / "r.json").read_text())["counts"]
        assert counts == {"match": 12, "differ": 0, "skipped": 4, "failed": 0, "no_record": 0}

        # tail --file prints the recording, filtered.
        lines = printed.communicate(timeout=60)[0].splitlines()
        assert len(lines) == 2, lines
        assert (
            "> action_chunk" in lines[0] and "frame uint8[32x32x3]" in lines[0] and "noise_seed=0" in lines[0]
        )
        assert "< action_chunk" in lines[1] and " ok " in lines[1] and "chunk float32[50x7]" in lines[1]

    # A changed model: action chunks of another shape. The replay names what changed.
    with WorkerThread(synthetic_settings(settings, synthetic_chunk=(50, 8))):
        cases = asyncio.run(replay(settings, rec, ReplayOptions(timeout=30)))
    differing = [c for c in cases if c.status == DIFFER]
    assert {c.entry.kind for c in differing} == {"action_chunk"}
    assert len(differing) == 3
    assert all(
        c.diffs[0].path == "result.chunk" and "shape (50, 7) -> (50, 8)" in c.diffs[0].detail
        for c in differing
    )
    assert sum(c.status == MATCH for c in cases) == 9
    assert sum(c.status == SKIPPED for c in cases) == 4
    assert exit_status(cases) == 1
    text = report(path, rec, cases, settings, 1.0, show=5)
    assert "differ" in text and "result.chunk: shape (50, 7) -> (50, 8)" in text


def test_record_and_replay_on_a_redis_cluster(tmp_path):
    """On Redis Cluster the tap reads each partition (one hash slot) with its own XREAD."""
    from broker.embedded_cluster import EmbeddedCluster

    path = str(tmp_path / "cluster.vlmqrec")
    with EmbeddedCluster(3) as cluster:
        settings = BrokerSettings(
            url=cluster.url, cluster=True, partitions=3, prefix="opscl", claim_min_idle_ms=1000
        )
        with WorkerThread(synthetic_settings(settings, synthetic_latency_ms=10.0)):
            recorder = Recorder(settings, path)
            recorder.start()
            assert recorder.ready.wait(30)
            sent = asyncio.run(_traffic(settings, sessions=4))
            time.sleep(0.5)
            recorder.stop()
            rec = read_recording(path)
            assert len(rec.requests()) == sent and len(rec.replies_by_rid()) == sent
            assert len({e.stream.rsplit(":", 1)[1] for e in rec.requests()}) > 1  # several partitions
            cases = asyncio.run(replay(settings, rec, ReplayOptions(timeout=30)))
    assert exit_status(cases) == 0
    assert sum(c.status == MATCH for c in cases) == sent - 4  # the expired ones are skipped
