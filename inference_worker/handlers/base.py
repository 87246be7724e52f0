"""The handler interface: one per task kind.

A `Handler` turns a batch of validated requests of its kind into one result (or one
ProtocolError) per request, in order. It runs in the worker's model thread, never on the
event loop, and knows nothing about Redis. An `AsyncHandler` serves one request at a time
on the event loop, for backends that batch by themselves (vLLM): the worker hands it each
request as it is admitted, without batching it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Union

from pydantic import BaseModel

from schemas.errors import ProtocolError
from schemas.messages import Request

Outcome = Union[BaseModel, ProtocolError]


@dataclass
class HandlerOutput:
    results: List[Outcome]
    timings: Dict[str, float] = field(default_factory=dict)  # ms per stage, for the whole batch


class Stopwatch:
    """Collects per-stage milliseconds: `with sw("model"): ...`."""

    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0


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

    async def serve(self, request: Request) -> Outcome:
        """The result of one request, or the ProtocolError it fails with."""
        raise NotImplementedError

    def run(self, requests: Sequence[Request]) -> HandlerOutput:
        raise TypeError(f"{type(self).__name__} serves one request at a time: await serve()")
