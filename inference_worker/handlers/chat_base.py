"""What the three chat kinds share: one engine, and each request as a program of engine ops.

A request whose prompt cannot be built (an image that does not decode, more image
placeholders than images, a prompt over the token limit) fails alone with its
ProtocolError, raised from its program before any op; the rest still run. `run` drives a
whole batch of programs in lockstep (each round: one `score` call for the Score ops, one
`generate` call for the Generate ops) for the batch-at-a-time path; the engine core
drives the same programs one op at a time, and `AsyncChatHandler` runs them one request
at a time on an engine that batches by itself (vLLM), awaiting each op.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from inference_worker.engines.grammar import Constraint
from inference_worker.engines.prompt import ChatPrompt
from inference_worker.engines.sampling import Sampling
from inference_worker.handlers.base import (
    AsyncHandler,
    Generate,
    Handler,
    HandlerOutput,
    HandlerResult,
    Op,
    Program,
    Score,
)
from inference_worker.timing import Stopwatch
from schemas.errors import ErrorCode, ProtocolError
from schemas.limits import DEFAULT_LIMITS, Limits
from schemas.messages import Request

log = logging.getLogger("vlmq.handlers")


class ChatHandler(Handler):
    def __init__(self, engine: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.engine = engine
        self.limits = limits

    def warmup(self) -> None:
        self.engine.warmup()

    def check(self, prompt: ChatPrompt) -> ChatPrompt:
        """The prompt, checked and tokenized; raises the ProtocolError it fails with."""
        return self.engine.check(prompt, self.limits.max_prompt_tokens)

    def sampling(self, req: Request, constraint: Optional[Constraint] = None, **override: Any) -> Sampling:
        """The request's decoding settings, with its constraint compiled (runs where the
        program starts: off the model thread); raises the ProtocolError of settings this
        engine cannot honour."""
        s = Sampling.of(req, **override)
        constraint = constraint or Constraint.of(getattr(req, "constraint", None))
        supports = getattr(self.engine, "check_sampling", None)
        if supports is None:  # an engine without them (vLLM): refused, never ignored
            asked = [
                name
                for name, on in (
                    ("constraint", constraint is not None),
                    ("n > 1", s.n > 1),
                    ("logprobs", s.logprobs),
                    ("stream", s.stream),
                )
                if on
            ]
            if asked:
                raise ProtocolError(
                    ErrorCode.INVALID,
                    f"{', '.join(asked)}: not supported by this worker's backend (use --backend hf)",
                )
            return s
        if constraint is not None:
            s = replace(s, grammar=self.engine.grammar(constraint))
        supports(s)
        return s

    def program(self, request: Request) -> Program:
        raise NotImplementedError

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        sw = Stopwatch()
        results: List[Optional[HandlerResult]] = [None] * len(requests)
        ops: Dict[int, Op] = {}
        programs = [self.program(r) for r in requests]
        for i, p in enumerate(programs):
            advance(p, None, lambda op, i=i: ops.__setitem__(i, op), lambda r, i=i: results.__setitem__(i, r))
        while ops:
            now = dict(ops)
            ops.clear()
            answers: Dict[int, Any] = {}
            scores = [i for i, op in now.items() if isinstance(op, Score)]
            gens = [i for i, op in now.items() if isinstance(op, Generate)]
            if scores:
                got = self.engine.score(
                    [now[i].prompt for i in scores], [now[i].candidates for i in scores], sw
                )
                answers.update(zip(scores, got))
            if gens:
                got = self.engine.generate([now[i].prompt for i in gens], [now[i].sampling for i in gens], sw)
                answers.update(zip(gens, got))
            for i, answer in answers.items():
                advance(
                    programs[i],
                    answer,
                    lambda op, i=i: ops.__setitem__(i, op),
                    lambda r, i=i: results.__setitem__(i, r),
                )
        return HandlerOutput(results, sw.timings)  # type: ignore[arg-type]


class AsyncChatHandler(AsyncHandler):
    """A chat kind's programs on an engine whose `generate(prompt, sampling)` and
    `score(prompt, candidates)` are awaited per request (engines/vllm_engine.py)."""

    def __init__(self, handler: ChatHandler) -> None:
        self.handler = handler
        self.kind = handler.kind
        self.engine = handler.engine

    async def warmup_async(self) -> None:
        await self.engine.warmup()

    async def serve(self, request: Request) -> HandlerResult:
        program = self.handler.program(request)
        step: List[Any] = []
        answer: Any = None
        while True:
            step.clear()
            advance(program, answer, lambda op: step.append(("op", op)), lambda r: step.append(("done", r)))
            what, value = step[0]
            if what == "done":
                return value
            if isinstance(value, Score):
                answer = await self.engine.score(value.prompt, value.candidates)
            else:
                answer = await self.engine.generate(value.prompt, value.sampling)

    def close(self) -> None:
        self.engine.close()  # the kinds share the engine: closing twice is a no-op


def advance(program: Program, answer: Any, on_op, on_result) -> None:
    """Send `answer` (None to start) into a request's program: its next op goes to
    `on_op`, its result (or the ProtocolError it failed with) to `on_result`."""
    try:
        op = program.send(answer)
    except StopIteration as stop:
        on_result(stop.value)
    except ProtocolError as exc:
        on_result(exc)
    except Exception as exc:  # a bug in one request's handling must not take its batch down
        log.exception("request program failed")
        on_result(ProtocolError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
    else:
        on_op(op)
