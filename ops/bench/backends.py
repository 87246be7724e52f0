"""The backends side by side: vLLM against vlmq's own engine (hf), same model, same load.

Runs in the vLLM venv (`bash ops/vllm_cpu/setup.sh --no-test`, then
`.venv-vllm/bin/python -m ops.cli bench backends`), on the tiny Qwen2-VL in fp32 unless
--model is given.

- `vllm_hf_greedy_agreement`: a fixed load of --requests requests of the three chat kinds
  (text_action free text and with admissible commands, structured_action, preference
  two-step and one-pass; frames of several sizes, one and two images, text only), the same
  prompts built by the handlers' own code, greedy. A request agrees when vLLM and the hf
  engine give the same tokens (both steps of a two-step preference) or pick the same
  candidate. Each disagreement is printed with the hf engine's margin at the first
  different token (the gap between its two best log-probabilities).
- `vllm_cpu_rps` / `hf_cpu_rps`: `vlmq worker --backend vllm` and `--backend hf`, each in
  its own process on one Redis, serving --sessions closed-loop sessions that cycle through
  the same load; --runs measured windows of --rps-requests replies each, after a warm-up.

With --nf4 (a CUDA machine with bitsandbytes) it instead serves the 2B shape with
`--quantize nf4` and with bf16 in the same call (vlmq bench chat's load: 224-px frame,
~100-token prompt, 32 new tokens, --nf4-sessions sessions), recording
`nf4_throughput_rps_<N>_sessions` and `nf4_gpu_memory_mib` against bf16.

With --parity (CUDA) it checks the engine's bf16 fast path on the 2B shape, --parity-prompts
prompts of vlmq bench chat's load:
- `graph_eager_identical_fraction_same_shape`: the share of answers (--max-tokens tokens,
  `ignore_eos`) that are the same token for token when the decode steps are CUDA-graph
  replays and when the same steps run eagerly at the same batch bucket and KV span.
- `bf16_topk_logprob_max_abs_diff`: the largest gap in log-probability over the top 5 tokens
  of a pristine copy of the checkpoint (loaded separately, never given to an engine,
  transformers' own forward and generate), the engine teacher-forced on the pristine
  model's greedy tokens; the argmax agreement and near-tie check are in the log.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from broker import eventloop
from ops.bench.workers import stop_worker, wait_for_worker
from ops.cli import argv

log = logging.getLogger("vlmq.bench.backends")
CHAT_KINDS = ("text_action", "structured_action", "preference")


def add_args(p) -> None:
    p.add_argument("--model", default="", help="checkpoint folder; empty: a tiny Qwen2-VL built here")
    p.add_argument("--dtype", default="float32", help="both backends' dtype (%(default)s)")
    p.add_argument("--requests", type=int, default=60, help="requests in the agreement load (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per generated answer (%(default)s)")
    p.add_argument("--sessions", type=int, default=8, help="closed-loop sessions for req/s (%(default)s)")
    p.add_argument("--runs", type=int, default=3, help="measured req/s windows per backend (%(default)s)")
    p.add_argument("--rps-requests", type=int, default=120, help="replies per measured window (%(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="hf worker --max-batch (%(default)s)")
    p.add_argument("--skip-agreement", action="store_true", help="only the req/s comparison")
    p.add_argument("--skip-rps", action="store_true", help="only the agreement")
    p.add_argument("--nf4", action="store_true", help="GPU: nf4 against bf16 on the 2B shape instead")
    p.add_argument(
        "--parity",
        action="store_true",
        help="GPU: graph/eager and pristine-model parity on the 2B shape instead",
    )
    p.add_argument(
        "--parity-prompts", type=int, default=16, help="prompts of the parity checks (%(default)s)"
    )
    p.add_argument(
        "--parity-device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a dry run of --parity on the tiny model in fp32, eager steps at exact against padded "
        "shapes (a check of the bench itself, not a figure) (%(default)s)",
    )
    p.add_argument("--nf4-sessions", type=int, default=128, help="sessions of the nf4 step (%(default)s)")
    p.add_argument(
        "--nf4-seconds", type=float, default=15.0, help="each measured nf4/bf16 window (%(default)s)"
    )
    p.add_argument(
        "--nf4-warmup-s", type=float, default=20.0, help="warm-up before the windows (%(default)s)"
    )


# ---------------------------------------------------------------------------- the load


@dataclass
class Item:
    """One request of the load: which handler path it takes, and what it carries."""

    kind: str  # text_action | text_action_choice | structured_action | preference_two | preference_one
    request: Any


def load(n: int, max_tokens: int) -> List[Item]:
    """`n` requests of the three chat kinds, deterministic: 40% free text, 20% choices,
    20% MineRL actions, 10% two-step and 10% one-pass preferences."""
    import numpy as np

    from inference_worker.models.corpus import sentences
    from schemas.messages import PreferenceRequest, StructuredActionRequest, TextActionRequest

    rs = np.random.RandomState(17)
    sizes = [(64, 64), (100, 37), (224, 224), (48, 80), (112, 112), (300, 200)]
    words = " ".join(sentences()).split()

    def frame():
        h, w = sizes[rs.randint(len(sizes))]
        return rs.randint(0, 256, (h, w, 3), dtype=np.uint8)

    def text(k: int) -> str:
        i = rs.randint(0, len(words) - k)
        return " ".join(words[i : i + k])

    def chat(*parts):
        return [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
                    for p in parts
                ],
            }
        ]

    items: List[Item] = []
    plan = ["text_action"] * 4 + ["text_action_choice"] * 2 + ["structured_action"] * 2
    plan += ["preference_two", "preference_one"]
    for i in range(n):
        kind = plan[i % len(plan)]
        if kind == "text_action":
            shape = i % 3
            msgs = (
                chat(frame(), text(12))
                if shape == 0
                else chat(text(20))
                if shape == 1
                else chat("Image 1:", frame(), "Image 2:", frame(), text(8))
            )
            req = TextActionRequest(messages=msgs, max_tokens=max_tokens)
        elif kind == "text_action_choice":
            commands = [text(1 + rs.randint(4)) for _ in range(3 + rs.randint(4))] + ["-1"]
            req = TextActionRequest(messages=chat(frame(), text(10)), admissible_commands=commands)
        elif kind == "structured_action":
            req = StructuredActionRequest(image=frame(), task_name=text(2), max_tokens=max_tokens)
        elif kind == "preference_two":
            req = PreferenceRequest(image_a=frame(), image_b=frame(), task=text(5), max_tokens=max_tokens)
        else:
            req = PreferenceRequest(image_a=frame(), image_b=frame(), task=text(5), mode="one_pass")
        items.append(Item(kind, req))
    return items


# ---------------------------------------------------------------------------- agreement


@dataclass
class Answer:
    tokens: List[List[int]]  # per generated step (two for a two-step preference)
    choice: Optional[int] = None  # scored kinds
    scores: Optional[List[float]] = None
    texts: Optional[List[str]] = None  # per generated step


def _prompt(item: Item, limits) -> Tuple[Any, Any]:
    """(prompt, candidates or sampling) as the handlers build them."""
    from inference_worker.engines.prompt import from_chat_messages
    from inference_worker.engines.sampling import Sampling
    from inference_worker.handlers.preference import (
        ANALYSIS_PROMPT,
        LABELS,
        ONE_PASS_PROMPT,
        fill,
        image_pair_prompt,
    )
    from inference_worker.handlers.structured_action import minerl_prompt

    r = item.request
    if item.kind == "text_action":
        return from_chat_messages(r.messages, limits), Sampling.of(r)
    if item.kind == "text_action_choice":
        return from_chat_messages(r.messages, limits), list(r.admissible_commands)
    if item.kind == "structured_action":
        return minerl_prompt(r, limits), Sampling.of(r)
    if item.kind == "preference_one":
        return image_pair_prompt(r, fill(ONE_PASS_PROMPT, r.task), limits), list(LABELS)
    return image_pair_prompt(r, fill(ANALYSIS_PROMPT, r.task), limits), Sampling.of(r)


def _summary(item: Item, analysis_text: str):
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.handlers.preference import SUMMARY_MAX_TOKENS, SUMMARY_PROMPT, fill

    r = item.request
    return user_prompt(fill(SUMMARY_PROMPT, r.task, analysis_text)), Sampling.of(
        r, max_tokens=SUMMARY_MAX_TOKENS
    )


def hf_answers(engine: Any, items: Sequence[Item]) -> List[Answer]:
    from schemas.limits import DEFAULT_LIMITS

    out: List[Answer] = []
    for item in items:
        prompt, what = _prompt(item, DEFAULT_LIMITS)
        engine.check(prompt)
        if isinstance(what, list):
            s = engine.score([prompt], [what])[0]
            out.append(Answer([], s.best, s.scores))
            continue
        c = engine.generate([prompt], [what])[0]
        steps, texts = [c.token_ids], [c.text]
        if item.kind == "preference_two":
            summary, samp = _summary(item, c.text)
            steps.append(engine.generate([engine.check(summary)], [samp])[0].token_ids)
        out.append(Answer(steps, texts=texts))
    return out


async def vllm_answers(engine: Any, items: Sequence[Item]) -> List[Answer]:
    """All requests submitted together, as a worker would hand them to vLLM."""
    from schemas.limits import DEFAULT_LIMITS

    async def one(item: Item) -> Answer:
        prompt, what = _prompt(item, DEFAULT_LIMITS)
        engine.check(prompt)
        if isinstance(what, list):
            s = await engine.score(prompt, what)
            return Answer([], s.best, s.scores)
        c = await engine.generate(prompt, what)
        steps, texts = [c.token_ids], [c.text]
        if item.kind == "preference_two":
            summary, samp = _summary(item, c.text)
            steps.append((await engine.generate(engine.check(summary), samp)).token_ids)
        return Answer(steps, texts=texts)

    return list(await asyncio.gather(*(one(i) for i in items)))


def explain(hf_engine: Any, item: Item, a: Answer, b: Answer) -> str:
    """Where the two answers part, and the hf engine's margin there."""
    from inference_worker.engines.parity import engine_trace
    from schemas.limits import DEFAULT_LIMITS

    if a.choice is not None:
        gap = sorted(a.scores, reverse=True)
        return (
            f"{item.kind}: hf picks {a.choice}, vLLM {b.choice}; hf's two best scores differ by "
            f"{gap[0] - gap[1]:.2e}, the scores by up to {max(abs(x - y) for x, y in zip(a.scores, b.scores)):.2e}"
        )
    for step, (x, y) in enumerate(zip(a.tokens, b.tokens)):
        if x == y:
            continue
        n = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
        prompt = _prompt(item, DEFAULT_LIMITS)[0]
        if step == 0 and n < len(x):
            lp = engine_trace(hf_engine, prompt, x[: n + 1]).logprobs[n]
            top = lp.topk(2)
            return (
                f"{item.kind} step {step}: token {n} is {x[n]} (hf) vs {y[n] if n < len(y) else 'end'} (vLLM); "
                f"hf's two best log-probs there differ by {float(top.values[0] - top.values[1]):.2e}"
            )
        if step > 0 and a.texts != b.texts:
            return f"{item.kind} step {step}: its prompt quotes step 0's text, which differs: {a.texts!r} / {b.texts!r}"
        return f"{item.kind} step {step}: tokens part at {n} (hf {len(x)} tokens, vLLM {len(y)})"
    return f"{item.kind}: the answers differ in length"


def agreement(folder: str, args) -> Tuple[float, List[str], int]:
    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.vllm_engine import VLLMChatEngine
    from inference_worker.models.loading import load_vlm
    from inference_worker.settings import WorkerSettings

    items = load(args.requests, args.max_tokens)
    hf_engine = ChatEngine(load_vlm(folder, dtype=args.dtype))
    a = hf_answers(hf_engine, items)

    async def on_vllm() -> List[Answer]:
        engine = VLLMChatEngine.from_settings(
            WorkerSettings(backend="vllm", model_path=folder, dtype=args.dtype)
        )
        try:
            return await vllm_answers(engine, items)
        finally:
            engine.close()

    b = eventloop.run(on_vllm())
    same = [x.tokens == y.tokens and x.choice == y.choice for x, y in zip(a, b)]
    notes = [explain(hf_engine, i, x, y) for i, x, y, ok in zip(items, a, b, same) if not ok]
    return sum(same) / len(same), notes, len(items)


# ---------------------------------------------------------------------------- req/s


def _worker(url: str, prefix: str, backend: str, folder: str, args) -> subprocess.Popen:
    from broker.settings import BrokerSettings

    cmd = argv(
        "worker", BrokerSettings(url=url, prefix=prefix), "--name", f"bench-{backend}",
        "--backend", backend, "--model", folder, "--dtype", args.dtype, "--kinds", ",".join(CHAT_KINDS),
        "--max-batch", str(args.max_batch), "--max-wait-ms", "5", "--regroup-ms", "0",
        log_level="WARNING",
    )  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def _closed_loop(url: str, prefix: str, items: Sequence[Item], sessions: int, replies: int) -> float:
    """req/s of `sessions` closed-loop sessions until `replies` replies came back."""
    from broker.settings import BrokerSettings
    from env_agents.client import AsyncAgentClient

    broker = BrokerSettings(url=url, prefix=prefix)
    left = [replies]
    cursor = [0]

    async def session(i: int) -> None:
        async with AsyncAgentClient(f"bench-{uuid.uuid4().hex[:8]}", settings=broker) as client:
            step = 0
            while left[0] > 0:
                left[0] -= 1
                item = items[cursor[0] % len(items)]
                cursor[0] += 1
                await client.request(item.request.model_copy(update={"step": step}), timeout=600)
                step += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(session(i) for i in range(sessions)))
    return replies / (time.perf_counter() - t0)


def rps(folder: str, args) -> Dict[str, List[float]]:
    from broker.embedded import EmbeddedRedis
    from broker.settings import BrokerSettings

    items = load(args.requests, args.max_tokens)
    out: Dict[str, List[float]] = {}
    with EmbeddedRedis() as server:
        for backend in ("hf", "vllm"):
            prefix = f"bench{os.getpid()}{backend}"
            worker = _worker(server.url, prefix, backend, folder, args)
            try:
                wait_for_worker(
                    BrokerSettings(url=server.url, prefix=prefix), f"bench-{backend}", worker, 600
                )
                eventloop.run(_closed_loop(server.url, prefix, items, args.sessions, 2 * args.sessions))
                out[backend] = [
                    eventloop.run(_closed_loop(server.url, prefix, items, args.sessions, args.rps_requests))
                    for _ in range(args.runs)
                ]
                log.info("%s: %s req/s", backend, [round(x, 2) for x in out[backend]])
            finally:
                stop_worker(worker)
    return out


# ---------------------------------------------------------------------------- GPU steps


def _chat_load(*argv: str) -> argparse.Namespace:
    """vlmq bench chat's load settings (frame, prompt tokens, new tokens, sessions...), its
    defaults unless `argv` says otherwise: the GPU steps measure on the same load."""
    from ops.bench import chat

    p = argparse.ArgumentParser()
    chat.add_args(p)
    return p.parse_args(list(argv))


# ---------------------------------------------------------------------------- nf4 (GPU)


def nf4(args) -> List[Any]:
    """bf16 and nf4 workers on the 2B shape, one after the other, vlmq bench chat's load."""
    from ops.bench import chat
    from ops.bench.models import checkpoint
    from ops.bench.records import machine_description, record

    cargs = _chat_load(
        "--sessions",
        str(args.nf4_sessions),
        "--seconds",
        str(args.nf4_seconds),
        "--warmup-s",
        str(args.nf4_warmup_s),
        "--runs",
        str(args.runs),
    )
    with checkpoint(args.model, "qwen2-vl", "2b", "cuda") as folder:
        from transformers import AutoTokenizer

        text = chat.prompt_text(AutoTokenizer.from_pretrained(folder), cargs.prompt_tokens)
        lengths = [cargs.max_tokens]
        bf16 = chat.served(folder, cargs, text, "continuous", lengths)
        q4 = chat.served(folder, cargs, text, "continuous", lengths, worker_flags=("--quantize", "nf4"))
    log.info("bf16 %s\nnf4 %s", bf16, q4)
    n = args.nf4_sessions
    where = (
        f"{q4[0]['card'] or os.environ.get('VLMQ_BENCH_GPU', '')}; qwen2-vl 2b, 224-px frame, ~{cargs.prompt_tokens} prompt "
        f"tokens, {cargs.max_tokens} new tokens, {n} sessions; {args.runs} consecutive {args.nf4_seconds:g}-s windows "
        f"of one worker per mode, bf16 (baseline) then nf4 in the same call; {machine_description()}"
    )
    return [
        record(
            f"nf4_throughput_rps_{n}_sessions",
            [r["rps"] for r in q4],
            "requests/s",
            [r["rps"] for r in bf16],
            machine=where,
        ),
        record(
            "nf4_gpu_memory_mib",
            [r["gpu_memory_mib"] for r in q4],
            "MiB",
            [r["gpu_memory_mib"] for r in bf16],
            machine=where,
        ),
    ]


# ---------------------------------------------------------------------------- parity (GPU)


def parity(args) -> List[Any]:
    """The bf16 fast path against itself (graphs vs eager, same shapes) and a pristine copy;
    with --parity-device cpu the same steps on the tiny model in fp32 (no graphs on a CPU)."""
    import torch

    from inference_worker.engines.chat_engine import ChatEngine
    from inference_worker.engines.options import EngineOptions
    from inference_worker.engines.parity import compare_topk, engine_trace, reference_trace
    from inference_worker.engines.prompt import user_prompt
    from inference_worker.engines.sampling import Sampling
    from inference_worker.models import load_vlm
    from ops.bench import chat
    from ops.bench.models import checkpoint
    from ops.bench.records import machine_description, record

    device = args.parity_device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vlmq bench backends --parity: needs CUDA (--parity-device cpu: a dry run)")
    preset, dtype, fast = ("2b", "bfloat16", "graphs") if device == "cuda" else ("tiny", "float32", "eager")
    cargs = _chat_load()
    n, tokens = args.parity_prompts, args.max_tokens
    identical: List[float] = []
    worst: List[float] = []
    with checkpoint(args.model, "qwen2-vl", preset, device) as folder:
        from transformers import AutoTokenizer

        text = chat.prompt_text(AutoTokenizer.from_pretrained(folder), cargs.prompt_tokens)
        prompts = [user_prompt(f, text) for f in chat.frames(n, cargs.image_size)]
        samp = [Sampling(max_tokens=tokens)] * n
        vlm = load_vlm(folder, device=device, dtype=dtype)
        pristine = load_vlm(folder, device=device, dtype=dtype)  # never given to an engine
        opts = dict(ignore_eos=True, kv_slots=n, max_context=1024)
        graphs = ChatEngine(vlm, EngineOptions(decode=fast, **opts), max_sequences=n)
        eager = ChatEngine(vlm, EngineOptions(decode="eager-bucketed", **opts), max_sequences=n)
        for _ in range(args.runs):
            a = graphs.generate(prompts, samp)
            b = eager.generate(prompts, samp)
            identical.append(sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / n)
        del eager
        for run in range(args.runs):
            reports = []
            for prompt in prompts:
                ref = reference_trace(pristine, prompt, max_tokens=tokens)
                reports.append(compare_topk(ref, engine_trace(graphs, prompt, ref.tokens), k=5))
            worst.append(max(r.max_abs_diff for r in reports))
            if run == 0:
                agree = statistics.mean(r.argmax_agreement for r in reports)
                close = sum(r.close for r in reports)
                log.info(
                    "top-5 parity over %d prompts: max |diff| %.4f, argmax agreement %.3f, %d of %d "
                    "with every disagreement a near-tie",
                    n,
                    worst[-1],
                    agree,
                    close,
                    n,
                )
    where = (
        f"{os.environ.get('VLMQ_BENCH_GPU', '')}; qwen2-vl {preset} random weights, {dtype}, {n} prompts of a "
        f"{cargs.image_size}-px frame and ~{cargs.prompt_tokens} tokens, {tokens} tokens each; "
        f"{machine_description()}"
    )
    return [
        record(
            "graph_eager_identical_fraction_same_shape",
            identical,
            "fraction",
            machine=f"graph replays vs eager steps at the same batch bucket and KV span; {where}",
        ),
        record(
            "bf16_topk_logprob_max_abs_diff",
            worst,
            "log-prob",
            machine=f"engine (graphs) teacher-forced on a pristine copy's greedy tokens, top 5; {where}",
        ),
    ]


# ---------------------------------------------------------------------------- run


def run(args) -> int:
    import json

    from ops.bench.models import checkpoint
    from ops.bench.records import Record, machine_description, record, write_results

    old: List[Dict[str, Any]] = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
    if args.nf4:
        new = nf4(args)
    elif args.parity:
        new = parity(args)
    else:
        try:
            import vllm
        except ImportError:
            raise SystemExit(
                "vlmq bench backends: vllm is not importable here; run it in the vLLM venv "
                "(bash ops/vllm_cpu/setup.sh --no-test; .venv-vllm/bin/python -m ops.cli bench backends)"
            ) from None
        import torch
        import transformers
        import vllm

        new = []
        with checkpoint(args.model, "qwen2-vl", "tiny", "cpu") as folder:
            where = (
                f"{'tiny qwen2-vl' if not args.model else folder}, {args.dtype}, vllm {vllm.__version__}, "
                f"transformers {transformers.__version__}, torch {torch.__version__}; {machine_description()}"
            )
            if not args.skip_agreement:
                frac, notes, n = agreement(folder, args)
                for line in notes:
                    print("disagreement:", line)
                new.append(
                    record("vllm_hf_greedy_agreement", frac, "fraction", machine=f"{n} requests; {where}")
                )
            if not args.skip_rps:
                r = rps(folder, args)
                load_desc = (
                    f"{args.sessions} closed-loop sessions, {args.rps_requests} replies per window; {where}"
                )
                new.append(record("vllm_cpu_rps", r["vllm"], "requests/s", r["hf"], machine=load_desc))
                new.append(record("hf_cpu_rps", r["hf"], "requests/s", machine=load_desc))
    for r in new:
        print(
            f"{r.metric}: {r.value} {r.unit}"
            + (f" (baseline {r.baseline}, x{r.ratio})" if r.baseline else "")
        )
    if args.parity and args.parity_device == "cpu":
        print("a dry run (--parity-device cpu): nothing written")
        return 0
    names = {r.metric for r in new}
    kept = [Record(**o) for o in old if o["metric"] not in names]
    write_results(args.out, kept + new)
    return 0


__all__ = ["add_args", "run"]
