"""Transport round trip: vlmq vs a FastAPI + base64-PNG JSON server, same no-op handler.

Both serve `action_chunk` with the synthetic handler (no model), so the numbers are the
cost of the transport alone: 224x224x3 frames, 1 client and N concurrent clients, each
sending its next request as soon as its reply arrives. The baseline's clients are one
process each; vlmq's run several sessions per agent process on one event loop, the way
`vlmq agents` runs them. The
vlmq client sends raw uint8 frames through Redis; the baseline client PNG-encodes,
base64s and POSTs JSON like the seeds' MineRL policy server. The in-process call of the
same handler is measured too: vlmq's overhead is its round trip minus that call.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from broker import eventloop
from broker.embedded import EmbeddedRedis, free_port
from broker.settings import BrokerSettings
from ops.bench.records import record, write_results
from ops.bench.workers import synthetic_worker
from schemas.messages import ActionChunkRequest


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument(
        "--clients", type=int, default=16, help="concurrent clients of the second measurement (%(default)s)"
    )
    p.add_argument(
        "--sessions-per-process",
        type=int,
        default=4,
        help="vlmq clients per agent process, on one event loop as `vlmq agents` runs them; "
        "the baseline's clients are one process each (%(default)s)",
    )
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measurement (%(default)s)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="worker batching wait (%(default)s)")
    p.add_argument("--skip-baseline", action="store_true", help="measure vlmq only")


def _frame(size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _summary(lat_ms: List[float], seconds: float) -> Dict[str, float]:
    lat = sorted(lat_ms)
    return {
        "n": len(lat),
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "rps": len(lat) / seconds,
    }


# ----------------------------------------------------------------------------- clients


def _vlmq_client(
    url: str, prefix: str, sessions: List[str], size: int, start: float, stop: float, out
) -> None:
    """One agent process running `sessions` closed-loop sessions on one event loop, as
    `vlmq agents` does (one Redis connection pool per process)."""
    from broker.connection import connect_async
    from env_agents.client import AsyncAgentClient

    async def session(redis, settings: BrokerSettings, name: str) -> List[float]:
        frame = _frame(size)
        lat: List[float] = []
        async with AsyncAgentClient(name, redis=redis, settings=settings) as client:
            for _ in range(20):  # warm up connections and code paths
                await client.request(ActionChunkRequest(image=frame), timeout=30)
            while time.time() < start:
                await asyncio.sleep(0.001)
            step = 0
            while time.time() < stop:
                t0 = time.perf_counter()
                await client.request(ActionChunkRequest(image=frame, step=step), timeout=30)
                lat.append((time.perf_counter() - t0) * 1000.0)
                step += 1
        return lat

    async def main() -> List[float]:
        settings = BrokerSettings(url=url, prefix=prefix)
        redis = connect_async(settings)
        try:
            per_session = await asyncio.gather(*(session(redis, settings, s) for s in sessions))
        finally:
            await redis.aclose()
        return [x for lat in per_session for x in lat]

    out.put(eventloop.run(main()))


def _http_client(url: str, size: int, start: float, stop: float, out) -> None:
    import requests
    from PIL import Image

    frame = _frame(size)
    session = requests.Session()
    lat: List[float] = []

    def once(step: int) -> None:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        body = {
            "task_name": "bench",
            "image": {"data": base64.b64encode(buf.getvalue()).decode()},
            "step": step,
        }
        r = session.post(url, json=body, timeout=30)
        r.raise_for_status()
        r.json()

    for i in range(5):
        once(i)
    while time.time() < start:
        time.sleep(0.001)
    step = 0
    while time.time() < stop:
        t0 = time.perf_counter()
        once(step)
        lat.append((time.perf_counter() - t0) * 1000.0)
        step += 1
    out.put(lat)


def _run_clients(target, args_for, n: int, duration: float) -> Dict[str, float]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 3.0 + 0.2 * n  # time for every process to start and warm up
    stop = start + duration
    procs = [ctx.Process(target=target, args=(*args_for(i), start, stop, out)) for i in range(n)]
    for p in procs:
        p.start()
    lat: List[float] = []
    for _ in procs:
        lat += out.get(timeout=duration + 120)
    for p in procs:
        p.join(30)
    return _summary(lat, duration)


def _bare_worker(url: str, ready, stop) -> None:
    """The floor: a hand-written redis-py + msgpack echo loop with none of vlmq's layers."""
    import msgpack
    import redis.asyncio as aioredis

    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        await r.xgroup_create("bare:req", "g", id="0", mkstream=True)
        ready.set()
        while not stop.is_set():
            for _stream, entries in (
                await r.xreadgroup("g", "w", {"bare:req": ">"}, count=32, block=200) or []
            ):
                for entry_id, fields in entries:
                    m = msgpack.unpackb(fields[b"body"])
                    pipe = r.pipeline(transaction=True)
                    pipe.xadd(
                        "bare:reply:" + m["sid"],
                        {"body": msgpack.packb({"rid": m["rid"], "chunk": bytes(1400)})},
                    )
                    pipe.xack("bare:req", "g", entry_id)
                    pipe.xdel("bare:req", entry_id)
                    await pipe.execute()

    eventloop.run(main())


def _bare_client(url: str, size: int, start: float, stop: float, out) -> None:
    import msgpack
    import redis.asyncio as aioredis

    async def main() -> List[float]:
        frame = _frame(size).tobytes()
        r = aioredis.Redis.from_url(url)
        last, lat = "0-0", []
        i = 0
        while True:
            t0 = time.perf_counter()
            await r.xadd("bare:req", {"body": msgpack.packb({"rid": str(i), "sid": "c", "image": frame})})
            resp = await r.xread({"bare:reply:c": last}, block=5000)
            last = resp[0][1][-1][0]
            if time.time() >= stop:
                return lat
            if time.time() >= start:
                lat.append((time.perf_counter() - t0) * 1000.0)
            i += 1

    out.put(eventloop.run(main()))


def _measure_bare(url: str, args: argparse.Namespace) -> Dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_bare_worker, args=(url, ready, stop))
    worker.start()
    ready.wait(30)
    try:
        return _run_clients(_bare_client, lambda i: (url, args.size), 1, args.duration)
    finally:
        stop.set()
        worker.join(10)


# ----------------------------------------------------------------------------- servers


def _in_process_ms(size: int, n: int = 2000) -> float:
    from inference_worker.handlers.synthetic import SyntheticHandler

    handler = SyntheticHandler("action_chunk")
    req = ActionChunkRequest(session_id="inproc", image=_frame(size))
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        handler.run([req])
        lat.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(lat)


def _start_worker(url: str, prefix: str, max_wait_ms: float) -> subprocess.Popen:
    return synthetic_worker(BrokerSettings(url=url, prefix=prefix), "action_chunk", max_wait_ms=max_wait_ms)


def _measure_vlmq(url: str, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    prefix = f"bench{os.getpid()}"
    worker = _start_worker(url, prefix, args.max_wait_ms)
    try:
        one = _run_clients(_vlmq_client, lambda i: (url, prefix, ["c0"], args.size), 1, args.duration)
        per = args.sessions_per_process
        many = _run_clients(
            _vlmq_client,
            lambda i: (url, prefix, [f"c{i}-{j}" for j in range(per)], args.size),
            args.clients // per,
            args.duration,
        )
    finally:
        worker.terminate()
        worker.wait(30)
    return {"one": one, "many": many}


def _measure_http(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "ops.bench.http_baseline:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}/get_action"
    try:
        import requests

        for _ in range(200):
            try:
                requests.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        one = _run_clients(_http_client, lambda i: (url, args.size), 1, args.duration)
        many = _run_clients(_http_client, lambda i: (url, args.size), args.clients, args.duration)
    finally:
        server.terminate()
        server.wait(30)
    return {"one": one, "many": many}


def run(args: argparse.Namespace) -> int:
    inproc = _in_process_ms(args.size)
    redis: Optional[EmbeddedRedis] = None
    url = args.redis_url
    if url is None:
        redis = EmbeddedRedis().start()
        url = redis.url
    try:
        bare = _measure_bare(url, args)
        vlmq = _measure_vlmq(url, args)
    finally:
        if redis is not None:
            redis.close()
    http = None if args.skip_baseline else _measure_http(args)
    n = args.clients
    rows = [
        ("in-process handler call", {"p50": inproc}),
        ("bare redis-py echo, 1 client", bare),
        ("vlmq, 1 client", vlmq["one"]),
        (f"vlmq, {n} clients", vlmq["many"]),
    ]
    if http:
        rows += [("FastAPI+PNG, 1 client", http["one"]), (f"FastAPI+PNG, {n} clients", http["many"])]
    for name, s in rows:
        extra = f" p99={s['p99']:.3f} ms  {s['rps']:.0f} req/s  (n={s['n']})" if "rps" in s else ""
        print(f"{name:<28} p50={s['p50']:.3f} ms{extra}")
    overhead = vlmq["one"]["p50"] - inproc
    base = http or {"one": {}, "many": {}}
    records = [
        record(
            "overhead_p50_ms", overhead, "ms", base["one"].get("p50", None) and base["one"]["p50"] - inproc
        ),
        record("round_trip_p50_ms_1_client", vlmq["one"]["p50"], "ms", base["one"].get("p50")),
        record("round_trip_p99_ms_1_client", vlmq["one"]["p99"], "ms", base["one"].get("p99")),
        record("throughput_rps_1_client", vlmq["one"]["rps"], "req/s", base["one"].get("rps")),
        record(f"throughput_rps_{n}_clients", vlmq["many"]["rps"], "req/s", base["many"].get("rps")),
        record(f"round_trip_p50_ms_{n}_clients", vlmq["many"]["p50"], "ms", base["many"].get("p50")),
        record(f"round_trip_p99_ms_{n}_clients", vlmq["many"]["p99"], "ms", base["many"].get("p99")),
        record("in_process_call_p50_ms", inproc, "ms"),
        # Context, not a target: the same round trip with none of vlmq's layers.
        record("bare_redis_round_trip_p50_ms", bare["p50"], "ms"),
        record("overhead_over_bare_p50_ms", vlmq["one"]["p50"] - bare["p50"], "ms"),
    ]
    write_results(args.out, records)
    print(f"wrote {args.out}")
    return 0
