"""Constrained decoding and streaming: valid MineRL actions, the cost of the grammar, time to first token.

Parts (--parts), each beside its baseline in the same run:
- `valid`: --requests structured_action requests from --sessions sessions through a `vlmq
  worker --backend hf`, decoded under the MineRL action grammar (the default); baseline:
  the same requests with `constrained: false`, the free-text parse vlmq had before. A reply
  is valid when it parsed (`parse_ok`) to every button in {0, 1} and a camera of two angles
  in [-180, 180]. Records structured_action_valid_fraction (median of --runs runs).
- `overhead`: closed-loop text_action sessions (--sessions, one --image-size frame, a
  ~--prompt-tokens prompt, --max-tokens new tokens, `ignore_eos`) under a grammar of
  MineRL action objects that never ends (so both sides decode exactly --max-tokens tokens),
  against the same sessions without a constraint. Records constrained_decode_overhead:
  requests/s constrained / unconstrained (median of --runs windows each).
- `stream`: the same unconstrained sessions with `stream: true`; time to the first piece
  (stream_ttft_ms_p50) against the time to the whole reply of the same requests.
- `mask`: the grammar libraries alone: filling the token masks of --mask-rows rows under
  the MineRL action grammar, per step (xgrammar, which the engine uses, against
  llguidance's parallel filler when it is installed), with --mask-tokenizer's vocabulary.

The checkpoint is --model, or one built with `make_model --preset 2b` (random weights: the
shapes and costs of the release, not its answers; free text from it never parses).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Tuple

from broker import eventloop
from ops.bench.chat import add_checkpoint_args, add_served_args, frames, prompt_text
from ops.bench.workers import stop_worker, wait_for_worker
from ops.cli import argv

log = logging.getLogger("vlmq.bench.structured")

# (finish time, latency s, time to first piece s or -1, valid 0/1 or -1)
Done = Tuple[float, float, float, int]


def add_args(p) -> None:
    p.set_defaults(out="benchmarks/results/structured.json")
    add_checkpoint_args(p)
    p.add_argument(
        "--requests", type=int, default=256, help="valid: structured_action requests per run (%(default)s)"
    )
    p.add_argument("--action-max-tokens", type=int, default=256, help="valid: max_tokens (%(default)s)")
    p.add_argument(
        "--max-tokens", type=int, default=64, help="overhead/stream: new tokens per request (%(default)s)"
    )
    add_served_args(p)
    p.add_argument("--mask-rows", type=int, default=128, help="mask: rows per step (%(default)s)")
    p.add_argument("--mask-steps", type=int, default=60, help="mask: steps measured (%(default)s)")
    p.add_argument(
        "--mask-tokenizer",
        default="",
        help="mask: a tokenizer folder (default: the checkpoint's; pad to its vocab)",
    )
    p.add_argument(
        "--mask-train-vocab",
        type=int,
        default=151643,
        help="mask: without --mask-tokenizer, train a byte-level BPE of this many tokens (Qwen2's count) on "
        "the installed Python sources, since the checkpoint's tokenizer has 2k; 0: use the checkpoint's "
        "(%(default)s)",
    )
    p.add_argument(
        "--parts", default="mask,valid,overhead,stream", help="what to run, comma-separated (%(default)s)"
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra worker --option, repeatable"
    )


def never_ending_actions() -> Dict[str, Any]:
    """A constraint of MineRL action objects, one a line, with no end: a row under it decodes
    exactly max_tokens tokens, as an unconstrained row with ignore_eos does."""
    from inference_worker.parsing.minerl_action import BUTTONS

    keys = ' ", " '.join(f'"\\"{b}\\": " [01]' for b in BUTTONS)
    ebnf = (
        'root ::= action "\\n" root\n'
        f'action ::= "{{\\"action\\": {{" {keys} ", \\"camera\\": [" angle ", " angle "]}}, \\"reasoning\\": \\"" '
        'text "\\"}"\n'
        'angle ::= "-"? ("180" | [1] [0-7] [0-9] | [1-9]? [0-9]) ("." [0-9] [0-9]?)?\n'
        "text ::= [ !#-\\[\\]-~]{0,40}\n"
    )
    return {"type": "grammar", "grammar": ebnf}


def action_valid(result: Any) -> bool:
    from inference_worker.parsing.minerl_action import BUTTONS

    a = result.action
    cam = a.get("camera")
    return (
        bool(result.parse_ok)
        and all(a.get(b) in (0, 1) for b in BUTTONS)
        and isinstance(cam, list)
        and len(cam) == 2
        and all(isinstance(x, (int, float)) and -180 <= x <= 180 for x in cam)
    )


# ---------------------------------------------------------------------------- agent processes


def _sessions(url, prefix, first, count, mode, spec, queue) -> None:
    """One agent process: `count` sessions. mode "fixed": spec["per_session"] requests each;
    "window": requests until spec["t_end"]."""
    from broker.settings import BrokerSettings
    from env_agents.client import AsyncAgentClient
    from schemas.messages import Partial, StructuredActionRequest, TextActionRequest

    broker = BrokerSettings(url=url, prefix=prefix)
    frame = frames(1, spec["image_size"])[0]
    done: List[Done] = []

    def make(step: int):
        if spec["kind"] == "structured_action":
            return StructuredActionRequest(
                image=frame, task_name="MineRLBasaltFindCave-v0", step=step,
                max_tokens=spec["max_tokens"], constrained=spec["constrained"],
            )  # fmt: skip
        content = [{"type": "image", "image": frame}, {"type": "text", "text": spec["text"]}]
        return TextActionRequest(
            messages=[{"role": "user", "content": content}], max_tokens=spec["max_tokens"], step=step,
            constraint=spec.get("constraint"),
        )  # fmt: skip

    async def session(i: int) -> None:
        async with AsyncAgentClient(f"bench-{i}", settings=broker, raise_on_error=False) as client:
            step = 0
            while (step < spec["per_session"]) if mode == "fixed" else (time.time() < spec["t_end"]):
                req = make(step)
                t0 = time.time()
                first_piece = -1.0
                if spec.get("stream"):
                    reply = None
                    async for event in client.stream(req, timeout=600):
                        if isinstance(event, Partial):
                            if first_piece < 0 and event.token_ids:
                                first_piece = time.time() - t0
                        else:
                            reply = event
                else:
                    reply = await client.request(req, timeout=600)
                if not reply.ok:  # counted (not valid), never a crash of the whole process
                    log.warning("error reply: %s", reply.error)
                valid = (
                    int(reply.ok and action_valid(reply.result))
                    if spec["kind"] == "structured_action"
                    else -1
                )
                done.append((time.time(), time.time() - t0, first_piece, valid))
                step += 1

    async def main() -> None:
        await asyncio.gather(*(session(i) for i in range(first, first + count)))

    eventloop.run(main())
    queue.put(done)


class Served:
    """A `vlmq worker` on a private Redis, and agent processes run against it."""

    def __init__(self, folder: str, args, kinds: str, ignore_eos: bool) -> None:
        self.folder, self.args, self.kinds, self.ignore_eos = folder, args, kinds, ignore_eos

    def __enter__(self) -> Served:
        from broker.embedded import EmbeddedRedis
        from broker.settings import BrokerSettings

        a = self.args
        self.server = EmbeddedRedis().__enter__()
        self.prefix = f"bench{os.getpid()}{self.kinds[:4]}"
        cmd = argv(
            "worker", BrokerSettings(url=self.server.url, prefix=self.prefix),
            "--name", "bench-worker", "--backend", "hf", "--model", self.folder, "--device", a.device,
            "--dtype", a.dtype, "--kinds", self.kinds, "--max-batch", str(a.max_batch),
            "--max-wait-ms", str(a.max_wait_ms), "--prefill-min", str(a.prefill_min),
            "--option", f"kv_slots={a.max_batch}",
        )  # fmt: skip
        if self.ignore_eos:
            cmd += ["--option", "ignore_eos=1"]
        for o in a.option:
            cmd += ["--option", o]
        self.worker = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for_worker(
                BrokerSettings(url=self.server.url, prefix=self.prefix), "bench-worker", self.worker, 900
            )
        except RuntimeError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop_worker(self.worker)
        self.server.__exit__(None, None, None)

    def agents(self, mode: str, spec: Dict[str, Any], timeout: float) -> List[Done]:
        a = self.args
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = min(a.procs, a.sessions)
        per = [a.sessions // procs + (i < a.sessions % procs) for i in range(procs)]
        started, first = [], 0
        for n in per:
            started.append(
                ctx.Process(
                    target=_sessions, args=(self.server.url, self.prefix, first, n, mode, spec, queue)
                )
            )
            first += n
        for p in started:
            p.start()
        done = [x for _ in started for x in queue.get(timeout=timeout)]
        for p in started:
            p.join(60)
        return done

    def windows(self, spec: Dict[str, Any]) -> List[List[Done]]:
        """Closed-loop sessions; the requests done in each of --runs windows of --seconds."""
        a = self.args
        start = time.time() + a.warmup_s
        spec = {**spec, "t_end": start + a.runs * a.seconds}
        done = self.agents("window", spec, a.warmup_s + a.runs * a.seconds + 900)
        return [
            [d for d in done if start + k * a.seconds <= d[0] < start + (k + 1) * a.seconds]
            for k in range(a.runs)
        ]


# ---------------------------------------------------------------------------- mask cost


def source_tokenizer(vocab: int, folder: str, corpus_bytes: int = 80_000_000) -> str:
    """A Qwen2-style byte-level BPE of `vocab` tokens, trained on the Python sources installed
    here (no corpus can be downloaded): mask cost depends on the vocabulary's size and
    shape, and make-model's tokenizer has 2k tokens where Qwen's has 151k."""
    import glob
    import sys

    from inference_worker.models.tokenizer import train_tokenizer

    roots = [p for p in sys.path if p.endswith("-packages")]
    files = sorted(f for r in roots for f in glob.glob(f"{r}/**/*.py", recursive=True))

    def texts():
        total = 0
        for f in files:
            try:
                with open(f, encoding="utf-8", errors="ignore") as fh:
                    t = fh.read()
            except OSError:
                continue
            total += len(t)
            yield t
            if total > corpus_bytes:
                return

    tok = train_tokenizer("qwen2-vl", vocab, texts())
    tok.save_pretrained(folder)
    log.info("trained a %d-token tokenizer on %d source files", len(tok), len(files))
    return folder


def mask_cost(tokenizer_path: str, vocab: int, rows: int, steps: int) -> Dict[str, List[float]]:
    """Per-step time (ms) to fill the token masks of `rows` rows under the MineRL action
    grammar, each row advancing by a random allowed token per step."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from inference_worker.handlers.structured_action import action_constraint

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab = max(vocab, len(tok))  # another tokenizer than the checkpoint's may be larger
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pattern = action_constraint(512).spec
    out: Dict[str, List[float]] = {}

    def drive(name: str, fill, accept) -> None:
        rng = np.random.default_rng(0)
        mask = torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fill(mask)
            times.append((time.perf_counter() - t0) * 1000)
            bits = mask.numpy().view(np.uint8)
            toks = []
            for r in range(rows):
                allowed = np.flatnonzero(np.unpackbits(bits[r], bitorder="little")[:vocab])
                toks.append(int(rng.choice(allowed)))
            if not accept(toks):
                break
        out[f"mask_fill_ms_{name}"] = times

    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    compiled = xgr.GrammarCompiler(info).compile_regex(pattern)
    xm = [xgr.GrammarMatcher(compiled) for _ in range(rows)]

    def xfill(mask) -> None:
        for r, m in enumerate(xm):
            m.fill_next_token_bitmask(mask, r)

    def xaccept(toks) -> bool:
        return all(m.accept_token(t) and not m.is_terminated() for m, t in zip(xm, toks))

    drive("xgrammar", xfill, xaccept)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt
    except ImportError:
        log.info("llguidance is not installed: no baseline for the mask cost")
        return out
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
    lm = [llguidance.LLMatcher(lltok, grammar) for _ in range(rows)]
    executor = llguidance.LLExecutor()

    def lfill(mask) -> None:
        lt.fill_next_token_bitmask_par(executor, [(m, r) for r, m in enumerate(lm)], mask)

    def laccept(toks) -> bool:
        return all(m.consume_token(t) and not m.is_stopped() for m, t in zip(lm, toks))

    drive("llguidance", lfill, laccept)
    return out


# ---------------------------------------------------------------------------- run


def run(args) -> int:
    from ops.bench.models import checkpoint
    from ops.bench.records import Record, machine_description, record, write_results

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    n = args.sessions
    figures: Dict[str, Any] = {}
    with checkpoint(args.model, args.arch, args.preset, args.device) as folder:
        from transformers import AutoConfig, AutoTokenizer

        text = prompt_text(AutoTokenizer.from_pretrained(folder), args.prompt_tokens)
        if "mask" in parts:
            cfg = AutoConfig.from_pretrained(folder)
            vocab = int(cfg.get_text_config().vocab_size)
            mask_tok = args.mask_tokenizer or folder
            if not args.mask_tokenizer and args.mask_train_vocab:
                mask_tok = source_tokenizer(args.mask_train_vocab, tempfile.mkdtemp(prefix="vlmq-bench-tok-"))
                args.mask_tokenizer = f"trained here, {args.mask_train_vocab} tokens"
            figures.update(mask_cost(mask_tok, vocab, args.mask_rows, args.mask_steps))
            log.info("mask %s", {k: statistics.median(v) for k, v in figures.items()})
        if "valid" in parts:
            per = -(-args.requests // n)
            spec = dict(
                kind="structured_action", image_size=args.image_size, max_tokens=args.action_max_tokens
            )
            with Served(folder, args, "structured_action", ignore_eos=False) as s:
                for constrained in (True, False):
                    runs = []
                    for _ in range(args.runs):
                        done = s.agents(
                            "fixed", {**spec, "constrained": constrained, "per_session": per}, 3600
                        )
                        runs.append((sum(d[3] for d in done) / len(done), len(done)))
                    figures["valid_constrained" if constrained else "valid_free"] = runs
                    log.info("valid, constrained=%s: %s", constrained, runs)
        if parts & {"overhead", "stream"}:
            spec = dict(kind="text_action", image_size=args.image_size, max_tokens=args.max_tokens, text=text)
            with Served(folder, args, "text_action", ignore_eos=True) as s:
                if "overhead" in parts:
                    figures["free_windows"] = s.windows(spec)
                    figures["constrained_windows"] = s.windows({**spec, "constraint": never_ending_actions()})
                if "stream" in parts:
                    figures["stream_windows"] = s.windows({**spec, "stream": True})

    where = (
        f"{args.arch} {args.preset if not args.model else 'checkpoint'}, {args.image_size}-px image; {n} sessions "
        f"in {args.procs} processes; worker --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g} "
        f"--prefill-min {args.prefill_min}{''.join(f' --option {o}' for o in args.option)}; {machine_description()}"
    )
    recs: List[Record] = []
    if "mask_fill_ms_xgrammar" in figures:
        per_run = _split(figures["mask_fill_ms_xgrammar"], args.runs)
        base = figures.get("mask_fill_ms_llguidance")
        recs.append(
            record(
                f"grammar_mask_fill_ms_{args.mask_rows}_rows",
                per_run,
                "ms/step",
                statistics.median(base) if base else None,
                machine=f"xgrammar (baseline: llguidance, parallel); MineRL action grammar, "
                f"tokenizer {args.mask_tokenizer or 'of the checkpoint'}; {machine_description()}",
            )
        )
    if "valid_constrained" in figures:
        free = statistics.median(f for f, _ in figures["valid_free"])
        total = sum(k for _, k in figures["valid_constrained"])
        recs.append(
            record(
                "structured_action_valid_fraction",
                [f for f, _ in figures["valid_constrained"]],
                "fraction",
                free,
                machine=f"{total} constrained requests in {args.runs} runs (baseline: constrained=false, the "
                f"free-text parse), max_tokens {args.action_max_tokens}; {where}",
            )
        )
    if "constrained_windows" in figures:
        free = [len(w) / args.seconds for w in figures["free_windows"]]
        cons = [len(w) / args.seconds for w in figures["constrained_windows"]]
        what = f"text_action, {args.max_tokens} new tokens; {where}"
        recs.append(record(f"throughput_rps_{n}_sessions_constrained", cons, "requests/s", machine=what))
        recs.append(record(f"throughput_rps_{n}_sessions_unconstrained", free, "requests/s", machine=what))
        ratios = [c / f if f else 0.0 for c, f in zip(cons, free)]
        recs.append(
            record(
                "constrained_decode_overhead",
                ratios,
                "ratio",
                machine=f"requests/s under a never-ending MineRL-action grammar / without one, same windows "
                f"order; {what}",
            )
        )
    if "stream_windows" in figures:
        ttft = [_p50([d[2] * 1000 for d in w if d[2] >= 0]) for w in figures["stream_windows"]]
        full = [_p50([d[1] * 1000 for d in w]) for w in figures["stream_windows"]]
        recs.append(
            record(
                f"stream_ttft_ms_p50_{n}_sessions",
                ttft,
                "ms",
                statistics.median(full),
                machine=f"first streamed piece (baseline: the whole reply, same requests); text_action, "
                f"{args.max_tokens} new tokens; {where}",
            )
        )
    write_results(args.out, recs)
    for r in recs:
        ratio = f" ({r.ratio}x)" if r.ratio else ""
        print(f"{r.metric:50s} {r.value:>12} {r.unit}{ratio}  [{r.min}..{r.max}, {r.runs} runs]")
    return 0


def _p50(xs: List[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _split(xs: List[float], k: int) -> List[float]:
    """Medians of k consecutive slices (a run each)."""
    size = max(1, len(xs) // k)
    return [
        statistics.median(xs[i * size : (i + 1) * size]) for i in range(k) if xs[i * size : (i + 1) * size]
    ]
