"""Zero-loss load test: 64 agents x 1,000 requests, 2 worker processes, one SIGKILLed midway.

Agents are closed-loop sessions (send a frame, wait for its reply, send the next, like an
environment) spread over several agent processes. Workers are real `vlmq worker`
processes with the synthetic backend (a fixed model latency). Once --kill-at of the
requests have been published, worker 0 is SIGKILLed in the middle of a batch; the survivor
reclaims what it held after --claim-min-idle-ms. The agents count lost_requests (accepted,
never answered within --timeout), duplicate_replies (a reply handed to the application for
a request already answered) and requests_answered; also recorded: duplicates found in the
reply streams (dropped by the client), requests answered after a redelivery, and throughput
against a first pass without the kill. Exits 1 if anything was lost or delivered twice.

The agent side is a command of its own, used by the fault tests: `python -m
ops.bench.reliability --redis-url URL --prefix P --session-prefix a- --sessions 8
--requests 100` prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

from broker import eventloop
from broker.settings import BrokerSettings
from ops.cli import argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- the agent side


def _request(kind: str, step: int, frame: np.ndarray):
    from schemas.messages import ActionChunkRequest, ChatMessage, TextActionRequest

    if kind == "action_chunk":
        return ActionChunkRequest(step=step, image=frame, instruction="pick up the red box")
    return TextActionRequest(step=step, messages=[ChatMessage(role="user", content=f"observation {step}")])


async def _session(
    client, kind: str, requests: int, frame: np.ndarray, timeout: float, out: Dict[str, Any]
) -> None:
    answered: set = set()
    for step in range(requests):
        req = _request(kind, step, frame)
        t0 = time.perf_counter()
        try:
            fut = await client.submit(req)
        except Exception as exc:  # refused at publish (backlog full, Redis gone for good): not accepted
            out["not_accepted"] += 1
            out["errors"][type(exc).__name__] = out["errors"].get(type(exc).__name__, 0) + 1
            continue
        out["sent"] += 1
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            out["lost"].append(req.request_id)
            continue
        out["latencies_ms"].append((time.perf_counter() - t0) * 1000.0)
        out["answered"] += 1
        if reply.request_id != req.request_id:
            out["misdelivered"] += 1
        if reply.request_id in answered:
            out["duplicates_delivered"] += 1
        answered.add(reply.request_id)
        if reply.delivery > 1:
            out["redelivered"] += 1
        code = "ok" if reply.ok else str(reply.error.code.value if reply.error else "error")
        out["codes"][code] = out["codes"].get(code, 0) + 1


async def run_agents(
    settings: BrokerSettings,
    sessions: List[str],
    requests: int,
    kind: str = "action_chunk",
    image_side: int = 64,
    timeout: float = 120.0,
) -> Dict[str, Any]:
    """Closed-loop sessions sharing one connection pool; returns the counts the module
    docstring describes, plus every latency (ms) and the ids of lost requests."""
    from broker.connection import connect_async
    from env_agents.client import AsyncAgentClient

    redis = connect_async(settings)
    frame = np.random.default_rng(0).integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
    out: Dict[str, Any] = {
        "sent": 0,
        "not_accepted": 0,
        "answered": 0,
        "misdelivered": 0,
        "duplicates_delivered": 0,
        "duplicates_in_streams": 0,
        "stale": 0,
        "redelivered": 0,
        "codes": {},
        "errors": {},
        "lost": [],
        "latencies_ms": [],
    }
    clients = [AsyncAgentClient(s, redis=redis, settings=settings, raise_on_error=False) for s in sessions]
    try:
        for c in clients:
            await c.start()
        out["started_at"] = time.time()
        await asyncio.gather(*(_session(c, kind, requests, frame, timeout, out) for c in clients))
        out["finished_at"] = time.time()
    finally:
        for c in clients:
            out["duplicates_in_streams"] += c.duplicates
            out["stale"] += c.stale
            await c.close()
        await redis.aclose()
    return out


def agent_main(argv: Optional[List[str]] = None) -> int:
    from broker.settings import add_broker_args, broker_settings_from_args

    p = argparse.ArgumentParser(
        prog="python -m ops.bench.reliability",
        description="The agent side of `vlmq bench reliability`: closed-loop sessions that count "
        "what was sent, answered, lost and duplicated, and print it as one JSON line.",
    )
    add_broker_args(p)
    p.add_argument(
        "--session-prefix", default="agent-", help="sessions are PREFIX0, PREFIX1, ... (%(default)s)"
    )
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (%(default)s)")
    p.add_argument("--requests", type=int, default=100, help="requests per session (%(default)s)")
    p.add_argument(
        "--kind", default="action_chunk", choices=["action_chunk", "text_action"], help="(%(default)s)"
    )
    p.add_argument("--image-side", type=int, default=64, help="raw uint8 frame side (%(default)s)")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for each reply (%(default)s)"
    )
    args = p.parse_args(argv)
    settings = broker_settings_from_args(args)
    sessions = [f"{args.session_prefix}{i}" for i in range(args.sessions)]
    out = eventloop.run(
        run_agents(settings, sessions, args.requests, args.kind, args.image_side, args.timeout)
    )
    print(json.dumps(out), flush=True)
    return 0


def agent_command(settings: BrokerSettings, session_prefix: str, sessions: int, requests: int, **kw: Any):
    """The argv of an agent process (for the benchmark and the fault tests)."""
    cmd = [
        sys.executable,
        "-m",
        "ops.bench.reliability",
        "--redis-url",
        settings.url,
        "--prefix",
        settings.prefix,
        "--partitions",
        str(settings.partitions),
        "--session-prefix",
        session_prefix,
        "--sessions",
        str(sessions),
        "--requests",
        str(requests),
    ]
    for flag, value in (
        ("--tls-ca", settings.tls_ca),
        ("--tls-cert", settings.tls_cert),
        ("--tls-key", settings.tls_key),
    ):
        if value:
            cmd += [flag, value]
    if settings.cluster:
        cmd.append("--cluster")
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def merge(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Add up agent summaries; the time span is from the first start to the last finish."""
    total: Dict[str, Any] = {"codes": {}, "errors": {}, "lost": [], "latencies_ms": []}
    total["started_at"] = min(s["started_at"] for s in summaries)
    total["finished_at"] = max(s["finished_at"] for s in summaries)
    for s in summaries:
        for k, v in s.items():
            if k in ("started_at", "finished_at"):
                continue
            if isinstance(v, dict):
                for kk, vv in v.items():
                    total[k][kk] = total[k].get(kk, 0) + vv
            elif isinstance(v, list):
                total[k] += v
            else:
                total[k] = total.get(k, 0) + v
    return total


# ----------------------------------------------------------------------------- the benchmark


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument("--agents", type=int, default=64, help="agent sessions (%(default)s)")
    p.add_argument("--requests", type=int, default=1000, help="requests per agent (%(default)s)")
    p.add_argument(
        "--agent-procs", type=int, default=8, help="processes the agents are spread over (%(default)s)"
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (%(default)s)")
    p.add_argument(
        "--kill-at",
        type=float,
        default=0.5,
        help="SIGKILL worker 0 once this fraction is published (%(default)s)",
    )
    p.add_argument(
        "--kind", default="action_chunk", choices=["action_chunk", "text_action"], help="(%(default)s)"
    )
    p.add_argument("--image-side", type=int, default=64, help="raw uint8 frame side (%(default)s)")
    p.add_argument(
        "--latency-ms", type=float, default=2.0, help="synthetic model latency per batch (%(default)s)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="worker batch size (%(default)s)")
    p.add_argument(
        "--claim-min-idle-ms",
        type=int,
        default=3000,
        help="takeover delay of a dead worker's requests (%(default)s)",
    )
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds an agent waits for one reply (%(default)s)"
    )
    p.add_argument("--appendonly", action="store_true", help="private Redis with AOF (everysec)")
    p.add_argument("--skip-baseline", action="store_true", help="skip the run without a kill")


def _start_workers(
    args: argparse.Namespace, settings: BrokerSettings, tag: str, logs: str
) -> List[subprocess.Popen]:
    """Worker processes logging to LOGS/NAME.log (a pipe nobody reads could block them)."""
    procs = []
    for i in range(args.workers):
        cmd = argv(
            "worker",
            settings,
            "--backend",
            "synthetic",
            "--synthetic-latency-ms",
            str(args.latency_ms),
            "--kinds",
            args.kind,
            "--name",
            f"{tag}-w{i}",
            "--max-batch",
            str(args.max_batch),
            "--claim-min-idle-ms",
            str(args.claim_min_idle_ms),
            log_level="WARNING",
        )
        with open(os.path.join(logs, f"{tag}-w{i}.log"), "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _published(r, settings: BrokerSettings, kind: str) -> int:
    from broker.keys import Keys

    total = 0
    for stream in Keys(settings.prefix, settings.partitions).request_streams(kind):
        try:
            total += int(r.xinfo_stream(stream)["entries-added"])
        except Exception:  # not created yet
            pass
    return total


def _held(r, stream: str, group: str, consumer: str) -> int:
    for c in r.xinfo_consumers(stream, group):
        name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
        if name == consumer:
            return int(c["pending"])
    return 0


def _wait_for_workers(r, settings: BrokerSettings, names: List[str], procs: List[subprocess.Popen]) -> None:
    from broker.keys import Keys

    give_up = time.time() + 60
    while not all(r.exists(Keys(settings.prefix).worker(n)) for n in names):
        if time.time() > give_up or any(p.poll() is not None for p in procs):
            raise RuntimeError(
                "worker processes did not start (their logs: vlmq-reliability-* in the temp dir)"
            )
        time.sleep(0.05)


def _kill_midway(
    args, r, settings: BrokerSettings, agents, victim: subprocess.Popen, name: str
) -> Dict[str, int]:
    from broker.keys import Keys

    total = args.agents * args.requests
    while _published(r, settings, args.kind) < args.kill_at * total:
        if all(a.poll() is not None for a in agents):
            break
        time.sleep(0.02)
    at = _published(r, settings, args.kind)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    held = _held(r, Keys(settings.prefix).request_stream(args.kind, 0), settings.group, name)
    print(f"  SIGKILLed worker 0 after {at} of {total} requests were published; it held {held}", flush=True)
    return {"held": held, "at_published": at}


def _pass(args: argparse.Namespace, url: str, kill: bool) -> Dict[str, Any]:
    from broker.connection import connect_sync
    from broker.keys import Keys

    tag = f"rel{'k' if kill else 'b'}{os.getpid()}"
    settings = BrokerSettings(url=url, prefix=tag, claim_min_idle_ms=args.claim_min_idle_ms)
    keys = Keys(settings.prefix, settings.partitions)
    r = connect_sync(settings)
    names = [f"{tag}-w{i}" for i in range(args.workers)]
    logs = tempfile.mkdtemp(prefix="vlmq-reliability-")
    workers = _start_workers(args, settings, tag, logs)
    agents: List[subprocess.Popen] = []
    try:
        _wait_for_workers(r, settings, names, workers)
        per_proc = [
            args.agents // args.agent_procs + (i < args.agents % args.agent_procs)
            for i in range(args.agent_procs)
        ]
        for i, n in enumerate(per_proc):
            if n:
                cmd = agent_command(
                    settings,
                    f"{tag}-a{i}-",
                    n,
                    args.requests,
                    kind=args.kind,
                    image_side=args.image_side,
                    timeout=args.timeout,
                )
                agents.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True))
        killed = {"held": 0, "at_published": 0}
        if kill:
            killed = _kill_midway(args, r, settings, agents, workers[0], names[0])
        # A request waits at most --timeout; a session sends --requests of them in a row.
        give_up = time.time() + args.timeout * 2 + args.requests * 1.0
        summaries = []
        for a in agents:
            out, _ = a.communicate(timeout=max(1.0, give_up - time.time()))
            summaries.append(json.loads(out.strip().splitlines()[-1]))
        survivor: Dict[str, str] = {}
        for name, w in zip(names, workers):
            if w.poll() is None:
                survivor = {k.decode(): v.decode() for k, v in r.hgetall(keys.worker(name)).items()}
                w.send_signal(signal.SIGTERM)
                w.wait(60)
    finally:
        for p in agents + workers:
            if p.poll() is None:
                p.kill()
                p.wait()
    shutil.rmtree(logs, ignore_errors=True)  # kept only when the pass failed
    stream = keys.request_stream(args.kind, 0)
    result = merge(summaries)
    result.update(
        seconds=result.pop("finished_at") - result.pop("started_at"),
        left_in_stream=r.xlen(stream),
        left_pending=r.xpending(stream, settings.group)["pending"],
        killed=killed,
        survivor_reclaimed=int(survivor.get("reclaimed", 0)),
        survivor_fenced=int(survivor.get("fenced", 0)),
        redis_peak_mb=r.info("memory")["used_memory_peak"] / 2**20,
    )
    return result


def _describe(name: str, res: Dict[str, Any]) -> None:
    lat = sorted(res["latencies_ms"]) or [0.0]
    print(
        f"{name}: sent {res['sent']}, answered {res['answered']}, lost {len(res['lost'])}, "
        f"duplicates delivered {res['duplicates_delivered']}, duplicates in streams "
        f"{res['duplicates_in_streams']}, redelivered {res['redelivered']}, codes {res['codes']}, "
        f"{res['answered'] / res['seconds']:.0f} req/s, p50 {statistics.median(lat):.1f} ms, "
        f"max {lat[-1]:.0f} ms, left pending {res['left_pending']}",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    from broker.embedded import EmbeddedRedis
    from ops.bench.records import record, write_results

    server = None
    url = args.redis_url
    if not url:
        server = EmbeddedRedis(appendonly=args.appendonly).start()
        url = server.url
    try:
        base = None
        if not args.skip_baseline:
            base = _pass(args, url, kill=False)
            _describe("baseline (no kill)", base)
        res = _pass(args, url, kill=True)
        _describe(f"worker 0 SIGKILLed at {args.kill_at:.0%}", res)
    finally:
        if server is not None:
            server.close()
    lat = sorted(res["latencies_ms"]) or [0.0]
    rps = res["answered"] / res["seconds"]
    records = [
        record("lost_requests", len(res["lost"]), "requests"),
        record("duplicate_replies", res["duplicates_delivered"], "replies"),
        record("requests_answered", res["answered"], "requests"),
        record("requests_sent", res["sent"], "requests"),
        record("requests_not_accepted", res["not_accepted"], "requests"),
        record("misdelivered_replies", res["misdelivered"], "replies"),
        record("duplicate_replies_in_streams", res["duplicates_in_streams"], "replies"),
        record("requests_held_by_killed_worker", res["killed"]["held"], "requests"),
        record("requests_redelivered", res["redelivered"], "requests"),
        record("requests_reclaimed_by_survivor", res["survivor_reclaimed"], "requests"),
        record("fenced_results", res["survivor_fenced"], "results"),
        record("error_replies", res["answered"] - res["codes"].get("ok", 0), "replies"),
        record("left_pending", res["left_pending"], "requests"),
        record(
            "throughput",
            rps,
            "requests/s",
            baseline=base["answered"] / base["seconds"] if base else None,
        ),
        record("latency_p50", statistics.median(lat), "ms"),
        record("latency_p99", lat[min(len(lat) - 1, int(0.99 * len(lat)))], "ms"),
        record("latency_max", lat[-1], "ms"),
        record("redis_used_memory_peak", res["redis_peak_mb"], "MiB"),
    ]
    write_results(args.out, records)
    print(f"wrote {args.out}")
    ok = not res["lost"] and res["duplicates_delivered"] == 0 and res["answered"] == res["sent"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(agent_main())
