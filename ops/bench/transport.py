"""Transport round trip: vlmq vs the same raw bytes over HTTP (and PNG-in-JSON), same no-op handler.

Every server serves `action_chunk` with the synthetic handler (no model), so the numbers
are the cost of the transport alone: a 224x224x3 frame in, a 50x7 chunk out, 1 client and
N concurrent clients, each sending its next request as soon as its reply arrives. The
clients are laid out alike for all three: N/S processes of S sessions on one event loop
each (`vlmq agents` runs sessions this way), 1 process of 1 session for the 1-client
figures.

- vlmq: raw uint8 frames through one private redis-server to one `vlmq worker
  --max-wait-ms 0`.
- raw HTTP (the fair baseline, the `baseline` of the main records): one uvicorn process
  with a bare ASGI app; the POST body is the raw frame, the reply the raw float32 chunk,
  over keep-alive connections with a minimal asyncio HTTP/1.1 client.
- PNG JSON (a FastAPI policy server's style, records `*_vs_png_json`): one uvicorn process with FastAPI;
  the client PNG-encodes the frame, base64s it into JSON, and decodes a JSON chunk.

The frame is a rendered-looking scene (flat walls, a floor grid, boxes, shading), not
noise, so PNG costs what it costs on simulator frames. Also measured: the in-process call
of the handler (vlmq's overhead is its round trip minus that call) and a bare redis-py +
msgpack echo loop with none of vlmq's layers, the floor. Every configuration runs
--rounds times, interleaved, and each record is the median of its rounds with min/max.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from broker import eventloop
from broker.embedded import EmbeddedRedis, free_port
from broker.settings import BrokerSettings
from ops.bench.clients import ClientPool, summary, wait_until
from ops.bench.records import Record, record, write_results
from ops.bench.workers import synthetic_worker
from schemas.messages import ActionChunkRequest

WARMUP = 5  # requests per session before the window opens: connections made, code paths run


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument(
        "--clients", type=int, default=16, help="concurrent clients of the second measurement (%(default)s)"
    )
    p.add_argument(
        "--sessions-per-process",
        type=int,
        default=4,
        help="clients per client process, on one event loop, for vlmq and both HTTP baselines (%(default)s)",
    )
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measurement (%(default)s)")
    p.add_argument(
        "--rounds", type=int, default=3, help="measurements of every configuration, interleaved (%(default)s)"
    )
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="worker batching wait (%(default)s)")
    p.add_argument("--skip-baseline", action="store_true", help="measure vlmq only")


def scene(size: int) -> np.ndarray:
    """A frame like a simple simulator's render: sky and floor gradients, a floor grid, two
    walls, two boxes and surface texture, deterministic."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    horizon = y < 0.45
    img[..., 0] = np.where(horizon, 110 + 60 * y, 70 + 50 * y)
    img[..., 1] = np.where(horizon, 140 + 60 * y, 70 + 50 * y)
    img[..., 2] = np.where(horizon, 200 + 40 * y, 75 + 50 * y)
    grid = ~horizon & ((np.floor(x * 12) + np.floor(y * 12)) % 2 == 0)
    img[grid] *= 0.85
    wall = (y > 0.2) & (y < 0.5) & ((x < 0.15) | (x > 0.85))
    img[wall] = (150, 120, 90)
    for x0, y0, w, color in ((0.3, 0.55, 0.18, (200, 40, 40)), (0.62, 0.5, 0.1, (40, 160, 60))):
        box = (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + w)
        img[box] = np.asarray(color, np.float32) * (1.1 - 0.3 * (y[box] - y0) / w)[:, None]
    # Surface texture of +-5 grey levels: this frame's PNG is ~50 KB at 224 px, as a
    # MiniWorld-OneRoom frame's is (54 KB); without it a PNG of flat colours is ~2 KB.
    img += np.random.default_rng(0).integers(-5, 6, (size, size, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- clients


def vlmq_window(url: str, prefix: str, names: List[str], size: int, start: float, stop: float) -> List[float]:
    """One agent process: `names` sessions on one event loop and one connection pool."""
    from broker.connection import connect_async
    from env_agents.client import AsyncAgentClient

    frame = scene(size)
    settings = BrokerSettings(url=url, prefix=prefix)
    names = [f"{n}-{os.getpid()}-{start:.0f}" for n in names]  # fresh reply streams every window

    async def setup():
        redis = connect_async(settings)
        return redis, [await AsyncAgentClient(n, redis=redis, settings=settings).start() for n in names]

    async def once(client, step: int) -> None:
        await client.request(ActionChunkRequest(image=frame, step=step), timeout=30)

    async def teardown(redis, clients) -> None:
        for c in clients:
            await c.close()
        await redis.aclose()

    return _on_loop(setup, once, teardown, start, stop)


class HTTPConnection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: the least a client can spend
    per request, so the baselines are not charged for a client library."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> HTTPConnection:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, path: str, body: bytes, content_type: str, headers: str = "") -> Tuple[bytes, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{headers}\r\n"
        )
        self.writer.writelines([head.encode(), body])
        await self.writer.drain()
        reply_head = await self.reader.readuntil(b"\r\n\r\n")
        if reply_head[9:12] != b"200":
            raise RuntimeError(f"HTTP {reply_head[9:12].decode()}")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", reply_head)
        if length is None:
            raise RuntimeError("the baseline server did not send Content-Length")
        return reply_head, await self.reader.readexactly(int(length.group(1)))

    def close(self) -> None:
        self.writer.close()


def http_window(port: int, style: str, sessions: int, size: int, start: float, stop: float) -> List[float]:
    """One client process of the HTTP baselines: `sessions` connections on one event loop.
    style "raw": the frame's bytes in, the chunk's bytes out; "png": base64 PNG in JSON."""
    from PIL import Image

    frame = scene(size)
    shape = ",".join(map(str, frame.shape))

    async def setup():
        return None, [await HTTPConnection.open("127.0.0.1", port) for _ in range(sessions)]

    async def once_raw(conn: HTTPConnection, step: int) -> np.ndarray:
        head, body = await conn.post(
            "/", frame.tobytes(), "application/octet-stream", f"X-Shape: {shape}\r\nX-Step: {step}\r\n"
        )
        dims = re.search(rb"(?i)\r\nx-shape: *([\d,]+)", head).group(1)
        return np.frombuffer(body, np.float32).reshape(tuple(int(d) for d in dims.split(b",")))

    async def once_png(conn: HTTPConnection, step: int) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        request = {
            "task_name": "bench",
            "image": {"data": base64.b64encode(buf.getvalue()).decode()},
            "step": step,
        }
        _, body = await conn.post("/get_action", json.dumps(request).encode(), "application/json")
        return np.asarray(json.loads(body)["chunk"], np.float32)

    async def teardown(_, conns) -> None:
        for c in conns:
            c.close()

    return _on_loop(setup, once_raw if style == "raw" else once_png, teardown, start, stop)


def _on_loop(setup, once, teardown, start: float, stop: float) -> List[float]:
    async def main() -> List[float]:
        handle, sessions = await setup()
        try:
            return await _timed(sessions, once, start, stop)
        finally:
            await teardown(handle, sessions)

    return eventloop.run(main())


async def _timed(sessions: Sequence[Any], once, start: float, stop: float) -> List[float]:
    for step in range(WARMUP):  # warm up connections and code paths before the window
        await asyncio.gather(*(once(s, step) for s in sessions))
    await asyncio.get_running_loop().run_in_executor(None, wait_until, start, True)

    async def loop(session: Any) -> List[float]:
        lat: List[float] = []
        step = WARMUP
        while True:
            t0 = time.time()
            if t0 >= stop:
                return lat
            await once(session, step)
            t1 = time.time()
            if t1 <= stop:
                lat.append((t1 - t0) * 1000.0)
            step += 1

    per = await asyncio.gather(*(loop(s) for s in sessions))
    return [x for lat in per for x in lat]


def bare_window(url: str, size: int, start: float, stop: float) -> List[float]:
    """The floor: XADD a raw frame with msgpack, XREAD the reply; no vlmq layer."""
    import msgpack
    import redis.asyncio as aioredis

    async def main() -> List[float]:
        frame = scene(size).tobytes()
        r = aioredis.Redis.from_url(url)
        last = "$"
        state = {"i": 0}

        async def once(_: Any, step: int) -> None:
            nonlocal last
            state["i"] += 1
            await r.xadd(
                "bare:req", {"body": msgpack.packb({"rid": str(state["i"]), "sid": "c", "image": frame})}
            )
            resp = await r.xread({"bare:reply:c": last}, block=5000)
            last = resp[0][1][-1][0]

        try:
            last = (await r.xrevrange("bare:reply:c", count=1) or [("0-0", None)])[0][0]
            return await _timed([None], once, start, stop)
        finally:
            await r.aclose()

    return eventloop.run(main())


def _bare_worker(url: str, ready, stop) -> None:
    """A hand-written redis-py + msgpack echo loop with none of vlmq's layers."""
    import msgpack
    import redis.asyncio as aioredis

    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        await r.xgroup_create("bare:req", "g", id="$", mkstream=True)
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
                        maxlen=1000,
                    )
                    pipe.xack("bare:req", "g", entry_id)
                    pipe.xdel("bare:req", entry_id)
                    await pipe.execute()
        await r.aclose()

    eventloop.run(main())


# ----------------------------------------------------------------------------- servers


def _in_process_ms(size: int, n: int = 2000) -> float:
    from inference_worker.handlers.synthetic import SyntheticHandler

    handler = SyntheticHandler("action_chunk")
    req = ActionChunkRequest(session_id="inproc", image=scene(size))
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        handler.run([req])
        lat.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(lat)


def _uvicorn(app: str) -> Tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", f"ops.bench.http_baseline:{app}", "--port", str(port)]
    # Keep-alive connections may idle while a window's lead grows (clients.py): keep them.
    server = subprocess.Popen(
        [*cmd, "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "300"]
    )
    give_up = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            if server.poll() is not None or time.time() > give_up:
                raise RuntimeError(f"uvicorn {app} did not start") from None
            time.sleep(0.1)


def _layout(args: argparse.Namespace) -> Tuple[int, int]:
    per = max(1, min(args.sessions_per_process, args.clients))
    if args.clients % per:
        raise SystemExit(f"--clients {args.clients} is not a multiple of --sessions-per-process {per}")
    return args.clients // per, per


# ----------------------------------------------------------------------------- run


Config = Tuple[str, Callable[..., List[float]], List[tuple]]


def _configs(url: str, prefix: str, ports: Dict[str, int], args: argparse.Namespace) -> List[Config]:
    procs, per = _layout(args)
    size = args.size
    configs: List[Config] = [
        ("bare_1", bare_window, [(url, size)]),
        ("vlmq_1", vlmq_window, [(url, prefix, ["one"], size)]),
        (
            "vlmq_n",
            vlmq_window,
            [(url, prefix, [f"c{i}-{j}" for j in range(per)], size) for i in range(procs)],
        ),
    ]
    for style, port in ports.items():
        configs += [
            (f"{style}_1", http_window, [(port, style, 1, size)]),
            (f"{style}_n", http_window, [(port, style, per, size)] * procs),
        ]
    return configs


def _records(results: Dict[str, List[Dict[str, float]]], inproc: List[float], n: int) -> List[Record]:
    def runs(name: str, key: str) -> Optional[List[float]]:
        return [r[key] for r in results[name]] if name in results else None

    call = statistics.median(inproc)
    vlmq1, bare1, raw1 = runs("vlmq_1", "p50"), runs("bare_1", "p50"), runs("raw_1", "p50")
    recs = [
        record("overhead_p50_ms", [v - call for v in vlmq1], "ms", raw1 and [b - call for b in raw1]),
        record("round_trip_p50_ms_1_client", vlmq1, "ms", raw1),
        record("round_trip_p99_ms_1_client", runs("vlmq_1", "p99"), "ms", runs("raw_1", "p99")),
        record("throughput_rps_1_client", runs("vlmq_1", "rps"), "req/s", runs("raw_1", "rps")),
        record(f"throughput_rps_{n}_clients", runs("vlmq_n", "rps"), "req/s", runs("raw_n", "rps")),
        record(f"round_trip_p50_ms_{n}_clients", runs("vlmq_n", "p50"), "ms", runs("raw_n", "p50")),
        record(f"round_trip_p99_ms_{n}_clients", runs("vlmq_n", "p99"), "ms", runs("raw_n", "p99")),
    ]
    if "png_1" in results:
        recs += [
            record("round_trip_p50_ms_1_client_vs_png_json", vlmq1, "ms", runs("png_1", "p50")),
            record(
                f"throughput_rps_{n}_clients_vs_png_json",
                runs("vlmq_n", "rps"),
                "req/s",
                runs("png_n", "rps"),
            ),
        ]
    recs += [
        record("in_process_call_p50_ms", inproc, "ms"),
        # Context, not a target: the same round trip with none of vlmq's layers.
        record("bare_redis_round_trip_p50_ms", bare1, "ms"),
        record("overhead_over_bare_p50_ms", [v - b for v, b in zip(vlmq1, bare1)], "ms"),
    ]
    return recs


def run(args: argparse.Namespace) -> int:
    procs, _ = _layout(args)
    inproc = [_in_process_ms(args.size) for _ in range(args.rounds)]
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(scene(args.size)).save(png, format="PNG")
    print(
        f"frame {args.size}x{args.size}x3: {scene(args.size).nbytes / 1e3:.0f} KB raw, {len(png.getvalue()) / 1e3:.0f} KB PNG"
    )
    redis: Optional[EmbeddedRedis] = None
    url = args.redis_url
    if url is None:
        redis = EmbeddedRedis().start()
        url = redis.url
    prefix = f"bench{os.getpid()}"
    ctx = mp.get_context("spawn")
    bare_ready, bare_stop = ctx.Event(), ctx.Event()
    bare = ctx.Process(target=_bare_worker, args=(url, bare_ready, bare_stop))
    servers: List[subprocess.Popen] = []
    results: Dict[str, List[Dict[str, float]]] = {}
    try:
        bare.start()
        worker = synthetic_worker(
            BrokerSettings(url=url, prefix=prefix), "action_chunk", max_wait_ms=args.max_wait_ms
        )
        servers.append(worker)
        ports: Dict[str, int] = {}
        if not args.skip_baseline:
            for style in ("raw", "png"):
                server, ports[style] = _uvicorn(f"{style}_app")
                servers.append(server)
        bare_ready.wait(60)
        configs = _configs(url, prefix, ports, args)
        with ClientPool(procs, imports=["ops.bench.transport", "env_agents.client", "PIL.Image"]) as pool:
            for r in range(args.rounds):
                for name, fn, per_proc in configs if r % 2 == 0 else configs[::-1]:
                    lat = [x for part in pool.window(fn, per_proc, args.duration, key=name) for x in part]
                    results.setdefault(name, []).append(summary(lat, args.duration))
                    s = results[name][-1]
                    print(
                        f"round {r} {name:<7} p50 {s['p50']:7.3f} ms  p99 {s['p99']:7.3f} ms  {s['rps']:7.0f} req/s",
                        flush=True,
                    )
    finally:
        bare_stop.set()
        bare.join(10)
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)
        if redis is not None:
            redis.close()
    records = _records(results, inproc, args.clients)
    write_results(args.out, records)
    for r in records:
        base = f"  baseline {r.baseline}  ratio {r.ratio}" if r.baseline is not None else ""
        print(f"{r.metric:<42} {r.value:>10} {r.unit:<6} ({r.min}-{r.max}){base}")
    print(f"wrote {args.out}")
    return 0
