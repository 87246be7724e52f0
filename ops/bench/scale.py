"""Scaling: requests/s with 1, 2, 4 agent processes x 1, 2 workers, synthetic no-op model.

Each agent process runs closed-loop sessions (send a request, wait for its reply, send the
next), like environments; the workers are real `vlmq worker` processes with the synthetic
backend at zero latency, so what is measured is vlmq itself: clients, Redis, workers. All
configurations run in one invocation on one Redis, each --repeats times interleaved (the
median run counts), and each rate is reported as a ratio to the single-process rate with
the same number of workers measured in the same run.
`scaling_efficiency_4_procs` = rps(4 procs) / (4 x rps(1 proc)), with 1 worker (and its
`_2_workers` twin). On a machine with fewer cores than processes the agents, the workers
and Redis share the cores, which is part of what this measures. A PNG plot goes beside
the JSON. `--cluster-nodes 3` runs the same on a private Redis Cluster instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import time
from contextlib import ExitStack
from typing import Dict, List, Tuple

import numpy as np

from broker import eventloop
from broker.embedded import EmbeddedRedis
from broker.embedded_cluster import EmbeddedCluster
from broker.settings import BrokerSettings
from ops.bench.records import Record, record, write_results
from ops.bench.workers import synthetic_worker

log = logging.getLogger("vlmq.bench.scale")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procs", default="1,2,4", help="agent process counts (%(default)s)")
    p.add_argument("--workers", default="1,2", help="worker process counts (%(default)s)")
    p.add_argument(
        "--sessions-per-proc", type=int, default=1, help="closed-loop sessions per process (%(default)s)"
    )
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds measured per configuration (%(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements per configuration, interleaved; the median is reported (%(default)s)",
    )
    p.add_argument("--kind", default="action_chunk", choices=["action_chunk", "text_action"])
    p.add_argument(
        "--image-side", type=int, default=64, help="action_chunk frame side, raw uint8 (%(default)s)"
    )
    p.add_argument("--partitions", type=int, default=4, help="request stream partitions (%(default)s)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument(
        "--cluster-nodes",
        type=int,
        default=0,
        help="run on a private Redis Cluster of this many masters (>= 3); 0: one private redis-server",
    )
    p.add_argument("--plot", default=None, help="PNG plot path (default: the results file with .png)")


# ----------------------------------------------------------------------------- agent processes


def _request(kind: str, step: int, frame: np.ndarray):
    from schemas.messages import ActionChunkRequest, TextActionRequest

    if kind == "action_chunk":
        return ActionChunkRequest(step=step, image=frame, instruction="reach the goal")
    return TextActionRequest(step=step, messages=[{"role": "user", "content": f"observation {step}"}])


async def _agent(
    settings: BrokerSettings, sessions: List[str], kind: str, side: int, ready, go, window, out
) -> None:
    from broker.connection import connect_async
    from env_agents.client import AsyncAgentClient

    frame = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    redis = connect_async(settings)
    clients = [await AsyncAgentClient(s, redis=redis, settings=settings).start() for s in sessions]
    for c in clients:  # warm up connections and code paths
        for step in range(20):
            await c.request(_request(kind, step, frame), timeout=60)
    ready.put(os.getpid())
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    start, stop = window[0], window[1]
    while time.time() < start:
        await asyncio.sleep(0.0005)
    latencies: List[float] = []

    async def loop(c) -> None:
        step = 20
        while True:
            t0 = time.time()
            if t0 >= stop:
                return
            await c.request(_request(kind, step, frame), timeout=60)
            t1 = time.time()
            if t1 <= stop:
                latencies.append((t1 - t0) * 1000.0)
            step += 1

    await asyncio.gather(*(loop(c) for c in clients))
    for c in clients:
        await c.close()
    await redis.aclose()
    out.put(latencies)


def _agent_main(
    settings: BrokerSettings, sessions: List[str], kind: str, side: int, ready, go, window, out
) -> None:
    eventloop.run(_agent(settings, sessions, kind, side, ready, go, window, out))


def _measure(settings: BrokerSettings, procs: int, args: argparse.Namespace) -> Dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    window = ctx.Array("d", 2)
    workers = [
        ctx.Process(
            target=_agent_main,
            args=(
                settings,
                [f"agent-{i}-{j}" for j in range(args.sessions_per_proc)],
                args.kind,
                args.image_side,
                ready,
                go,
                window,
                out,
            ),
        )
        for i in range(procs)
    ]
    for p in workers:
        p.start()
    for _ in workers:  # every process imported, connected and warmed up: start together
        ready.get(timeout=300)
    window[0] = time.time() + 0.3
    window[1] = window[0] + args.duration
    go.set()
    latencies: List[float] = []
    for _ in workers:
        latencies += out.get(timeout=args.duration + 300)
    for p in workers:
        p.join(60)
    latencies.sort()
    return {
        "rps": len(latencies) / args.duration,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def _median(runs: List[Dict[str, float]]) -> Dict[str, float]:
    """The run of median throughput (its latencies come with it)."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


# ----------------------------------------------------------------------------- workers


def _start_workers(settings: BrokerSettings, n: int, kind: str) -> List[subprocess.Popen]:
    return [synthetic_worker(settings, kind, "--name", f"{settings.prefix}-w{i}") for i in range(n)]


def _wait_for_workers(settings: BrokerSettings, n: int, timeout: float = 300.0) -> None:
    from broker.connection import connect_sync
    from broker.keys import Keys

    r = connect_sync(settings)
    pattern = Keys(settings.prefix, settings.partitions).workers_pattern()
    give_up = time.time() + timeout
    try:
        while len(list(r.scan_iter(match=pattern))) < n:
            if time.time() > give_up:
                raise RuntimeError(f"{n} workers did not start within {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        r.close()


def _stop(procs: List[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


# ----------------------------------------------------------------------------- results


def _records(results: Dict[Tuple[int, int], Dict[str, float]], procs: List[int], load: float) -> List[Record]:
    # Other work on the machine takes cores from the agents, workers and Redis: say how much.
    out: List[Record] = [record("machine_load_average_1m_max", load, "runnable tasks")]
    for (w, n), res in sorted(results.items()):
        base = results.get((w, 1), {}).get("rps")
        out.append(record(f"rps_{n}_procs_{w}_workers", res["rps"], "req/s", base))
        out.append(record(f"p50_ms_{n}_procs_{w}_workers", res["p50_ms"], "ms"))
    for w in sorted({w for w, _ in results}):
        if (w, 1) in results and (w, 4) in results:
            eff = results[(w, 4)]["rps"] / (4 * results[(w, 1)]["rps"])
            name = "scaling_efficiency_4_procs" + ("" if w == 1 else f"_{w}_workers")
            out.append(record(name, eff, "fraction of linear"))
    return out


def _plot(results: Dict[Tuple[int, int], Dict[str, float]], procs: List[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for w in sorted({w for w, _ in results}):
        xs = [n for n in procs if (w, n) in results]
        ax.plot(
            xs, [results[(w, n)]["rps"] for n in xs], marker="o", label=f"{w} worker{'s' if w > 1 else ''}"
        )
    first_w = min(w for w, _ in results)
    if (first_w, 1) in results:
        one = results[(first_w, 1)]["rps"]
        ax.plot(procs, [one * n for n in procs], linestyle="--", color="gray", label="linear from 1 process")
    ax.set_xlabel("agent processes")
    ax.set_ylabel("requests / s")
    ax.set_xticks(procs)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    procs = [int(x) for x in args.procs.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]
    results: Dict[Tuple[int, int], Dict[str, float]] = {}
    loads = [os.getloadavg()[0]]
    with ExitStack() as stack:
        if args.redis_url:
            url, cluster = args.redis_url, False
        elif args.cluster_nodes:
            url, cluster = (
                stack.enter_context(EmbeddedCluster(args.cluster_nodes, appendonly=False)).url,
                True,
            )
        else:
            url, cluster = stack.enter_context(EmbeddedRedis()).url, False
        for w in worker_counts:
            settings = BrokerSettings(
                url=url, cluster=cluster, prefix=f"scale{os.getpid()}w{w}", partitions=args.partitions
            )
            workers = _start_workers(settings, w, args.kind)
            try:
                _wait_for_workers(settings, w)
                runs: Dict[int, List[Dict[str, float]]] = {n: [] for n in procs}
                for _ in range(args.repeats):  # interleaved: a burst of outside load hits all alike
                    for n in procs:
                        runs[n].append(_measure(settings, n, args))
                        loads.append(os.getloadavg()[0])
                for n in procs:
                    res = results[(w, n)] = _median(runs[n])
                    each = ", ".join(f"{r['rps']:.0f}" for r in runs[n])
                    print(
                        f"{w} worker(s), {n} agent process(es) x {args.sessions_per_proc} session(s): "
                        f"{res['rps']:.0f} req/s (runs: {each}), p50 {res['p50_ms']:.2f} ms, "
                        f"p99 {res['p99_ms']:.2f} ms",
                        flush=True,
                    )
            finally:
                _stop(workers)
    records = _records(results, procs, max(loads))
    write_results(args.out, records)
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    where = f"{args.cluster_nodes}-node Redis Cluster" if args.cluster_nodes else "one redis-server"
    title = f"vlmq {args.kind}, synthetic no-op worker, {where}, load avg <= {max(loads):.1f}"
    _plot(results, procs, plot, f"{title}\n{records[0].machine}")
    for r in records:
        if r.metric.startswith("scaling_efficiency"):
            print(f"{r.metric}: {r.value:.3f}")
    print(f"wrote {args.out} and {plot}")
    return 0
