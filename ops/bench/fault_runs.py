"""The fault runs of `vlmq bench reliability`: real `vlmq worker` processes (synthetic
backend), agent processes (ops/bench/reliability_agents.py), one private redis-server, and
one fault injected while they work. Each run returns plain figures; reliability.py turns
them into records.

- `load_run`: 64 closed-loop sessions; worker 0 SIGKILLed (or SIGSTOPped) once a fraction
  of the requests is published, or no fault (the throughput baseline). Takeover time: from
  the fault to the survivor's reply to each request the victim held.
- `restart_run`: Redis without persistence restarted under load.
- `poison_run`: workers that die when a "poison" request reaches their model, restarted as a
  supervisor would; the dead letters are read back and every one that is not a poison is
  collateral.
- `bad_input_run`: the hostile entries of bad_inputs.py written straight into the streams
  while good sessions run; the good sessions' longest wait and the dead letters' bytes.
- `record_run`: `vlmq record` and, beside it, a recorder on the stream-reading tap that
  `vlmq record` used before (ops/tap.py, still `vlmq tail`'s), under a no-op worker at full
  rate; the share of the requests each captured.

`python -m ops.bench.fault_runs --redis-url URL --prefix P FILE` is that baseline recorder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from broker.connection import connect_sync
from broker.embedded import EmbeddedRedis
from broker.keys import Keys
from broker.settings import BrokerSettings
from ops.bench.reliability_agents import POISON, agent_command, merge
from ops.cli import argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def percentile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(q * len(v)))]


@dataclass
class Deployment:
    """Workers and agents of one run, on one prefix of one Redis."""

    url: str
    kind: str  # of the agents' requests
    claim_min_idle_ms: int
    worker_flags: List[str] = field(default_factory=list)
    worker_kinds: str = ""  # the kinds the workers serve (default: `kind`)
    tag: str = field(default_factory=lambda: f"rel{uuid.uuid4().hex[:6]}")

    def __post_init__(self) -> None:
        self.settings = BrokerSettings(
            url=self.url, prefix=self.tag, claim_min_idle_ms=self.claim_min_idle_ms
        )
        self.keys = Keys(self.settings.prefix, self.settings.partitions)
        self.r = connect_sync(self.settings)
        self.logs = tempfile.mkdtemp(prefix="vlmq-reliability-")
        self.workers: Dict[str, subprocess.Popen] = {}
        self.agents: List[subprocess.Popen] = []
        self.summaries: List[str] = []  # the agents' summary files
        self.failed = False

    def start_worker(self, name: str, *extra: str) -> subprocess.Popen:
        cmd = argv(
            "worker", self.settings, "--backend", "synthetic", "--kinds", self.worker_kinds or self.kind, "--name", name,
            "--claim-min-idle-ms", str(self.claim_min_idle_ms), *self.worker_flags, *extra,
            log_level="WARNING",
        )  # fmt: skip
        with open(os.path.join(self.logs, f"{name}.log"), "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.workers[name] = proc
        return proc

    def wait_up(self, names: Sequence[str], timeout: float = 60.0) -> None:
        give_up = time.time() + timeout
        while not all(self.r.exists(self.keys.worker(n)) for n in names):
            dead = [n for n in names if self.workers[n].poll() is not None]
            if time.time() > give_up or dead:
                self.failed = True
                raise RuntimeError(f"worker(s) {dead or list(names)} did not start; logs in {self.logs}")
            time.sleep(0.05)

    def start_agents(self, sessions: int, requests: int, procs: int, **kw: Any) -> None:
        per = [sessions // procs + (i < sessions % procs) for i in range(procs)]
        for i, n in enumerate(per):
            if n:
                out = os.path.join(self.logs, f"agents-{len(self.agents)}.json")
                cmd = agent_command(
                    self.settings, f"{self.tag}-a{i}-", n, requests, kind=self.kind, out=out, **kw
                )
                self.agents.append(subprocess.Popen(cmd, cwd=REPO))
                self.summaries.append(out)

    def published(self) -> int:
        total = 0
        for stream in self.keys.request_streams(self.kind):
            try:
                total += int(self.r.xinfo_stream(stream)["entries-added"])
            except Exception:  # not created yet
                pass
        return total

    def agents_running(self) -> bool:
        return any(a.poll() is None for a in self.agents)

    def collect(self, timeout: float) -> Dict[str, Any]:
        give_up = time.time() + timeout
        summaries = []
        for a, path in zip(self.agents, self.summaries):
            if a.wait(timeout=max(1.0, give_up - time.time())) != 0:
                self.failed = True
                raise RuntimeError(f"an agent process failed ({a.returncode}); logs in {self.logs}")
            with open(path) as f:
                summaries.append(json.load(f))
        return merge(summaries)

    def held_by(self, consumer: str) -> List[str]:
        """Request ids of the entries pending for `consumer`."""
        rids = []
        for stream in self.keys.request_streams(self.kind):
            for p in self.r.xpending_range(
                stream, self.settings.group, "-", "+", 100_000, consumername=consumer
            ):
                entry = self.r.xrange(stream, p["message_id"], p["message_id"])
                if entry:
                    rids.append(entry[0][1][b"rid"].decode())
        return rids

    def heartbeat(self, name: str) -> Dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.keys.worker(name)).items()}

    def left_pending(self) -> int:
        total = 0
        for stream in self.keys.request_streams(self.kind):
            try:
                total += self.r.xpending(stream, self.settings.group)["pending"] + self.r.xlen(stream)
            except Exception:
                pass
        return total

    def dead_letters(self) -> List[Dict[bytes, bytes]]:
        out = []
        for p in range(self.settings.partitions):
            out += [f for _, f in self.r.xrange(self.keys.dead_letters(self.kind, p))]
        return out

    def close(self) -> None:
        for p in [*self.agents, *self.workers.values()]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        self.r.close()
        if not self.failed:
            shutil.rmtree(self.logs, ignore_errors=True)  # kept when the run failed


# ----------------------------------------------------------------------------- runs


def load_run(
    url: str,
    fault: Optional[str],
    agents: int,
    requests: int,
    agent_procs: int,
    workers: int,
    at: float,
    claim_min_idle_ms: int,
    latency_ms: float,
    max_batch: int,
    kind: str,
    image_side: int,
    timeout: float,
) -> Dict[str, Any]:
    """fault: "kill" (SIGKILL), "stop" (SIGSTOP, SIGCONT at the end) or None."""
    flags = ["--synthetic-latency-ms", f"{latency_ms:g}", "--max-batch", str(max_batch)]
    dep = Deployment(url, kind, claim_min_idle_ms, flags)
    try:
        names = [f"{dep.tag}-w{i}" for i in range(workers)]
        for n in names:
            dep.start_worker(n)
        dep.wait_up(names)
        dep.start_agents(agents, requests, agent_procs, image_side=image_side, timeout=timeout)
        held: List[str] = []
        fault_at = 0.0
        if fault:
            while dep.published() < at * agents * requests and dep.agents_running():
                time.sleep(0.02)
            victim = dep.workers[names[0]]
            victim.send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            fault_at = time.time()
            if fault == "kill":
                victim.wait()
            held = dep.held_by(names[0])
        res = dep.collect(timeout * 2 + requests * 1.0)
        if fault == "stop":  # it wakes up, finishes its batch, and its commit is fenced off
            dep.workers[names[0]].send_signal(signal.SIGCONT)
            time.sleep(max(2.0, claim_min_idle_ms / 1000))
        stats = [dep.heartbeat(n) for n in names if dep.workers[n].poll() is None]
        replied = res["redelivered_replied_at"]
        res.update(
            seconds=res["finished_at"] - res["started_at"],
            held=len(held),
            takeover_s=[replied[rid] - fault_at for rid in held if rid in replied],
            takeover_missing=sum(rid not in replied for rid in held),
            reclaimed=sum(int(s.get("reclaimed", 0)) for s in stats),
            fenced=sum(int(s.get("fenced", 0)) for s in stats),
            left_pending=dep.left_pending(),
            redis_peak_mb=dep.r.info("memory")["used_memory_peak"] / 2**20,
        )
        return res
    finally:
        dep.close()


def restart_run(
    agents: int,
    requests: int,
    agent_procs: int,
    at: float,
    kind: str,
    timeout: float,
    max_batch: int = 8,
    latency_ms: float = 20.0,
) -> Dict[str, Any]:
    """A private Redis without persistence, restarted (empty) once `at` of the requests are
    published. The two workers hold 2 x 2 x max_batch requests; the rest of the sessions'
    requests wait in the stream and vanish with it: the clients find them lost and publish
    them again."""
    with EmbeddedRedis() as server:
        flags = ["--synthetic-latency-ms", f"{latency_ms:g}", "--max-batch", str(max_batch)]
        dep = Deployment(server.url, kind, 3000, flags)
        try:
            names = [f"{dep.tag}-w{i}" for i in range(2)]
            for n in names:
                dep.start_worker(n)
            dep.wait_up(names)
            dep.start_agents(agents, requests, agent_procs, timeout=timeout)
            while dep.published() < at * agents * requests and dep.agents_running():
                time.sleep(0.02)
            waiting = sum(
                dep.r.xlen(st) - dep.r.xpending(st, dep.settings.group)["pending"]
                for st in dep.keys.request_streams(kind)
            )
            dep.r.close()
            server.restart()  # SIGTERM; no AOF, no RDB: it comes back empty on the same port
            restarted = time.time()
            res = dep.collect(timeout * 2 + requests * 1.0)
            res.update(
                waiting_at_restart=waiting,
                seconds=res["finished_at"] - res["started_at"],
                restarted_after_s=restarted - res["started_at"],
                left_pending=dep.left_pending(),
                workers_alive=sum(w.poll() is None for w in dep.workers.values()),
            )
            return res
        finally:
            dep.close()


def poison_run(
    url: str, agents: int, requests: int, poisons: int, kind: str, claim_min_idle_ms: int, timeout: float
) -> Dict[str, Any]:
    """Two workers that SIGKILL themselves when a poison request reaches their model,
    restarted by this loop (a supervisor) until the agents are done."""
    flags = ["--synthetic-latency-ms", "2", "--max-batch", "32", "--max-wait-ms", "5"]
    flags += ["--option", f"fault_kill_on={POISON}"]
    dep = Deployment(url, kind, claim_min_idle_ms, flags)
    try:
        live = [f"{dep.tag}-w0", f"{dep.tag}-w1"]
        for n in live:
            dep.start_worker(n)
        dep.wait_up(live)
        dep.start_agents(
            agents, requests, 1, timeout=timeout, poison_sessions=poisons, poison_at=requests // 3
        )
        crashes = 0
        while dep.agents_running():
            for i, n in enumerate(live):
                if dep.workers[n].poll() is not None:
                    crashes += 1
                    live[i] = f"{dep.tag}-w{len(dep.workers)}"
                    dep.start_worker(live[i])
            time.sleep(0.05)
        res = dep.collect(timeout)
        res.update(crashes=crashes, left_pending=dep.left_pending(), **collateral(dep.dead_letters(), res))
        return res
    finally:
        dep.close()


def dead_letter_bytes(r, keys: Keys, kinds: Sequence[str]) -> int:
    """Bytes Redis uses for the dead-letter streams of these kinds (MEMORY USAGE)."""
    return sum(r.memory_usage(keys.dead_letters(k, p)) or 0 for k in kinds for p in range(keys.partitions))


def collateral(letters: List[Dict[bytes, bytes]], agents: Dict[str, Any]) -> Dict[str, int]:
    """What the dead letters and the agents' error replies say about a poison run: poisons
    dead-lettered, and valid requests dead-lettered (collateral) or answered with an error."""
    poison_ids = set(agents["poison_ids"])
    rids = [f.get(b"rid", b"").decode() for f in letters]
    return {
        "dead_letters": len(rids),
        "poisons_dead_lettered": sum(r in poison_ids for r in rids),
        "collateral": sum(r not in poison_ids for r in rids),
        "valid_not_ok": sum(rid not in poison_ids for rid in agents["error_ids"]),
    }


def bad_input_run(
    url: str, good_sessions: int, good_requests: int, kind: str = "text_action", pace_s: float = 0.01
) -> Dict[str, Any]:
    """One worker; good closed-loop sessions of `kind` run while every hostile entry of
    bad_inputs.py is written into the text_action and action_chunk streams, one every
    `pace_s` (~100 MB in all: written at once, the sweep measures how fast a loaded machine
    moves 100 MB through Redis rather than what a bad entry costs the other sessions)."""
    from ops.bench.bad_inputs import cases
    from schemas.messages import decode_reply

    bad = cases()
    dep = Deployment(url, kind, 1000, ["--synthetic-latency-ms", "2"], "text_action,action_chunk")
    try:
        name = f"{dep.tag}-w0"
        dep.start_worker(name)
        dep.wait_up([name])
        dep.start_agents(good_sessions, good_requests, 1, timeout=60)
        while dep.published() < good_sessions * 5 and dep.agents_running():
            time.sleep(0.01)  # the good sessions are under way
        for case in bad:
            dep.r.xadd(dep.keys.request_stream(case.stream_kind, 0), case.fields)
            time.sleep(pace_s)
        res = dep.collect(120)
        streams = [dep.keys.request_stream(k, 0) for k in ("text_action", "action_chunk")]
        give_up = time.time() + 60
        while any(dep.r.xlen(s) for s in streams) and time.time() < give_up:
            time.sleep(0.05)
        letters: Dict[str, Dict[bytes, bytes]] = {}
        for k in ("text_action", "action_chunk"):
            for _, f in dep.r.xrange(dep.keys.dead_letters(k, 0)):
                letters[f.get(b"rid", b"").decode()] = f
        unanswered = not_dead_lettered = wrongly_ok = 0
        for case in bad:
            replies = dep.r.xrange(dep.keys.reply_stream(case.session)) if case.session else []
            if case.session is not None and len(replies) != 1:
                unanswered += 1
            if case.rejected and case.rid not in letters:
                not_dead_lettered += 1
            if case.rejected and any(decode_reply(f[b"body"]).ok for _, f in replies):
                wrongly_ok += 1
        res.update(
            bad_entries=len(bad),
            bad_entries_rejected=sum(c.rejected for c in bad),
            bad_bytes=sum(c.size for c in bad),
            bad_unanswered=unanswered,
            bad_not_dead_lettered=not_dead_lettered,
            bad_answered_ok=wrongly_ok,
            dlq_bytes=dead_letter_bytes(dep.r, dep.keys, ("text_action", "action_chunk")),
            dlq_bytes_whole_entries=sum(c.size for c in bad if c.rejected),
            max_good_wait_s=max(res["latencies_ms"] or [0.0]) / 1000.0,
            worker_alive=dep.workers[name].poll() is None,
            left_pending=sum(dep.r.xlen(s) for s in streams),
        )
        return res
    finally:
        dep.close()


def record_run(url: str, sessions: int, requests: int, kind: str = "text_action") -> Dict[str, Any]:
    """A no-op worker at full rate; `vlmq record` and the stream-reading recorder beside it."""
    import sys

    from ops.recording import read_recording

    dep = Deployment(url, kind, 3000)
    paths = [os.path.join(dep.logs, "commit-tap.vlmqrec"), os.path.join(dep.logs, "stream-tap.vlmqrec")]
    taps: List[subprocess.Popen] = []
    try:
        name = f"{dep.tag}-w0"
        dep.start_worker(name)
        dep.wait_up([name])
        baseline = [sys.executable, "-m", "ops.bench.fault_runs", "--redis-url", url, "--prefix", dep.tag]
        for cmd in (argv("record", dep.settings, paths[0]), [*baseline, paths[1]]):
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            line = proc.stderr.readline()
            if "recording" not in line:
                raise RuntimeError(f"{cmd} did not start: {line}{proc.stderr.read()}")
            taps.append(proc)
        dep.start_agents(sessions, requests, 2, timeout=60)
        res = dep.collect(120)
        time.sleep(0.5)  # the last replies reach the stream tap
        for proc in taps:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        got = [{e.rid for e in read_recording(p).requests()} for p in paths]
        res.update(
            seconds=res["finished_at"] - res["started_at"], recorded=len(got[0]), stream_tapped=len(got[1])
        )
        return res
    finally:
        for proc in taps:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        dep.close()


async def _stream_tap_record(settings: BrokerSettings, path: str) -> None:
    """What `vlmq record` did before the commit tap: XREAD the streams from outside."""
    import asyncio
    import sys

    from broker.connection import connect_async
    from ops.recording import RecordingWriter
    from ops.tap import StreamTap

    redis = connect_async(settings)
    writer = RecordingWriter(path, settings.prefix, settings.partitions)
    tap = StreamTap(redis, settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    await tap.start()
    print("recording", file=sys.stderr, flush=True)

    def write(events) -> None:
        for ev in events:
            writer.write(ev)

    try:
        await tap.run(write, stop)
    finally:
        writer.close()
        await redis.aclose()


if __name__ == "__main__":
    import argparse

    from broker import eventloop
    from broker.settings import add_broker_args, broker_settings_from_args

    parser = argparse.ArgumentParser(description="the stream-tap recorder (the baseline of the record run)")
    add_broker_args(parser)
    parser.add_argument("file")
    args = parser.parse_args()
    eventloop.run(_stream_tap_record(broker_settings_from_args(args), args.file))
