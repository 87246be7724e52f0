"""The handler interface: one per task kind; handlers know nothing about Redis.

A handler turns a batch of validated requests of its kind into one result (or one
ProtocolError) per request, in order (`run`). It runs in the worker's model thread, never
on the event loop. A chat handler is also a set of per-request programs (`program`): a
generator that yields engine ops -- `Generate` (a completion) and `Score` (candidate
log-probabilities) -- and returns the request's result, so the engine core can run each
request's ops as part of its continuous decode instead of batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Generator, List, Sequence, Union

from pydantic import BaseModel

from schemas.errors import ProtocolError
from schemas.messages import Request

HandlerResult = Union[BaseModel, ProtocolError]


@dataclass(eq=False)
class Generate:
    """Engine op: one completion of `prompt` (a checked ChatPrompt) under `sampling`."""

    prompt: Any
    sampling: Any
    candidates: None = None


@dataclass(eq=False)
class Score:
    """Engine op: the summed log-probability of each candidate as the answer to `prompt`."""

    prompt: Any
    candidates: Sequence[str]


Op = Union[Generate, Score]
Program = Generator[Op, Any, HandlerResult]


@dataclass
class HandlerOutput:
    results: List[HandlerResult]
    timings: Dict[str, float] = field(default_factory=dict)  # ms per stage, for the whole batch


class Handler:
    kind: str = ""
    # A handler whose run() returns in microseconds and never blocks (no model, no sleep)
    # runs on the event loop; everything else runs in the worker's model thread.
    blocking: bool = True

    def warmup(self) -> None:
        """Run once before serving (compile, allocate, fill caches)."""

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Release models and memory."""


class AsyncHandler(Handler):
    """A kind served by a backend with its own scheduler: `serve` is awaited once per
    request, on the worker's event loop, as many at a time as the worker has admitted."""

    blocking = False

    async def warmup_async(self) -> None:
        """Run once on the worker's event loop before serving."""

    async def serve(self, request: Request) -> HandlerResult:
        """The result of one request, or the ProtocolError it fails with."""
        raise NotImplementedError

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        raise TypeError(f"{type(self).__name__} serves one request at a time: await serve()")
