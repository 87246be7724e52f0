"""Agents: starvation at a fixed control rate, synchronous vs fixed g vs adaptive g, alone or beside a chat load.

N sessions step an env (MiniWorld-OneRoom-v0 by default; Frames-v0 where no simulator
renders) at --rate-hz and ask for action chunks. Each mode runs --runs times for
--seconds (modes interleaved, after one unrecorded warm-up run); each record holds the
median of the runs with their min and max:

  sync      g = 0: ask when the queue is empty and stand still for the round trip (the baseline)
  fixed     ask when the queue holds <= g x chunk actions (--threshold, 0.5)
  adaptive  g from the p90 of each session's recent round trips (--g-min, --g-max, --g-margin)

Metrics, for N sessions at R Hz: starvation_fraction_<R>hz_<N>_sessions (ticks with an
action due and the queue empty, after each episode's first chunk), chunk_latency_p50/p90/
p99_ms_..., env_steps_per_s_per_session_..., overrun_fraction_... (ticks the agent
processes ran late: the env side was CPU-bound) and requests_per_env_step_... (what asking
early costs). The mode is part of the name: none for fixed g = 0.5 (`_g<g>` for another
g), `_adaptive`, `_sync`; fixed and adaptive have sync as their baseline, except
requests_per_env_step_..._adaptive, whose baseline is fixed g: its ratio is the extra
requests adaptive g costs. Further parts of the name say what else differs, so that one
name has one meaning in a results file: the env unless MiniWorld-OneRoom-v0 (`_frames`),
`_synthetic_<ms>ms` for the synthetic worker, --tag as given (e.g. where the env renders),
`_mixed` when --chat-sessions closed-loop
text_action sessions (free text, one frame, a ~--chat-prompt-tokens prompt, decoding
exactly --chat-max-tokens: start the worker with `--option ignore_eos=1`) share the
worker (`_mixed_<S>x<T>` unless 16 x 256); chat_rps_... is their requests/s while the
control sessions ran.

--worker synthetic (default, CPU): a private redis-server and a `vlmq worker --backend
synthetic` whose every batch takes --latency-ms. --worker external: --redis-url's workers
(the VLA worker on the GPU machine; ops/bench/gpu_agents.sh starts one and runs this).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import queue as queue_mod
import statistics
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from broker.settings import BrokerSettings
from ops.bench.records import Record, machine_description, record, write_results
from ops.bench.workers import stop_worker, synthetic_worker

MODES = ("sync", "fixed", "adaptive")
DEFAULT_CHAT = (16, 256)  # the chat load `_mixed` names without a size
Done = Tuple[float, float, bool]  # (finished at, seconds, ok) of one chat request


def add_args(p) -> None:
    p.add_argument(
        "--worker",
        choices=["synthetic", "external"],
        default="synthetic",
        help="synthetic: own Redis + fixed-latency synthetic worker; external: --redis-url's workers",
    )
    p.add_argument("--redis-url", default="", help="Redis of the external workers (--worker external)")
    p.add_argument("--prefix", default="vlmq", help="key prefix of the external workers (%(default)s)")
    p.add_argument(
        "--partitions", type=int, default=1, help="partitions of the external workers (%(default)s)"
    )
    p.add_argument("--latency-ms", type=float, default=100.0, help="synthetic batch latency (%(default)s)")
    p.add_argument("--chunk", type=int, default=50, help="synthetic chunk rows (%(default)s)")
    p.add_argument("--sessions", default="64", help="agent session counts, comma-separated (%(default)s)")
    p.add_argument("--procs", type=int, default=2, help="agent processes (%(default)s)")
    p.add_argument("--rate-hz", type=float, default=30.0, help="control rate (%(default)s)")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, of {', '.join(MODES)} (%(default)s)",
    )
    p.add_argument("--threshold", type=float, default=0.5, help="g of the fixed mode (%(default)s)")
    p.add_argument("--g-min", type=float, default=None, help="adaptive g: lowest (the agents' default)")
    p.add_argument("--g-max", type=float, default=None, help="adaptive g: highest (the agents' default)")
    p.add_argument("--g-margin", type=float, default=None, help="adaptive g: factor on the p90 latency")
    p.add_argument(
        "--runs", type=int, default=3, help="runs per mode; records hold their median (%(default)s)"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="control time per run (%(default)s)")
    p.add_argument(
        "--warmup-s", type=float, default=5.0, help="an unrecorded fixed-g run first, 0 = none (%(default)s)"
    )
    p.add_argument("--env", default="MiniWorld-OneRoom-v0", help="env id (%(default)s)")
    p.add_argument(
        "--size",
        type=int,
        default=32,
        help="frame side; small on CPU so 64 envs can render at 30 Hz on 2 cores (%(default)s)",
    )
    p.add_argument(
        "--chat-sessions", type=int, default=0, help="closed-loop chat sessions beside (%(default)s)"
    )
    p.add_argument(
        "--chat-max-tokens", type=int, default=256, help="new tokens per chat request (%(default)s)"
    )
    p.add_argument("--chat-procs", type=int, default=2, help="processes of the chat sessions (%(default)s)")
    p.add_argument(
        "--chat-prompt-tokens", type=int, default=100, help="text tokens of a chat prompt (%(default)s)"
    )
    p.add_argument(
        "--chat-tokenizer",
        default="",
        help="checkpoint whose tokenizer sizes the chat prompt; empty: one word per token",
    )
    p.add_argument("--chat-image-size", type=int, default=224, help="chat frame side (%(default)s)")
    p.add_argument("--label", default="", help="what serves the requests, for the records (external)")
    p.add_argument(
        "--render",
        default="auto",
        choices=("auto", "cpu"),
        help="MiniWorld: where it renders; cpu is Mesa's llvmpipe, off the GPU (%(default)s)",
    )
    p.add_argument(
        "--tag",
        default="",
        help="appended to every metric name after the env's part, for a setup the name must tell apart "
        "(e.g. _gl_on_gpu: MiniWorld rendered on the serving GPU)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="write only this run's records; by default the records of other metrics already in --out "
        "stay (a CPU run does not erase the GPU's) and those of the same metric are replaced",
    )


# ---------------------------------------------------------------------------- names


def _env_tag(env_id: str) -> str:
    if env_id == "MiniWorld-OneRoom-v0":
        return ""
    if env_id == "Frames-v0":
        return "_frames"
    return "_" + "".join(c if c.isalnum() else "_" for c in env_id.lower()).strip("_")


def _mode_tag(mode: str, g: float) -> str:
    if mode == "fixed":
        return "" if g == 0.5 else "_g" + f"{g:g}".replace(".", "p")
    return f"_{mode}"


def metric_name(family: str, args, n: int, mode: str) -> str:
    """<family>_<R>hz_<N>_sessions[_env][tag][_synthetic_<ms>ms][_mixed[_SxT]][_mode]."""
    name = f"{family}_{args.rate_hz:g}hz_{n}_sessions{_env_tag(args.env)}{args.tag}"
    if args.worker == "synthetic":
        name += f"_synthetic_{args.latency_ms:g}ms"
    if args.chat_sessions:
        chat = (args.chat_sessions, args.chat_max_tokens)
        name += "_mixed" if chat == DEFAULT_CHAT else f"_mixed_{chat[0]}x{chat[1]}"
    return name + _mode_tag(mode, args.threshold)


# ---------------------------------------------------------------------------- control runs


def _control(args, mode: str, seconds: float):
    from env_agents.control.controller import ControlConfig

    adaptive = {
        k: v
        for k, v in (("g_min", args.g_min), ("g_max", args.g_max), ("g_margin", args.g_margin))
        if v is not None
    }
    return ControlConfig(
        kind="action_chunk",
        mode="sync" if mode == "sync" else "async",
        rate_hz=args.rate_hz,
        threshold=args.threshold,
        adaptive=mode == "adaptive",
        merge="weighted_average",
        max_steps=int(seconds * args.rate_hz),
        request_timeout_s=60.0,
        **adaptive,
    )


def _run_mode(args, broker: BrokerSettings, n: int, mode: str, seconds: float) -> Dict[str, Any]:
    from env_agents.runner.launcher import launch
    from env_agents.runner.spec import RunSpec

    control = _control(args, mode, seconds)
    options: Dict[str, Any] = {}
    if args.env.startswith("MiniWorld-") or args.env == "Frames-v0":
        # One episode spans the whole run: the env's own time limit would otherwise end it
        # (and add resets to the measurement).
        options["max_episode_steps"] = control.max_steps + 10
    if args.env.startswith("MiniWorld-"):
        options["render"] = args.render
    spec = RunSpec(
        args.env,
        control,
        broker,
        n=n,
        procs=args.procs,
        size=args.size,
        env_options=options,
        session_prefix=f"bench-{n}-{mode}-{time.time_ns()}",
    )
    result = launch(spec, progress=False)
    if result.failures:
        raise RuntimeError(f"{mode}: {len(result.failures)} session(s) failed: {result.failures[0]['error']}")
    s = result.summary
    s["overrun_fraction"] = round(s["overruns"] / s["ticks"], 5) if s["ticks"] else 0.0
    s["ended_early"] = sum(1 for e in result.episodes if e["terminated"])
    starts = [e["started_at"] for e in result.episodes]
    ends = [e["started_at"] + e["wall_s"] for e in result.episodes]
    # The chat rate is counted while every control session ran (or, if their times do not
    # overlap, from the first start to the last end).
    s["window"] = (max(starts), min(ends)) if max(starts) < min(ends) else (min(starts), max(ends))
    return s


# ---------------------------------------------------------------------------- chat load


def _chat_process(
    url: str, prefix: str, partitions: int, first: int, count: int, text: str, size: int,
    max_tokens: int, stop, out,
) -> None:  # fmt: skip
    """One process of closed-loop text_action sessions, until `stop` is set; then it puts
    the (finished at, seconds, ok) of every request on `out`."""
    from broker import eventloop
    from env_agents.client import AsyncAgentClient
    from ops.bench.chat import frames
    from schemas.messages import TextActionRequest

    broker = BrokerSettings(url=url, prefix=prefix, partitions=partitions)
    frame = frames(1, size)[0]
    done: List[Done] = []
    tag = time.time_ns()

    async def session(i: int) -> None:
        async with AsyncAgentClient(f"chat-{tag}-{i}", settings=broker, raise_on_error=False) as client:
            step = 0
            while not stop.is_set():
                req = TextActionRequest(
                    messages=[
                        {
                            "role": "user",
                            "content": [{"type": "image", "image": frame}, {"type": "text", "text": text}],
                        }
                    ],
                    max_tokens=max_tokens,
                    temperature=0.0,
                    step=step,
                )
                t0 = time.time()
                try:
                    reply = await client.request(req, timeout=300)
                    ok = reply.ok
                except asyncio.TimeoutError:
                    ok = False
                done.append((time.time(), time.time() - t0, ok))
                step += 1
                if not ok:
                    await asyncio.sleep(0.5)  # an error comes back fast: don't spin on it

    async def main() -> None:
        await asyncio.gather(*(session(i) for i in range(first, first + count)))

    eventloop.run(main())
    out.put(done)


class ChatLoad:
    """--chat-sessions closed-loop text_action sessions over --chat-procs processes."""

    def __init__(self, args, broker: BrokerSettings, text: str) -> None:
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.out = ctx.Queue()
        per = [args.chat_sessions // args.chat_procs + (i < args.chat_sessions % args.chat_procs)
               for i in range(args.chat_procs)]  # fmt: skip
        self.procs = []
        first = 0
        for count in (c for c in per if c):
            task = (broker.url, broker.prefix, broker.partitions, first, count, text,
                    args.chat_image_size, args.chat_max_tokens, self.stop_event, self.out)  # fmt: skip
            self.procs.append(ctx.Process(target=_chat_process, args=task, daemon=True))
            first += count
        for p in self.procs:
            p.start()

    def stop(self, timeout: float = 600.0) -> List[Done]:
        """Stop asking, wait for the requests in flight; every request's (end, seconds, ok)."""
        self.stop_event.set()
        done: List[Done] = []
        waiting, give_up = len(self.procs), time.time() + timeout
        while waiting:
            try:
                done += self.out.get(timeout=1.0)
                waiting -= 1
            except queue_mod.Empty:
                crashed = [p for p in self.procs if p.exitcode not in (None, 0)]
                if crashed or time.time() > give_up:
                    raise RuntimeError(f"chat load: {len(crashed)} process(es) failed or timed out") from None
        for p in self.procs:
            p.join(30)
        return done


def wait_for_kinds(broker: BrokerSettings, kinds: List[str], timeout: float) -> None:
    """Until live workers (heartbeats) serve every one of `kinds`: requests for a kind no
    worker serves would wait for their timeout, and the run would measure nothing."""
    from broker.connection import connect_sync
    from broker.keys import Keys

    redis = connect_sync(broker)
    served: set = set()
    give_up = time.time() + timeout
    try:
        while True:
            served = set()
            for key in redis.scan_iter(match=Keys(broker.prefix).workers_pattern(), count=1000):
                raw = redis.hget(key, "kinds") or b""
                served.update(k for k in raw.decode().split(",") if k)
            if set(kinds) <= served:
                return
            if time.time() > give_up:
                raise SystemExit(
                    f"no live worker on prefix {broker.prefix!r} serves {', '.join(sorted(set(kinds) - served))} "
                    f"(served: {', '.join(sorted(served)) or 'nothing'})"
                )
            time.sleep(0.5)
    finally:
        redis.close()


def chat_prompt(args) -> str:
    """About --chat-prompt-tokens tokens of the tokenizer corpus (exact with --chat-tokenizer)."""
    from inference_worker.models.corpus import sentences

    if args.chat_tokenizer:
        from transformers import AutoTokenizer

        from ops.bench.chat import prompt_text

        return prompt_text(AutoTokenizer.from_pretrained(args.chat_tokenizer), args.chat_prompt_tokens)
    words = " ".join(sentences()).split()
    return " ".join(words[i % len(words)] for i in range(args.chat_prompt_tokens))


def chat_figures(done: List[Done], window: Tuple[float, float]) -> Dict[str, Optional[float]]:
    """The chat load's figures in one run's window; no latency (None) where no chat request
    finished in it: the control traffic had the worker, and 0 s would read as instant."""
    t0, t1 = window
    inside = [d for d in done if t0 <= d[0] <= t1]
    ok = [d for d in inside if d[2]]
    lat = sorted(d[1] for d in ok)
    return {
        "chat_rps": len(ok) / (t1 - t0) if t1 > t0 else 0.0,
        "chat_errors": float(len(inside) - len(ok)),
        "chat_latency_p50_s": statistics.median(lat) if lat else None,
    }


# ---------------------------------------------------------------------------- records

FAMILIES = (  # (metric family, summary key, unit)
    ("starvation_fraction", "starvation_fraction", "fraction of ticks"),
    ("chunk_latency_p50_ms", "latency_p50_ms", "ms"),
    ("chunk_latency_p90_ms", "latency_p90_ms", "ms"),
    ("chunk_latency_p99_ms", "latency_p99_ms", "ms"),
    ("env_steps_per_s_per_session", "session_steps_per_s", "steps/s"),
    ("overrun_fraction", "overrun_fraction", "fraction of ticks"),
    ("requests_per_env_step", "requests_per_step", "requests/step"),
)
CHAT_FAMILIES = (
    ("chat_rps", "chat_rps", "requests/s"),
    ("chat_latency_p50_s", "chat_latency_p50_s", "s"),
)


def build_records(args, n: int, runs: Dict[str, List[Dict[str, Any]]], machine: str) -> List[Record]:
    def series(mode: str, key: str) -> List[float]:
        return [float(s[key]) for s in runs.get(mode, [])]

    out: List[Record] = []
    for mode in runs:
        for family, key, unit in FAMILIES + (CHAT_FAMILIES if args.chat_sessions else ()):
            base: Optional[str] = None
            if mode != "sync" and not family.startswith("chat_"):
                base = "sync" if "sync" in runs else None
            if family == "requests_per_env_step" and mode == "adaptive":
                base = "fixed" if "fixed" in runs else None  # the ratio is adaptive g's extra requests
            baseline = series(base, key) if base else None
            if any(s.get(key, 0.0) is None for s in runs[mode]):
                print(f"no {family} record for {mode}: no chat request finished in a run's window")
                continue
            out.append(record(metric_name(family, args, n, mode), series(mode, key), unit, baseline, machine))
        if mode == "adaptive":
            out.append(
                record(metric_name("mean_g", args, n, mode), series(mode, "mean_g"), "g", None, machine)
            )
    return out


def _gpu_name() -> str:
    gpu = os.environ.get("VLMQ_BENCH_GPU", "")
    if gpu:
        return gpu
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return out.splitlines()[0].strip() if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def renderer(env_id: str, size: int, render: str = "auto") -> str:
    """How the env draws its frames, for the records (MiniWorld: the GL renderer)."""
    if not env_id.startswith("MiniWorld-"):
        return "synthetic frames" if env_id == "Frames-v0" else "its own rendering"
    from env_agents.envs.miniworld import make_miniworld

    env = make_miniworld(env_id, size=size, render=render)
    try:
        from pyglet.gl import gl_info

        return f"real rendering, GL renderer {gl_info.get_renderer()}"
    finally:
        env.close()


def describe(args, n: int, modes: List[str], worker: str, render: str, chat_text: str) -> str:
    gpu = _gpu_name()
    host = machine_description()
    if gpu and host.startswith(gpu + "; "):
        host = host[len(gpu) + 2 :]
    adaptive = _control(args, "adaptive", 1.0)
    parts = [
        gpu or "no GPU",
        f"{args.env} {args.size} px ({render})",
        f"{n} sessions over {args.procs} processes at {args.rate_hz:g} Hz",
        worker,
        ", ".join(
            {
                "sync": "sync (g=0)",
                "fixed": f"fixed g={args.threshold:g}",
                "adaptive": f"adaptive g in [{adaptive.g_min:g}, {adaptive.g_max:g}] (p90 x {adaptive.g_margin:g})",
            }[m]
            for m in modes
        ),
        f"{args.runs} runs of {args.seconds:g} s per mode",
    ]
    if args.chat_sessions:
        prompt = (
            f"{args.chat_prompt_tokens}-token prompt"
            if args.chat_tokenizer
            else f"{len(chat_text.split())}-word prompt"
        )
        parts.append(
            f"beside {args.chat_sessions} closed-loop chat sessions (text_action, free text, "
            f"{args.chat_image_size}-px frame, {prompt}, {args.chat_max_tokens} new tokens each)"
        )
    return "; ".join([*parts, host])


# ---------------------------------------------------------------------------- run

SHOWN = (
    "starvation_fraction", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "requests_per_step",
    "mean_g", "session_steps_per_s", "overrun_fraction",
)  # fmt: skip


def _print_run(n: int, mode: str, s: Dict[str, Any]) -> None:
    extra = f", chat_rps={s['chat_rps']:.2f}" if "chat_rps" in s else ""
    early = f", episodes_ended_early={s['ended_early']}" if s.get("ended_early") else ""
    print(
        f"{n:3d} sessions {mode:8s}: " + ", ".join(f"{k}={s[k]}" for k in SHOWN) + extra + early, flush=True
    )


def _parse_modes(text: str) -> List[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SystemExit(f"--modes: want some of {', '.join(MODES)}, got {text!r}")
    return modes


def run(args) -> int:
    counts = [int(x) for x in str(args.sessions).split(",") if x.strip()]
    modes = _parse_modes(args.modes)
    if args.runs < 1:
        raise SystemExit("--runs must be >= 1")
    if args.chat_sessions and args.chat_procs < 1:
        raise SystemExit("--chat-procs must be >= 1")
    worker: Optional[subprocess.Popen] = None
    server = None
    if args.worker == "synthetic":
        from broker.embedded import EmbeddedRedis
        from schemas.actions import ACTION_DIM

        server = EmbeddedRedis().start()
        broker = BrokerSettings(url=server.url, prefix="bench")
        kinds = "action_chunk,text_action" if args.chat_sessions else "action_chunk"
        worker = synthetic_worker(
            broker, kinds, "--synthetic-latency-ms", str(args.latency_ms),
            "--synthetic-chunk", f"{args.chunk}x{ACTION_DIM}", "--max-batch", "64", max_wait_ms=2,
        )  # fmt: skip
        label = f"synthetic worker ({args.latency_ms:g} ms per batch, {args.chunk}-row chunks), CPU run"
    else:
        if not args.redis_url:
            raise SystemExit("--worker external needs --redis-url")
        broker = BrokerSettings(url=args.redis_url, prefix=args.prefix, partitions=args.partitions)
        label = args.label or "external workers"
    records: List[Record] = []
    try:
        wait_for_kinds(broker, ["action_chunk"] + (["text_action"] if args.chat_sessions else []), 120)
        render = renderer(args.env, args.size, args.render)
        text = chat_prompt(args) if args.chat_sessions else ""
        for n in counts:
            records += _measure(args, broker, n, modes, describe(args, n, modes, label, render, text), text)
    finally:
        if worker is not None:
            stop_worker(worker, 30)
        if server is not None:
            server.stop()
    if not args.fresh and os.path.exists(args.out):
        with open(args.out) as f:
            kept = [r for r in json.load(f) if r["metric"] not in {x.metric for x in records}]
        records = [Record(**r) for r in kept] + records
    write_results(args.out, records)
    print(f"wrote {args.out}")
    return 0


def _measure(args, broker: BrokerSettings, n: int, modes: List[str], machine: str, text: str) -> List[Record]:
    chat = ChatLoad(args, broker, text) if args.chat_sessions else None
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in modes}
    try:
        if args.warmup_s > 0:
            _run_mode(args, broker, n, "fixed", args.warmup_s)
        for r in range(args.runs):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:  # rotate the order
                runs[mode].append(_run_mode(args, broker, n, mode, args.seconds))
                if chat is None:
                    _print_run(n, mode, runs[mode][-1])
    finally:
        done = chat.stop() if chat is not None else []
    if chat is not None:
        for mode in modes:
            for s in runs[mode]:
                s.update(chat_figures(done, s["window"]))
                _print_run(n, mode, s)
    for mode in modes:
        mid = {k: statistics.median(float(s[k]) for s in runs[mode]) for k in ("starvation_fraction",
               "requests_per_step", "latency_p99_ms")}  # fmt: skip
        print(f"{n:3d} sessions {mode:8s} median of {len(runs[mode])}: {json.dumps(mid)}", flush=True)
    return build_records(args, n, runs, machine)
