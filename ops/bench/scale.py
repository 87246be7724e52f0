"""Scaling: requests/s with 1, 2, 4 agent processes x 1 and 4 workers, synthetic no-op model.

Each agent process runs closed-loop sessions (send a request, wait for its reply, send the
next), like environments; the workers are real `vlmq worker` processes with the synthetic
backend at zero latency, so what is measured is vlmq itself: clients, Redis, workers. All
configurations run in one invocation on one Redis, each --repeats times interleaved; every
figure is the median of its runs (min and max in the record), and each rate is compared
with the one-process rate with the same workers in the same repeat.
`scaling_efficiency_4_procs` = rps(4 procs) / (4 x rps(1 proc)) with 4 workers, so that the
no-op workers have room to serve 4x the traffic; `scaling_efficiency_4_procs_1_worker` is
the same with one worker, whose CPU bounds it. Redis's CPU over each window is recorded
(`redis_cpu_*`, fraction of one core): one Redis thread serves every command. On a machine
with fewer cores than processes the agents, the workers and Redis share the cores, which
then is what this measures. A PNG plot goes beside the JSON. `--cluster-nodes 3` runs the
same on a private Redis Cluster instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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
from ops.bench.clients import ClientPool, summary, wait_until
from ops.bench.records import Record, record, write_results
from ops.bench.workers import synthetic_worker

log = logging.getLogger("vlmq.bench.scale")

HEADLINE_WORKERS = 4


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--procs", default="1,2,4", help="agent process counts (%(default)s)")
    p.add_argument("--workers", default="1,4", help="worker process counts (%(default)s)")
    p.add_argument(
        "--sessions-per-proc", type=int, default=1, help="closed-loop sessions per process (%(default)s)"
    )
    p.add_argument(
        "--duration", type=float, default=4.0, help="seconds measured per configuration (%(default)s)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements per configuration, interleaved; the median is reported (%(default)s)",
    )
    p.add_argument(
        "--kind",
        default="action_chunk",
        choices=["action_chunk", "text_action"],
        help="task kind (%(default)s)",
    )
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
    settings: BrokerSettings, sessions: List[str], kind: str, side: int, start: float, stop: float
) -> List[float]:
    from broker.connection import connect_async
    from env_agents.client import AsyncAgentClient

    frame = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    redis = connect_async(settings)
    clients = [await AsyncAgentClient(s, redis=redis, settings=settings).start() for s in sessions]
    try:
        return await _closed_loop(clients, kind, frame, start, stop)
    finally:
        for c in clients:
            await c.close()
        await redis.aclose()


async def _closed_loop(clients, kind: str, frame: np.ndarray, start: float, stop: float) -> List[float]:
    for c in clients:  # warm up connections and code paths
        for step in range(20):
            await c.request(_request(kind, step, frame), timeout=60)
    await asyncio.get_running_loop().run_in_executor(None, wait_until, start, True)
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
    return latencies


def agent_window(
    settings: BrokerSettings, sessions: List[str], kind: str, side: int, start: float, stop: float
) -> List[float]:
    """One agent process's closed-loop sessions between start and stop (ClientPool task)."""
    return eventloop.run(_agent(settings, sessions, kind, side, start, stop))


def _redis_cpu_s(settings: BrokerSettings) -> float:
    """CPU seconds the Redis server(s) have used (all primaries of a cluster)."""
    from broker.connection import connect_sync

    r = connect_sync(settings)
    try:
        if settings.cluster:
            infos = list(r.info("cpu", target_nodes=r.PRIMARIES).values())
        else:
            infos = [r.info("cpu")]
        return sum(float(i["used_cpu_sys"]) + float(i["used_cpu_user"]) for i in infos)
    finally:
        r.close()


def _measure(
    pool: ClientPool, settings: BrokerSettings, procs: int, args: argparse.Namespace
) -> Dict[str, float]:
    cpu: Dict[str, float] = {}

    def sample(start: float, stop: float) -> None:
        wait_until(start)
        cpu["start"] = _redis_cpu_s(settings)
        wait_until(stop)
        cpu["stop"] = _redis_cpu_s(settings)

    sessions = [[f"agent-{i}-{j}" for j in range(args.sessions_per_proc)] for i in range(procs)]
    per_proc = pool.window(
        agent_window,
        [(settings, s, args.kind, args.image_side) for s in sessions],
        args.duration,
        during=sample,
        key=f"{procs} processes",
    )
    out = summary([x for lat in per_proc for x in lat], args.duration)
    out["redis_cpu"] = (cpu["stop"] - cpu["start"]) / args.duration
    return out


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

Runs = Dict[Tuple[int, int], List[Dict[str, float]]]


def _median(runs: List[Dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _records(runs: Runs, loads: List[float]) -> List[Record]:
    # Other work on the machine takes cores from the agents, workers and Redis: say how much.
    out: List[Record] = [record("machine_load_average_1m", loads, "runnable tasks")]
    for (w, n), rs in sorted(runs.items()):
        base = [r["rps"] for r in runs.get((w, 1), [])] or None
        out.append(record(f"rps_{n}_procs_{w}_workers", [r["rps"] for r in rs], "req/s", base))
        out.append(record(f"p50_ms_{n}_procs_{w}_workers", [r["p50"] for r in rs], "ms"))
        out.append(record(f"redis_cpu_{n}_procs_{w}_workers", [r["redis_cpu"] for r in rs], "cores"))
    for w in sorted({w for w, _ in runs}):
        if (w, 1) in runs and (w, 4) in runs:
            # per repeat: the 1- and 4-process windows of one repeat ran back to back
            eff = [four["rps"] / (4 * one["rps"]) for one, four in zip(runs[(w, 1)], runs[(w, 4)])]
            name = f"scaling_efficiency_4_procs_{w}_worker" + ("s" if w > 1 else "")
            out.append(record(name, eff, "fraction of linear"))
            if w == HEADLINE_WORKERS:
                out.append(record("scaling_efficiency_4_procs", eff, "fraction of linear"))
    return out


def _plot(runs: Runs, procs: List[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for w in sorted({w for w, _ in runs}):
        xs = [n for n in procs if (w, n) in runs]
        ax.errorbar(
            xs,
            [_median(runs[(w, n)], "rps") for n in xs],
            yerr=[
                [_median(runs[(w, n)], "rps") - min(r["rps"] for r in runs[(w, n)]) for n in xs],
                [max(r["rps"] for r in runs[(w, n)]) - _median(runs[(w, n)], "rps") for n in xs],
            ],
            marker="o",
            capsize=3,
            label=f"{w} worker{'s' if w > 1 else ''}",
        )
    top_w = max(w for w, _ in runs)
    if (top_w, 1) in runs:
        one = _median(runs[(top_w, 1)], "rps")
        ax.plot(
            procs, [one * n for n in procs], linestyle="--", color="gray", label=f"linear ({top_w} workers)"
        )
    ax.set_xlabel("agent processes")
    ax.set_ylabel("requests / s (median, min-max)")
    ax.set_xticks(procs)
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    procs = [int(x) for x in args.procs.split(",")]
    worker_counts = [int(x) for x in args.workers.split(",")]
    runs: Runs = {}
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
        pool = stack.enter_context(
            ClientPool(max(procs), imports=["ops.bench.scale", "env_agents.client", "broker.connection"])
        )
        for w in worker_counts:
            settings = BrokerSettings(
                url=url, cluster=cluster, prefix=f"scale{os.getpid()}w{w}", partitions=args.partitions
            )
            workers = _start_workers(settings, w, args.kind)
            try:
                _wait_for_workers(settings, w)
                for _ in range(args.repeats):  # interleaved: a burst of outside load hits all alike
                    for n in procs:
                        runs.setdefault((w, n), []).append(_measure(pool, settings, n, args))
                        loads.append(os.getloadavg()[0])
            finally:
                _stop(workers)
            for n in procs:
                rs = runs[(w, n)]
                each = ", ".join(f"{r['rps']:.0f}" for r in rs)
                print(
                    f"{w} worker(s), {n} agent process(es) x {args.sessions_per_proc} session(s): "
                    f"{_median(rs, 'rps'):.0f} req/s (runs: {each}), "
                    f"p50 {_median(rs, 'p50'):.2f} ms, Redis CPU {_median(rs, 'redis_cpu'):.2f} cores",
                    flush=True,
                )
    records = _records(runs, loads)
    write_results(args.out, records)
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    where = f"{args.cluster_nodes}-node Redis Cluster" if args.cluster_nodes else "one redis-server"
    title = f"vlmq {args.kind}, synthetic no-op workers, {where}, load avg <= {max(loads):.1f}"
    _plot(runs, procs, plot, f"{title}\n{records[0].machine}")
    for r in records:
        if r.metric.startswith("scaling_efficiency"):
            print(f"{r.metric}: {r.value:.3f} (runs {r.runs}, {r.min:.3f}-{r.max:.3f})")
    print(f"wrote {args.out} and {plot}")
    return 0
