"""`vlmq demo`: an embedded Redis, one worker and N agent sessions, end to end, then a summary.

With no flags it runs on CPU with a tiny random-weight Qwen2-VL that it builds once (a real
model of the real architecture, so the answers are gibberish but every stage runs):
`text_action` with admissible commands, `structured_action` (MineRL dict) and `preference`
requests from several concurrent sessions, batched by the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from broker import eventloop
from broker.commands import Command
from broker.embedded import EmbeddedRedis
from broker.settings import BrokerSettings, flag
from ops.cli import argv
from schemas.messages import (
    ActionChunkRequest,
    PreferenceRequest,
    Request,
    StructuredActionRequest,
    TextActionRequest,
)

DEMO_KINDS = ("text_action", "structured_action", "preference", "action_chunk")
COMMANDS = ["go north", "go south", "open door", "take key", "look"]


def default_model_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vlmq", "demo-tiny-qwen2-vl")


def ensure_tiny_model(path: str) -> str:
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from inference_worker.models import make_model

    print(f"building a tiny random-weight Qwen2-VL checkpoint in {path} (once) ...", flush=True)
    return make_model("qwen2-vl", path, preset="tiny", seed=0)


def ensure_tiny_vla(vlm: str, path: str) -> str:
    """An untrained action expert (seeded, small) on the demo's VLM: chunks are noise-shaped,
    but the whole action_chunk path runs (feature cache, batched Euler sampling)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from inference_worker.vla.config import VLAConfig
    from inference_worker.vla.model import QwenVLA

    config = VLAConfig(
        vlm_path=os.path.abspath(vlm), image_size=64, expert_layers=2, expert_dim=64, expert_heads=4
    )
    QwenVLA.build(config, seed=0).save(path)
    return path


def scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A small synthetic observation: a floor, a wall and a coloured box."""
    img = np.zeros((size, size, 3), np.uint8)
    img[: size // 2] = (90, 120, 200)
    img[size // 2 :] = (70, 70, 70)
    x, y = rng.integers(0, size - size // 4, 2)
    img[y : y + size // 4, x : x + size // 4] = rng.integers(50, 255, 3, dtype=np.uint8)
    return img


def make_request(kind: str, rng: np.random.Generator, step: int, size: int) -> Request:
    frame = scene(rng, size)
    if kind == "text_action":
        return TextActionRequest(
            step=step,
            messages=[
                {"role": "system", "content": "You are an agent in a house. Choose the next command."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": frame},
                        {"type": "text", "text": "You see a door."},
                    ],
                },
            ],
            admissible_commands=COMMANDS,
        )
    if kind == "action_chunk":
        return ActionChunkRequest(step=step, image=frame, instruction="go to the box", reset=step == 0)
    if kind == "structured_action":
        return StructuredActionRequest(
            step=step, image=frame, task_name="MineRLBasaltFindCave-v0", max_tokens=24
        )
    return PreferenceRequest(
        step=step, image_a=frame, image_b=scene(rng, size), task="reach the box", max_tokens=12
    )


@dataclass
class Stats:
    latencies: Dict[str, List[float]] = field(default_factory=dict)
    batch_sizes: Dict[str, List[int]] = field(default_factory=dict)
    errors: Dict[str, int] = field(default_factory=dict)
    done: int = 0


async def agent(
    session: str, settings: BrokerSettings, kinds, n: int, size: int, seed: int, stats: Stats
) -> None:
    from env_agents.client import AsyncAgentClient

    rng = np.random.default_rng(seed)
    async with AsyncAgentClient(session, settings=settings, raise_on_error=False) as client:
        for step in range(n):
            kind = kinds[step % len(kinds)]
            t0 = time.perf_counter()
            reply = await client.request(make_request(kind, rng, step, size), timeout=600)
            stats.latencies.setdefault(kind, []).append((time.perf_counter() - t0) * 1000)
            if reply.ok:
                stats.batch_sizes.setdefault(kind, []).append(reply.batch_size)
            else:
                stats.errors[kind] = stats.errors.get(kind, 0) + 1
            stats.done += 1


async def run_agents(settings: BrokerSettings, args: argparse.Namespace, kinds) -> Stats:
    stats = Stats()
    total = args.agents * args.requests
    tasks = [
        asyncio.create_task(
            agent(f"demo-agent-{i}", settings, kinds, args.requests, args.image_size, i, stats)
        )
        for i in range(args.agents)
    ]
    t0 = time.time()
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.25)
        _progress(stats.done, total, time.time() - t0)
    _progress(stats.done, total, time.time() - t0)
    print()
    for t in tasks:
        t.result()  # surface an agent's exception
    stats.latencies["_wall"] = [time.time() - t0]
    return stats


def _progress(done: int, total: int, elapsed: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / elapsed if elapsed > 0 else 0.0
    print(
        f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests  {rate:.1f} req/s",
        end="",
        flush=True,
    )


def summary(stats: Stats) -> str:
    wall = stats.latencies.pop("_wall")[0]
    lines = [f"{'kind':<20}{'requests':>9}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}{'mean batch':>12}"]
    total = 0
    for kind, lat in sorted(stats.latencies.items()):
        lat = sorted(lat)
        total += len(lat)
        batches = stats.batch_sizes.get(kind) or [0]
        lines.append(
            f"{kind:<20}{len(lat):>9}{stats.errors.get(kind, 0):>8}{statistics.median(lat):>10.1f}"
            f"{lat[int(0.95 * (len(lat) - 1))]:>10.1f}{statistics.mean(batches):>12.2f}"
        )
    lines.append(f"{total} requests in {wall:.1f} s = {total / wall:.1f} req/s")
    return "\n".join(lines)


def start_worker(
    settings: BrokerSettings, args: argparse.Namespace, kinds, model: Optional[str], vla: Optional[str]
) -> subprocess.Popen:
    cmd = argv("worker", settings, "--kinds", ",".join(kinds), "--backend", args.backend, log_level="WARNING")
    cmd += [
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--name",
        "demo-worker",
    ]
    if model:
        cmd += ["--model", model, "--device", args.device]
    if vla:
        cmd += ["--option", f"vla={vla}"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_until_ready(settings: BrokerSettings, worker: subprocess.Popen, timeout: float = 600.0) -> None:
    """Wait for the worker's first heartbeat, so that start-up (model load) is not counted as latency."""
    from broker.connection import connect_sync
    from broker.keys import Keys

    r = connect_sync(settings)
    key = Keys(settings.prefix).worker("demo-worker")
    t0 = time.time()
    while not r.exists(key):
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode} before it was ready")
        if time.time() - t0 > timeout:
            raise SystemExit("the worker did not become ready")
        time.sleep(0.1)
    print(f"worker ready after {time.time() - t0:.1f} s", flush=True)
    r.close()


def run(args: argparse.Namespace) -> int:
    kinds = tuple(k for k in args.kinds.split(",") if k)
    model = vla = None
    if args.backend != "synthetic":
        model = args.model or ensure_tiny_model(default_model_dir())
        if "action_chunk" in kinds:
            if args.vla:
                vla = args.vla
            elif not args.model:
                vla = ensure_tiny_vla(model, default_model_dir() + "-vla")
            else:
                print("no --vla folder for your --model: leaving action_chunk out")
                kinds = tuple(k for k in kinds if k != "action_chunk")
    redis = None if args.redis_url else EmbeddedRedis().start()
    url = args.redis_url or redis.url
    settings = BrokerSettings.from_env(url=url, prefix=args.prefix)
    where = "an embedded redis-server" if redis else url
    print(f"vlmq demo: {args.agents} agents x {args.requests} requests ({', '.join(kinds)}) via {where}")
    worker = start_worker(settings, args, kinds, model, vla)
    try:
        wait_until_ready(settings, worker)
        stats = eventloop.run(run_agents(settings, args, kinds))
        print(summary(stats))
        failed = sum(stats.errors.values())
    finally:
        worker.terminate()
        code = worker.wait(60)
        if redis is not None:
            redis.close()
    print(f"worker exited with {code}; done.")
    return 1 if failed or code != 0 else 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=os.environ.get("VLMQ_REDIS_URL"),
        help="use this Redis instead of an embedded one [VLMQ_REDIS_URL]",
    )
    flag(p, "--prefix", var="PREFIX", default="vlmq-demo", help="key prefix")
    p.add_argument("--agents", type=int, default=8, help="concurrent agent sessions (%(default)s)")
    p.add_argument("--requests", type=int, default=12, help="requests per agent (%(default)s)")
    p.add_argument("--kinds", default=",".join(DEMO_KINDS), help="task kinds to exercise (%(default)s)")
    p.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "synthetic"],
        help="hf: the tiny Qwen2-VL; synthetic: no model (%(default)s)",
    )
    p.add_argument(
        "--model", default=None, help="a local Qwen-VL folder (default: build a tiny one in ~/.cache/vlmq)"
    )
    p.add_argument(
        "--vla", default=None, help="a VLA folder for action_chunk (default: an untrained tiny one)"
    )
    flag(p, "--device", var="DEVICE", default="cpu", help="cpu or cuda")
    p.add_argument("--max-batch", type=int, default=8, help="worker batch size (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="worker batching wait (%(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="observation side in pixels (%(default)s)")


COMMAND = Command(
    "demo",
    help="embedded Redis + a worker + N agents, end to end, on CPU with a tiny model",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    add_args=add_args,
    run=run,
)
